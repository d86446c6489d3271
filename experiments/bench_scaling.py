"""Multi-GPU scaling: data- and tensor-parallel training, tensor-parallel and replicated serving.

Question: on the GPUs of one host, how much of N x one GPU's throughput do our meshes keep,
          and do sharded runs give the single-device results?
Run:      NCCL_NVLS_ENABLE=0 PYTHONPATH=. python experiments/bench_scaling.py
              [--parts correctness,train,engine] [--gpus N] [--model 0.85b|8b]
              [--out benchmarks/scaling.json]
          --tiny: small shapes on fake CPU devices (XLA_FLAGS=
              --xla_force_host_platform_device_count=N), what CI runs.
Prints:   correctness (greedy tokens of a sharded engine and a router vs one device; training
          losses on data- / tensor-parallel meshes vs one device, f32); train-step tokens/s of
          the 0.85B model on 1 GPU and on data, tensor and FSDP meshes of N, with scaling
          efficiency = tokens/s / (N x one GPU's); engine output tokens/s on one GPU, tensor
          parallel over N, and N data-parallel replicas behind the Router. Rows go to JSON
          (written after every part, so a run cut short keeps what it measured).
NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0): it can take shared GPUs out of service.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")

import jax
import jax.numpy as jnp
import numpy as np

from experiments.results import write_results
from fastattn import sharding
from fastattn.data import pack_documents
from fastattn.engine import Engine, EngineConfig
from fastattn.router import Router
from fastattn.sampling import SamplingParams
from fastattn.training import TrainConfig, train
from models import LLAMA3_8B, LLAMA_0_85B, TINY, Llama, train_flops_per_token

# f32 so that sharded and single-device results can be compared closely; 8 kv heads split
# over 2, 4 or 8 devices.
CHECK_CONFIG = dataclasses.replace(TINY, vocab_size=512, hidden_size=256, num_layers=2,
                                   num_heads=8, num_kv_heads=8, intermediate_size=512,
                                   max_position_embeddings=256, dtype="float32")


def _params(model, dtype):
    return jax.jit(lambda k: jax.tree.map(lambda p: p.astype(dtype), model.init(
        k, jnp.zeros((1, 8), jnp.int32))["params"]))(jax.random.PRNGKey(0))


def _dataset(vocab: int, seq_len: int, rows: int):
    rng = np.random.default_rng(0)
    return pack_documents(rng.integers(0, vocab, (rows, seq_len)).tolist(), seq_len)


def _workload(n: int, vocab: int, prompt_range, output_range):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, vocab, int(p)).tolist()
               for p in rng.integers(prompt_range[0], prompt_range[1] + 1, n)]
    sampling = [SamplingParams(temperature=0.0, max_tokens=int(o), ignore_eos=True)
                for o in rng.integers(output_range[0], output_range[1] + 1, n)]
    return prompts, sampling


def correctness(n: int, emit, requests: int = 32) -> None:
    """Greedy tokens: one device vs tensor parallel over n vs n replicas. Training losses of
    4 steps: one device vs data parallel n vs tensor parallel n (f32)."""
    model = Llama(CHECK_CONFIG)
    params = _params(model, jnp.float32)
    prompts, sampling = _workload(requests, CHECK_CONFIG.vocab_size, (4, 120), (4, 24))
    config = EngineConfig(page_size=16, num_pages=512, token_budget=128, max_num_seqs=16,
                          max_model_len=160)
    single = [c.token_ids for c in Engine(model, params, config).generate(prompts, sampling)]
    rows = []
    for name, make in (
            (f"engine tp{n}", lambda: Engine(model, params, config,
                                               mesh=sharding.make_mesh(model=n))),
            (f"router dp{n}", lambda: Router.build(model, params, config, replicas=n))):
        tokens = [c.token_ids for c in make().generate(prompts, sampling)]
        same = sum(a == b for a, b in zip(tokens, single))
        rows.append({"config": "correctness", "impl": name, "identical_requests": same,
                     "requests": len(prompts), "ok": same == len(prompts)})
    data = _dataset(CHECK_CONFIG.vocab_size, 64, 64)
    tc = TrainConfig(steps=4, batch_size=4 * n, progress=False, log_every=1)
    losses = {}
    for name, mesh in (("one device", None), (f"dp{n}", sharding.make_mesh(data=n)),
                       (f"tp{n}", sharding.make_mesh(model=n))):
        result = train(tc, model=model, dataset=data, mesh=mesh)
        losses[name] = [r["loss"] for r in result.history]
    for name in (f"dp{n}", f"tp{n}"):
        diff = float(np.max(np.abs(np.subtract(losses[name], losses["one device"]))))
        rows.append({"config": "correctness", "impl": f"train {name}", "max_loss_diff": diff,
                     "losses": losses[name], "reference_losses": losses["one device"],
                     "ok": diff < 1e-4})
    for r in rows:
        print(f"  {r['impl']:<14} {'OK' if r['ok'] else 'MISMATCH'}  "
              + ", ".join(f"{k} {v}" for k, v in r.items()
                          if k in ("identical_requests", "max_loss_diff")), flush=True)
        emit(r)


def train_scaling(n: int, cfg, seq_len: int, rows_per_gpu: int, steps: int, emit) -> None:
    """Train-step tokens/s on 1 GPU and on meshes of n: data parallel (n x the rows),
    tensor parallel (the same rows), FSDP (data parallel with sharded state), and FSDP x
    tensor parallel (n / 2 x 2) when n >= 4. Efficiency is per-GPU throughput over that of
    the first variant that ran (one GPU; for a model whose training state does not fit one
    GPU, e.g. the 8B shape, the first mesh that fits)."""
    model = Llama(cfg)
    data = _dataset(cfg.vocab_size, seq_len, rows_per_gpu * n * 2)
    flops = train_flops_per_token(cfg, seq_len)
    variants = [("1 GPU", None, False, rows_per_gpu),
                (f"dp{n}", dict(data=n), False, rows_per_gpu * n),
                (f"tp{n}", dict(model=n), False, rows_per_gpu),
                (f"fsdp{n}", dict(data=n), True, rows_per_gpu * n)]
    if n >= 4:
        variants.append((f"fsdp{n // 2}xtp2", dict(data=n // 2, model=2), True,
                         rows_per_gpu * n // 2))
    base = None  # tokens/s per GPU of the first variant that ran
    for name, axes, fsdp, batch in variants:
        mesh = None if axes is None else sharding.make_mesh(**axes)
        gpus = 1 if mesh is None else mesh.devices.size
        tc = TrainConfig(steps=steps, batch_size=batch, progress=False, log_every=steps)
        try:
            result = train(tc, model=model, dataset=data, mesh=mesh, fsdp=fsdp,
                           flops_per_token=flops)
        except Exception as e:  # e.g. out of memory: report and go on
            emit({"config": f"train {cfg.num_layers}L d{cfg.hidden_size} T{seq_len}",
                  "impl": name, "error": str(e)[:1500]})
            print(f"  {name:<8} ERROR {str(e)[:300]}", flush=True)
            continue
        tps = result.tokens_per_s
        base = base or tps / gpus
        row = {"config": f"train {cfg.num_layers}L d{cfg.hidden_size} T{seq_len}", "impl": name,
               "gpus": gpus, "rows_per_step": batch, "tokens_per_s": tps, "mfu": result.mfu,
               "scaling_efficiency": tps / (gpus * base)}
        emit(row)
        del result
        gc.collect()
        eff = f"{100 * row['scaling_efficiency']:.0f}%"
        mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] else "-"
        print(f"  {name:<8} {gpus} GPU  {batch:3d} rows  {tps:12,.0f} tok/s  MFU {mfu}  "
              f"efficiency {eff}", flush=True)


def engine_scaling(n: int, cfg, requests: int, config: EngineConfig, prompt_range,
                   output_range, emit) -> None:
    """Output tokens/s of one engine on one GPU, one tensor parallel over n, and n replicas
    (one GPU each) behind the Router, on the same workload."""
    model = Llama(cfg)
    params = _params(model, cfg.dtype)
    prompts, sampling = _workload(requests, cfg.vocab_size, prompt_range, output_range)
    base = None
    for name, gpus, make in (
            ("1 GPU", 1, lambda: [Engine(model, params, config)]),
            (f"tp{n}", n, lambda: [Engine(model, params, config,
                                          mesh=sharding.make_mesh(model=n))]),
            (f"router dp{n}", n, lambda: Router.build(model, params, config,
                                                        replicas=n).engines)):
        try:
            engines = make()
            ready = sum(e.warmup() for e in engines)
            server = engines[0] if len(engines) == 1 else Router(engines)
            start = time.perf_counter()
            out = server.generate(prompts, sampling)
            wall = time.perf_counter() - start
        except Exception as e:
            emit({"config": "engine", "impl": name, "error": str(e)[:1500]})
            print(f"  {name:<12} ERROR {str(e)[:300]}", flush=True)
            continue
        tokens = sum(len(c.token_ids) for c in out)
        tps = tokens / wall
        base = tps if name == "1 GPU" else base
        row = {"config": f"engine {cfg.num_layers}L d{cfg.hidden_size} {requests} req",
               "impl": name, "gpus": gpus, "tok_per_s": tps, "wall_s": wall,
               "compile_s": ready, "scaling_efficiency": tps / (gpus * base)}
        print(f"  {name:<12} {gpus} GPU  {tps:10,.0f} tok/s  wall {wall:6.1f} s  "
              f"efficiency {100 * row['scaling_efficiency']:.0f}%", flush=True)
        emit(row)
        del engines, server
        gc.collect()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="correctness,train,engine")
    parser.add_argument("--gpus", type=int, default=None, help="mesh size (default: all)")
    parser.add_argument("--model", choices=("0.85b", "8b"), default="0.85b",
                        help="the 0.85B Llama of TARGETS.md or the Llama-3-8B shape "
                             "(random weights)")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default="benchmarks/scaling.json")
    args = parser.parse_args(argv)
    n = args.gpus or len(jax.devices())
    if n < 2:
        raise SystemExit(f"bench_scaling needs >= 2 devices, found {len(jax.devices())}; on a "
                         "CPU set XLA_FLAGS=--xla_force_host_platform_device_count=8")
    print(f"{n} x {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    if args.tiny:
        train_cfg = dataclasses.replace(CHECK_CONFIG, dtype="bfloat16")
        train_args = (train_cfg, 64, 2, 3)
        engine_args = (train_cfg, 8, EngineConfig(page_size=16, num_pages=256, token_budget=64,
                                                  max_num_seqs=8, max_model_len=128),
                       (8, 60), (4, 16))
    elif args.model == "8b":  # 2 rows of 2048 per GPU: the activations of 32 layers fit
        train_args = (LLAMA3_8B, 2048, 2, 4)
        engine_args = (LLAMA3_8B, 128, EngineConfig(
            page_size=16, token_budget=512, max_num_seqs=128, max_model_len=1024,
            gpu_memory_utilization=0.4), (64, 512), (16, 256))
    else:
        train_args = (LLAMA_0_85B, 2048, 8, 6)
        engine_args = (LLAMA_0_85B, 128, EngineConfig(
            page_size=16, token_budget=512, max_num_seqs=128, max_model_len=1024,
            gpu_memory_utilization=0.4), (64, 512), (16, 256))
    rows: list[dict] = []

    def emit(row: dict) -> None:  # saved at once: a run cut short keeps what it measured
        rows.append(row)
        write_results(args.out, rows, gpus=n)

    for part in args.parts.split(","):
        print(f"== {part}", flush=True)
        if part == "correctness":
            correctness(n, emit, requests=8 if args.tiny else 32)
        elif part == "train":
            train_scaling(n, *train_args, emit)
        elif part == "engine":
            engine_scaling(n, *engine_args, emit)
        else:
            raise ValueError(f"--parts: unknown part {part!r}")
    return write_results(args.out, rows, gpus=n)


if __name__ == "__main__":
    main()
