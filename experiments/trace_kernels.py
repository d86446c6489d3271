"""GPU kernel times inside a JAX program, from a profiler trace (no nsys needed).

Question: inside a whole jitted step (not a kernel timed alone), how long does each GPU
kernel run, and how much of the step is attention?
Use:  with jax.profiler.trace(DIR, create_perfetto_trace=True): <run some steps>
      then `kernel_times(DIR)` or  python experiments/trace_kernels.py DIR [--steps N]
Reads DIR/**/perfetto_trace.json.gz (Chrome trace events), sums the durations of the
complete ("X") events on GPU device tracks by kernel name, and prints the top kernels and
the attention kernels' share (names matching ATTENTION).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re

ATTENTION = re.compile(r"flash|fmha|cudnn|attention|dkdv|dq_mgpu|sdpa|softmax", re.I)


def _trace_file(trace_dir) -> pathlib.Path:
    files = sorted(pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}: trace with "
                                "jax.profiler.trace(..., create_perfetto_trace=True)")
    return files[-1]


def _events(trace_dir) -> list:
    with gzip.open(_trace_file(trace_dir), "rt") as f:
        events = json.load(f)
    return events["traceEvents"] if isinstance(events, dict) else events


def kernel_times(trace_dir) -> dict[str, float]:
    """{kernel name: total microseconds} over the GPU device tracks of the newest trace in
    trace_dir (empty when the trace has no GPU track, e.g. on a CPU)."""
    return _kernel_stats(_events(trace_dir))[0]


def idle_before(trace_dir) -> dict[str, float]:
    """{kernel name: total microseconds that its GPU track sat idle just before it ran}: the
    gaps between one kernel's end and the next one's start on the same stream, each charged
    to the kernel that ends it (launch latency, host work, waits on other streams)."""
    return _kernel_stats(_events(trace_dir))[1]


def _kernel_stats(events) -> tuple[dict[str, float], dict[str, float]]:
    gpu_pids = {e["pid"] for e in events
                if e.get("ph") == "M" and e.get("name") == "process_name"
                and re.search(r"GPU|gpu", str(e.get("args", {}).get("name", "")))}
    if not gpu_pids:  # say what the trace has instead (a CPU run; or names changed)
        names = sorted({str(e.get("args", {}).get("name")) for e in events
                        if e.get("ph") == "M" and e.get("name") == "process_name"})
        print(f"trace_kernels: no GPU track in the trace; processes: {names[:10]}")
    totals: dict[str, float] = collections.defaultdict(float)
    idle: dict[str, float] = collections.defaultdict(float)
    tracks = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids:
            totals[e.get("name", "?")] += float(e.get("dur", 0.0))
            tracks[(e["pid"], e.get("tid"))].append(e)
    for track in tracks.values():
        track.sort(key=lambda e: float(e.get("ts", 0.0)))
        for before, after in zip(track, track[1:]):
            gap = float(after.get("ts", 0.0)) - float(before.get("ts", 0.0)) - \
                float(before.get("dur", 0.0))
            if gap > 0:
                idle[after.get("name", "?")] += gap
    return dict(totals), dict(idle)


def summary(times: dict[str, float], *, steps: int = 1, top: int = 15,
            idle: dict[str, float] | None = None) -> dict:
    """Per-step totals: all kernels, the attention kernels, and the `top` longest names;
    with `idle` (idle_before), the idle GPU time per step and the kernels most waited for."""
    total = sum(times.values()) / steps
    attention = {n: t / steps for n, t in times.items() if ATTENTION.search(n)}
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:top]
    extra = {}
    if idle is not None:
        extra = {"idle_ms_per_step": sum(idle.values()) / steps / 1e3,
                 "idle_before_ms": {n: t / steps / 1e3 for n, t in sorted(
                     idle.items(), key=lambda kv: -kv[1])[:top]}}
    extra["all_kernels_ms"] = {n: t / steps / 1e3 for n, t in sorted(
        times.items(), key=lambda kv: -kv[1])}
    return {**extra, "kernel_ms_per_step": total / 1e3,
            "attention_ms_per_step": sum(attention.values()) / 1e3,
            "attention_kernels_ms": {n: t / 1e3 for n, t in sorted(
                attention.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": {n: t / steps / 1e3 for n, t in ranked}}


def diff(base: dict, other: dict, *, threshold_ms: float = 0.03) -> dict[str, float]:
    """Per-step kernel time of `other` minus `base` (two summaries), by kernel name, where
    it differs by more than threshold_ms: the kernels one program runs and the other does
    not, or runs slower."""
    a, b = base["all_kernels_ms"], other["all_kernels_ms"]
    delta = {n: b.get(n, 0.0) - a.get(n, 0.0) for n in set(a) | set(b)}
    return dict(sorted(((n, d) for n, d in delta.items() if abs(d) > threshold_ms),
                       key=lambda kv: -abs(kv[1])))


def print_summary(label: str, s: dict) -> None:
    print(f"{label}: GPU kernels {s['kernel_ms_per_step']:.2f} ms/step, attention "
          f"{s['attention_ms_per_step']:.2f} ms/step")
    for name, ms in s["attention_kernels_ms"].items():
        print(f"    attention  {ms:8.3f} ms  {name[:90]}")
    for name, ms in s["top_kernels_ms"].items():
        print(f"    top        {ms:8.3f} ms  {name[:90]}")
    if "idle_ms_per_step" in s:
        print(f"  idle GPU time between kernels: {s['idle_ms_per_step']:.2f} ms/step; before:")
        for name, ms in s["idle_before_ms"].items():
            print(f"    idle       {ms:8.3f} ms  {name[:90]}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace_dir")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds")
    args = p.parse_args(argv)
    s = summary(kernel_times(args.trace_dir), steps=args.steps,
                idle=idle_before(args.trace_dir))
    print_summary(args.trace_dir, s)
    return s


if __name__ == "__main__":
    main()
