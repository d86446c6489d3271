"""Serving throughput of the engine on the workload of shared/TARGETS.md.

Question: how many useful output tokens/s does the continuous-batching engine serve on the
          0.85B Llama (random bf16 weights) for 256 requests with prompts U[64, 1024] and
          outputs U[16, 512] (numpy default_rng(0)), against our own static-batching mode
          (batch 32, the HF baseline's setting) in the same process?
Run:      PYTHONPATH=. python experiments/bench_serving.py [--requests 256] [--out FILE]
          [--budgets 512,2048]  (continuous mode once per token budget; static at the
          largest, its best: fewer prefill steps per batch)
          --tiny: a seconds-long CPU variant (CI).
Prints:   per mode: wall seconds, useful output tokens/s, steps, TTFT / TPOT (mean, p50, p90,
          p99), KV fill, preemptions, start-up (compile) time and compilations after warm-up,
          mean step time against the weight-read floor (weight bytes / a device copy's
          bandwidth, measured in the same run: no step can read the weights faster);
          writes the rows as JSON (benchmarks/serving.json) and a throughput / latency plot
          next to it. --hf also runs HF transformers `generate` (static batches of 32) on the
          same workload in a separate process; without it the ratio uses the measured anchor
          of shared/TARGETS.md (630 tok/s).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fastattn.engine import Engine, EngineConfig
from fastattn.sampling import SamplingParams
from experiments.results import write_results
from models import LLAMA_0_85B, TINY, Llama

HF_STATIC_TOKENS_PER_S = 630  # shared/TARGETS.md: HF generate, static batch 32, same workload


def workload(n: int, vocab: int, prompt_range=(64, 1024), output_range=(16, 512)):
    rng = np.random.default_rng(0)
    prompt_lens = rng.integers(prompt_range[0], prompt_range[1] + 1, n)
    output_lens = rng.integers(output_range[0], output_range[1] + 1, n)
    prompts = [rng.integers(0, vocab, int(p)).tolist() for p in prompt_lens]
    params = [SamplingParams(temperature=0.0, max_tokens=int(o), ignore_eos=True)
              for o in output_lens]
    return prompts, params


def run(model, params, prompts, sampling, config: EngineConfig) -> dict:
    start = time.perf_counter()
    engine = Engine(model, params, config)
    compile_s = engine.warmup()
    ready_s = time.perf_counter() - start
    start = time.perf_counter()
    cache_size = getattr(engine._step_fn, "_cache_size", None)  # jit's compiled variants
    compiled = cache_size() if cache_size else None
    out = engine.generate(prompts, sampling)
    wall = time.perf_counter() - start
    recompiles = cache_size() - compiled if cache_size else None
    useful = sum(len(c.token_ids) for c in out)
    assert all(len(c.token_ids) == s.max_tokens for c, s in zip(out, sampling))
    m = engine.metrics()
    ttft = np.array(engine._stats["ttft"])
    tpot = np.array(engine._stats["tpot"])
    pct = {f"{name}_p{q}_s": float(np.percentile(x, q)) for name, x in
           (("ttft", ttft), ("tpot", tpot)) for q in (50, 90, 99) if x.size}
    warmup = {f"warmup_{name}_s": seconds for name, seconds in engine.warmup_seconds.items()}
    num_pages = engine.num_pages
    del engine
    gc.collect()  # the next mode's engine needs the memory this one held
    return {"wall_s": wall, "tok_per_s": useful / wall, "output_tokens": useful,
            "num_pages": num_pages, "device_bytes_in_use_after": _bytes_in_use(),
            "ready_s": ready_s, "compile_s": compile_s, "recompiles_after_warmup": recompiles,
            "token_budget": config.token_budget, **warmup, **m, **pct,
            "tokens": [c.token_ids for c in out]}


def _bytes_in_use() -> int | None:
    """Device memory still allocated (None where the backend does not say): after an engine
    is deleted this should be about the weights, or the next engine cannot get its pool."""
    return (jax.devices()[0].memory_stats() or {}).get("bytes_in_use")


def _copy_bytes_per_s(nbytes: int) -> float:
    """HBM bandwidth as a device copy reaches it (bytes read + written per second)."""
    from experiments.bench_attention import time_fn

    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    ms = time_fn(jax.jit(lambda x, one: x * one), x, jnp.ones((), x.dtype))
    return 2 * nbytes / (ms / 1e3)


def _write_quietly(path: str, rows: list[dict]) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        write_results(path, rows)


def _warmup_phases(row: dict) -> dict[str, float]:
    return {k[len("warmup_"):-2]: v for k, v in row.items() if k.startswith("warmup_")}


def _compare_tokens(tokens: dict) -> None:
    """Greedy tokens of each run against the first run's. With random bf16 weights the logits
    are nearly flat, so a different batch composition (other matmul tiles, other rounding)
    can flip an argmax and the request diverges from there: the share of requests that
    agree entirely and the mean agreeing prefix say how much, not a bare yes / no."""
    (first, want), *others = tokens.items()
    for name, got in others:
        agree = [next((i for i, (a, b) in enumerate(zip(w, g)) if a != b), len(w)) / len(w)
                 for w, g in zip(want, got)]
        print(f"  greedy tokens {name} vs {first}: {sum(a == 1 for a in agree)}/{len(agree)} "
              f"requests identical, mean agreeing prefix {np.mean(agree):.0%}")


def run_hf(cfg, n, batch, lengths) -> dict:
    """HF transformers generate on the same workload, in its own process (see
    experiments/hf_generate_baseline.py)."""
    hf_config = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_kv_heads,
                     intermediate_size=cfg.intermediate_size,
                     max_position_embeddings=cfg.max_position_embeddings,
                     rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope_theta)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_generate_baseline.py")
    (p_lo, p_hi), (o_lo, o_hi) = lengths
    proc = subprocess.run([sys.executable, script, json.dumps(hf_config), str(n), str(batch),
                           str(p_lo), str(p_hi), str(o_lo), str(o_hi)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _plot(rows: list[dict], path: str) -> str:
    """Throughput per implementation, and the latency each request saw (TTFT and time per
    output token percentiles) for the engine's modes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = [r["impl"] for r in rows]
    left.bar(names, [r["tok_per_s"] for r in rows], color="tab:blue")
    left.set(ylabel="useful output tokens / s", title="throughput")
    left.tick_params(axis="x", labelrotation=15)
    for r in rows:
        if "ttft_p50_s" in r:
            right.plot([r[f"tpot_p{q}_s"] * 1e3 for q in (50, 90, 99)],
                       [r[f"ttft_p{q}_s"] for q in (50, 90, 99)], "o-", label=r["impl"])
    right.set(xlabel="time per output token (ms): p50, p90, p99",
              ylabel="time to first token (s)", title="latency percentiles")
    right.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--modes", default="continuous,static")
    parser.add_argument("--budgets", default=None,
                        help="comma-separated token budgets of the continuous mode (default "
                             "512,2048; --tiny: 64)")
    parser.add_argument("--hf", action="store_true",
                        help="also run HF transformers generate (static batches, own process)")
    parser.add_argument("--out", default="benchmarks/serving.json")
    args = parser.parse_args(argv)
    lengths = ((64, 1024), (16, 512))
    if args.tiny:
        cfg, n = dataclasses.replace(TINY, max_position_embeddings=128), 6
        lengths = ((4, 40), (2, 12))
        prompts, sampling = workload(n, cfg.vocab_size, *lengths)
        base = EngineConfig(page_size=8, token_budget=64, max_num_seqs=4, max_model_len=64,
                            num_pages=64)
        static_batch = 2
    else:
        cfg, n = LLAMA_0_85B, args.requests
        prompts, sampling = workload(n, cfg.vocab_size)
        base = EngineConfig(page_size=16, token_budget=512, max_num_seqs=256,
                            max_model_len=1536)
        static_batch = 32
    model = Llama(cfg)
    params = jax.jit(lambda k: jax.tree.map(
        lambda p: p.astype(cfg.dtype), model.init(k, jnp.zeros((1, 8), jnp.int32))["params"]))(
        jax.random.PRNGKey(0))
    device = jax.devices()[0]
    weight_bytes = sum(p.nbytes for p in jax.tree.leaves(params))
    floor_ms = 1e3 * weight_bytes / _copy_bytes_per_s(1 << 24 if args.tiny else 1 << 30)
    print(f"weights {weight_bytes / 1e9:.2f} GB: weight-read floor of a step {floor_ms:.3f} ms")
    print(f"device: {device.device_kind}, jax {jax.__version__}; {n} requests, "
          f"{sum(map(len, prompts))} prompt tokens, {sum(s.max_tokens for s in sampling)} "
          f"output tokens; model {cfg.num_layers} layers x {cfg.hidden_size}, {cfg.dtype}")
    budgets = [int(b) for b in (args.budgets or ("64" if args.tiny else "512,2048")).split(",")]
    runs = [(mode, budget) for mode in args.modes.split(",")
            for budget in (budgets if mode == "continuous" else budgets[-1:])]
    rows, tokens = [], {}
    for mode, budget in runs:
        config = dataclasses.replace(base, mode=mode, token_budget=budget)
        if mode == "static":
            config = dataclasses.replace(config, max_num_seqs=static_batch)
        if rows:  # the same pool in every mode: the first engine sized it from free memory
            config = dataclasses.replace(config, num_pages=rows[0]["num_pages"])
        r = run(model, params, prompts, sampling, config)
        tokens[mode, budget] = r.pop("tokens")
        r.update(step_ms_mean=1e3 * r["wall_s"] / r["steps"], weight_read_floor_ms=floor_ms)
        rows.append({"config": "workload" if not args.tiny else "tiny", "impl": f"fastattn_{mode}",
                     **r})
        print(f"  {mode:<11} budget {budget:5d} {r['wall_s']:6.1f} s {r['tok_per_s']:8,.0f} tok/s  "
              f"{r['steps']:5d} steps  TTFT {r['ttft_mean_s']:.2f} s  "
              f"TPOT {1e3 * (r['tpot_mean_s'] or 0):.1f} ms  KV fill {r['kv_fill_mean']:.0%}  "
              f"preempted {r['preemptions']}  ready in {r['ready_s']:.1f} s  "
              f"recompiles {r['recompiles_after_warmup']}")
        print("    warm-up: " + ", ".join(f"{k} {v:.1f} s" for k, v in
                                         _warmup_phases(r).items())
              + f"; mean step {r['step_ms_mean']:.2f} ms = "
              f"{r['step_ms_mean'] / floor_ms:.1f}x the weight-read floor")
        if r["device_bytes_in_use_after"] is not None:
            print(f"    after the engine is deleted: {r['device_bytes_in_use_after'] / 1e9:.2f} "
                  f"GB still allocated on the device (the weights: {weight_bytes / 1e9:.2f} GB)")
        _write_quietly(args.out, rows)  # a run cut short keeps the rows it finished
    _compare_tokens(tokens)
    hf_tok_per_s, hf_what = HF_STATIC_TOKENS_PER_S, "HF static anchor of TARGETS.md"
    if args.hf:
        hf = run_hf(cfg, n, static_batch, lengths)
        rows.append({"config": rows[0]["config"], **hf})
        print(f"  hf_generate {hf['wall_s']:8.1f} s {hf['tok_per_s']:10,.0f} tok/s "
              f"(static batches of {static_batch}, {hf['device']}, torch {hf['torch']})")
        hf_tok_per_s, hf_what = hf["tok_per_s"], "HF generate in this run"
    stat = next((r for r in rows if r["impl"] == "fastattn_static"), None)
    for cont in (r for r in rows if r["impl"] == "fastattn_continuous"):
        versus = f"{cont['tok_per_s'] / stat['tok_per_s']:.2f}x static, " if stat else ""
        print(f"  continuous (budget {cont['token_budget']}): {versus}"
              f"{cont['tok_per_s'] / hf_tok_per_s:.1f}x {hf_what} ({hf_tok_per_s:,.0f} tok/s)")
    plot = _plot(rows, os.path.splitext(args.out)[0] + ".png")
    print(f"plot: {plot}")
    return write_results(args.out, rows)


if __name__ == "__main__":
    main()
