"""Where does an engine decode step's time go: device or host, and does it grow with the pool?

Question: the 0.85B engine spends ~16 ms per decode step of 256 sequences where the bytes it
          must read (weights + live KV) take ~3 ms. If the KV pool were copied (not updated in
          place) the step time would grow with the pool size; if the host were the bottleneck
          the device-only time would be far below the step time.
Run:      PYTHONPATH=. python experiments/profile_engine_step.py [--tiny]
Prints:   per pool size: decode-step wall time (engine, sync and async), device-only time of
          the same jitted step, the number of HLO copy ops whose shape is the pool's, and the
          host phases of a step (schedule, input arrays, jit dispatch, waiting for the device,
          applying the tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import time

import jax
import jax.numpy as jnp
import numpy as np

from fastattn.engine import Engine, EngineConfig
from fastattn.sampling import SamplingParams
from models import LLAMA_0_85B, TINY, Llama


def _time_phases(engine) -> dict[str, float]:
    """Wraps the engine's host phases with timers: schedule, input arrays, jit dispatch,
    waiting for the device's tokens, and applying them (commits, stops). Returns the dict the
    timers add seconds into."""
    totals = dict.fromkeys(("schedule", "inputs", "dispatch", "wait", "apply"), 0.0)

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            totals[name] += time.perf_counter() - start
            return result
        return wrapper

    process = engine._process

    def process_after_wait(step):
        start = time.perf_counter()
        jax.block_until_ready(step.out.tokens)
        totals["wait"] += time.perf_counter() - start
        timed("apply", process)(step)

    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine._inputs = timed("inputs", engine._inputs)
    engine._step_fn = timed("dispatch", engine._step_fn)
    engine._process = process_after_wait
    return totals


def _launches(hlo: str) -> dict[str, int]:
    """Launches the host issues per step of a compiled program: the entry computation's
    kernels (fusions, custom calls incl. Pallas and cuBLAS), and how many of them XLA put into
    command buffers (CUDA graphs, launched as one)."""
    entry = hlo[hlo.index("\nENTRY"):] if "\nENTRY" in hlo else hlo
    entry = entry[:entry.find("\n}") + 1]
    launches = {kind: entry.count(f" {kind}(") for kind in ("fusion", "custom-call", "call")}
    launches["command_buffer"] = hlo.count("command_buffer")
    return launches


def probe(model, params, num_pages, n, prompt_len, new_tokens, async_scheduling, base):
    config = dataclasses.replace(base, num_pages=num_pages, async_scheduling=async_scheduling)
    engine = Engine(model, params, config)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, prompt_len).tolist() for _ in range(n)]
    # No request may finish while steps are timed: the first prompts decode while the last
    # ones still prefill, and a shrinking batch would change (and compile) the step's bucket.
    sp = SamplingParams(temperature=0.0, max_tokens=config.max_model_len - prompt_len,
                        ignore_eos=True)
    ids = [engine.add_request(p, sp) for p in prompts]
    while any(not s.output for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill until every sequence decodes
    for _ in range(2):
        engine.step()  # compiles the decode-only shape outside the timed steps
    step_fn = engine._step_fn  # the jitted step, before the timers wrap it
    compiled = step_fn._cache_size()
    phases = _time_phases(engine)
    start, steps = time.perf_counter(), 0
    while steps < new_tokens:
        engine.step()
        steps += 1
    if step_fn._cache_size() != compiled or len(engine.scheduler.running) != n:
        raise RuntimeError("a timed step compiled or the batch changed: the timing is void")
    step_ms = 1e3 * (time.perf_counter() - start) / steps
    phases = {name: 1e3 * seconds / steps for name, seconds in phases.items()}
    # The same jitted step alone, inputs prepared once (device time + dispatch only).
    if engine._inflight is not None:
        engine._process(engine._inflight)
        engine._inflight = None
    chunks = engine.scheduler.schedule().chunks
    T = min(b for b in engine.buckets if b >= len(chunks))
    S = min(T, config.max_num_seqs)
    batch, feed, sampling, st, counts, pm = engine._inputs(chunks, T, S, None)
    copies = np.full((2, S), [[0], [engine.num_pages]], np.int32)
    args = (batch, sampling, engine._key, st, counts, pm, copies, engine._no_tokens, feed)
    hlo = step_fn.lower(engine.params, engine.kv, *args, num_logprobs=0)[0].compile().as_text()
    pool = f"[{model.config.num_kv_heads},{engine.num_pages},"  # the model's program
    copies_of_pool = sum(1 for line in hlo.splitlines() if " copy(" in line and pool in line)
    for _ in range(3):
        out, _, engine.kv = step_fn(engine.params, engine.kv, *args, num_logprobs=0)
    jax.block_until_ready(out.tokens)
    start = time.perf_counter()
    for _ in range(10):
        out, _, engine.kv = step_fn(engine.params, engine.kv, *args, num_logprobs=0)
    jax.block_until_ready(out.tokens)
    device_ms = 1e3 * (time.perf_counter() - start) / 10
    # Where those ms go, per attention variant of an all-decode step (the split-KV paged
    # decode kernel, max_q_len = 1; the ragged kernel, max_q_len = T): the launches in the
    # model's compiled program, the call alone (inputs already on the device, nothing in
    # flight), then call + device with a sync after each.
    split = {}
    for kernel, step_batch in (("split-KV decode", batch.replace(max_q_len=1)),
                               ("ragged kernel", batch.replace(max_q_len=T))):
        dev_args = jax.device_put((step_batch, *args[1:]))
        split[kernel] = _launches(step_fn.lower(engine.params, engine.kv, *dev_args,
                                                num_logprobs=0)[0].compile().as_text())
        call_s = sync_s = 0.0
        for i in range(8):
            jax.block_until_ready(engine.kv)
            t0 = time.perf_counter()
            out, _, engine.kv = step_fn(engine.params, engine.kv, *dev_args, num_logprobs=0)
            t1 = time.perf_counter()
            jax.block_until_ready(out.tokens)
            if i >= 3:  # the first calls compile (ragged launch) and warm up
                call_s, sync_s = call_s + t1 - t0, sync_s + time.perf_counter() - t0
        split[kernel].update(call_ms=1e3 * call_s / 5, synced_ms=1e3 * sync_s / 5)
    for i in ids:
        engine.abort(i)
    pool_gb = sum(k.nbytes + v.nbytes for k, v in engine.kv) / 1e9
    del engine
    gc.collect()
    return step_ms, device_ms, copies_of_pool, pool_gb, phases, split


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--pools", default=None,
                        help="comma-separated pool sizes in pages (default: a small and a "
                             "large pool)")
    parser.add_argument("--async-only", action="store_true",
                        help="only the overlapped (async scheduling) engine")
    parser.add_argument("--split-kv-decode", action="store_true",
                        help="the engine's all-decode steps through the split-KV decode kernel")
    parser.add_argument("--no-fusion", action="store_true",
                        help="EngineConfig.inference_fusion=False (default: on a GPU, on)")
    parser.add_argument("--no-dispatch-thread", action="store_true",
                        help="EngineConfig.dispatch_thread=False: launch from the main thread")
    args = parser.parse_args(argv)
    if args.tiny:
        cfg = dataclasses.replace(TINY, max_position_embeddings=256)
        n, prompt_len, new_tokens, pools = 8, 40, 8, (64, 256)  # new_tokens: timed steps
        base = EngineConfig(page_size=16, token_budget=64, max_num_seqs=8, max_model_len=256)
    else:
        cfg = LLAMA_0_85B
        n, prompt_len, new_tokens, pools = 256, 512, 16, (20000, 60000)
        base = EngineConfig(page_size=16, token_budget=512, max_num_seqs=256, max_model_len=1024)
    model = Llama(cfg)
    params = jax.jit(lambda k: jax.tree.map(
        lambda p: p.astype(cfg.dtype), model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]))(
        jax.random.PRNGKey(0))
    base = dataclasses.replace(base, split_kv_decode=args.split_kv_decode,
                               inference_fusion=False if args.no_fusion else None,
                               dispatch_thread=not args.no_dispatch_thread)
    print(f"{jax.devices()[0].device_kind}: {n} sequences x {prompt_len} prompt tokens, decode"
          f" (engine: split_kv_decode={base.split_kv_decode}, inference_fusion="
          f"{base.inference_fusion}, dispatch_thread={base.dispatch_thread})")
    if args.pools:
        pools = tuple(int(p) for p in args.pools.split(","))
    for pages in pools:
        for overlap in (True,) if args.async_only else (False, True):
            step_ms, device_ms, n_copies, gb, phases, split = probe(
                model, params, pages, n, prompt_len, new_tokens, overlap, base)
            print(f"  pool {pages:6d} pages ({gb:5.1f} GB) async={overlap!s:5}: step "
                  f"{step_ms:6.2f} ms, device-only {device_ms:6.2f} ms, pool-sized HLO "
                  f"copies {n_copies}")
            where = " (dispatch: on the dispatch thread, beside the others)" \
                if base.dispatch_thread else ""
            print(f"    host ms per step{where}: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                             phases.items()))
            for kernel, r in split.items():
                kernels = {k: v for k, v in r.items() if not k.endswith("_ms")}
                print(f"    {kernel:<15}: call alone {r['call_ms']:6.2f} ms, call + device "
                      f"(synced) {r['synced_ms']:6.2f} ms; launches {kernels}")


if __name__ == "__main__":
    main()
