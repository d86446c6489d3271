"""Renders a benchmark JSON (benchmarks/attention.json) as the markdown table in BENCHMARKS.md.

Run: PYTHONPATH=. python experiments/benchmarks_table.py [benchmarks/attention.json]
Prints one row per config: TFLOP/s of each implementation and our ratio to each peer
(ours = the best of `fastattn`, `fastattn_pallas` and the Hopper kernels `fastattn_mosaic`,
`fastattn_mosaic_bwd`).
"""

from __future__ import annotations

import json
import sys

PEERS = ["cudnn", "xla", "jax_pallas_mha"]
OURS = ["fastattn", "fastattn_pallas", "fastattn_mosaic", "fastattn_mosaic_bwd"]


def render(result: dict) -> str:
    by_config: dict[str, dict[str, dict]] = {}
    for row in result["rows"]:
        by_config.setdefault(row["config"], {})[row["impl"]] = row
    impls = OURS + PEERS
    head = ["config"] + impls + [f"ours / {p}" for p in ("cudnn", "jax_pallas_mha")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for config, rows in by_config.items():
        tflops = {i: (rows.get(i) or {}).get("tflops") for i in impls}
        ours = max((tflops[i] for i in OURS if tflops[i]), default=None)
        cells = [config.replace("|", " ")] + [f"{tflops[i]:.0f}" if tflops[i] else "–" for i in impls]
        for peer in ("cudnn", "jax_pallas_mha"):
            cells.append(f"{ours / tflops[peer]:.2f}" if ours and tflops[peer] else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    path = (argv or sys.argv[1:] or ["benchmarks/attention.json"])[0]
    with open(path) as f:
        result = json.load(f)
    print(f"{result['device']}, jax {result['jax']}, {result['date']} (TFLOP/s)\n")
    print(render(result))


if __name__ == "__main__":
    main()
