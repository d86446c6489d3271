"""The loops of a kernel's SASS, summarised: where the matrix products, their waits and the
softmax fall in each loop body (issue 7).

Question it answers: does a step's softmax (FMNMX, MUFU.EX2) run while a wgmma group is
still in flight, or only after `WARPGROUP.DEPBAR.LE gsb0, 0x0` (every group done)? The
PTX says what we asked for; the SASS says what ptxas made of it.
Run: python experiments/sass_loops.py FILE.sass [--min-length 200]
     (FILE from `cuobjdump -sass` of a cubin, e.g. gpu_pending.sh's sass step)
Prints per loop (a backward branch spanning at least --min-length instructions): its
length, the opcode counts, and its skeleton: HGMMA runs, waits, barrier operations and the
first and last instruction of each softmax opcode, in program order.
"""

from __future__ import annotations

import argparse
import collections
import re

INSTRUCTION = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
BRANCH_TARGET = re.compile(r"\bBRA\s+(?:.*\s)?0x([0-9a-f]+)\s*$")
PREDICATE = re.compile(r"^@!?U?P\w+\s+")
# Opcodes that order the step: shown one by one in the skeleton.
MARKERS = ("HGMMA", "WARPGROUP", "SYNCS", "BAR", "BRA")
SOFTMAX = ("FMNMX", "MUFU.EX2", "FFMA", "FADD", "FMUL", "F2FP")


def parse(text: str) -> list[tuple[int, str]]:
    """(address, instruction text) for each SASS instruction line."""
    return [(int(m.group(1), 16), m.group(2)) for m in map(INSTRUCTION.match,
                                                           text.splitlines()) if m]


def opcode(instruction: str) -> str:
    return PREDICATE.sub("", instruction).split()[0]


def loops(instructions, min_length: int = 200) -> list[tuple[int, int]]:
    """(first, last) addresses of each backward branch's body, at least min_length long."""
    found = []
    for address, text in instructions:
        m = BRANCH_TARGET.search(text)
        # A loop closes with a predicated branch back; the unconditional ones back are the
        # retry paths of barrier waits, placed after the kernel's end.
        if m and PREDICATE.match(text) and (target := int(m.group(1), 16)) < address:
            body = [a for a, _ in instructions if target <= a <= address]
            if len(body) >= min_length:
                found.append((target, address))
    return sorted(set(found))


def skeleton(body: list[str]) -> list[str]:
    """Markers in order, then for each softmax opcode the positions of its first and last
    instance in the loop, merged into that order."""
    lines, first, last = [], {}, {}
    for i, text in enumerate(body):
        op = opcode(text)
        if op.startswith(MARKERS):
            lines.append(f"{i:4d}  {PREDICATE.sub('', text)[:80]}")
        for name in SOFTMAX:
            if op.startswith(name):
                first.setdefault(name, i)
                last[name] = i
    lines += [f"{first[n]:4d}-{last[n]:<4d} {n} (first-last)" for n in SOFTMAX if n in first]
    return sorted(lines, key=lambda line: int(line.split()[0].split("-")[0]))


def summarise(text: str, min_length: int = 200) -> str:
    instructions = parse(text)
    out = []
    for lo, hi in loops(instructions, min_length):
        body = [t for a, t in instructions if lo <= a <= hi]
        counts = collections.Counter(opcode(t) for t in body)
        out.append(f"loop {lo:#x}-{hi:#x}: {len(body)} instructions")
        out.append("  " + ", ".join(f"{op} {n}" for op, n in counts.most_common(14)))
        out += ["  " + line for line in skeleton(body)]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sass")
    p.add_argument("--min-length", type=int, default=200)
    args = p.parse_args(argv)
    with open(args.sass) as f:
        print(summarise(f.read(), args.min_length))


if __name__ == "__main__":
    main()
