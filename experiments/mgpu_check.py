"""Mosaic GPU check: does the Hopper forward kernel compile, agree with cuDNN and our Triton
kernel, and how fast is it next to them?

Question (issue 7): on an H100, does `pallas_kernels.flash_attention_mgpu` reach cuDNN's
forward throughput (~600 TFLOP/s at H=128, T >= 4k) on the team's shapes, and is it correct?

Run (on the GPU machine, from the repo root; well under 8 minutes):
    PYTHONPATH=. python experiments/mgpu_check.py [--configs SUBSTR] [--no-variants]
        [--tiny]
Also times a few MosaicBlockSizes variants of ours (VARIANTS, per head dim) on each config.
Prints one line per (config, impl) as it goes (errors in full, truncated to ~3000 chars),
then a table: TFLOP/s of ours (mgpu), cuDNN and our Triton kernel (pallas), ours/cudnn, and
ours' relative L2 error against cuDNN and against Triton (out, and lse against Triton).
Writes JSON {device, jax, date, rows: [...]} to $OUT/mgpu_check.json (OUT defaults to ./out).
FLOPs = 4 B N T S H, halved for causal. --tiny: one small config, ours in interpret mode
against the Triton kernel (interpret mode too on a CPU); the tests run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import traceback

import jax
import jax.numpy as jnp

import fastattn
from experiments.bench_attention import rel_err, time_fn
from experiments.results import write_results
from pallas_kernels.flash_attention_mgpu import MosaicBlockSizes, flash_attention_mgpu, kv_bytes

# (name, B, T, N, H, causal[, K]): T = S, bf16; K kv heads (default K = N, MHA)
CONFIGS = [
    ("b4 s4096 h16 d128 causal", 4, 4096, 16, 128, True),
    ("b4 s4096 h16 d128 full", 4, 4096, 16, 128, False),
    ("b16 s1024 h16 d128 causal", 16, 1024, 16, 128, True),
    ("b16 s1024 h16 d128 full", 16, 1024, 16, 128, False),
    ("b4 s4096 h32 d64 full", 4, 4096, 32, 64, False),
    ("b16 s1024 h32 d64 full", 16, 1024, 32, 64, False),
    ("b16 s1024 h32 d64 causal", 16, 1024, 32, 64, True),
    ("b4 s4096 h32 d64 causal", 4, 4096, 32, 64, True),
    ("b1 s16384 h32 d64 full", 1, 16384, 32, 64, False),
    ("b1 s16384 h32 d64 causal", 1, 16384, 32, 64, True),
    ("b1 s16384 h16 d128 causal", 1, 16384, 16, 128, True),
    ("b1 s16384 h16 d128 full", 1, 16384, 16, 128, False),
    # The 0.85B train step's attention (bench_train: H = 64, causal, T = 2048, 32 query
    # heads on 8 kv heads): where the step's last 0.9 ms to cuDNN is (BENCHMARKS.md).
    ("b8 s2048 h32/8 d64 causal (train step)", 8, 2048, 32, 64, True, 8),
]
TINY = [("b1 s128 h2 d64 causal (interpret)", 1, 128, 2, 64, True)]


def chosen(name: str, spec: str) -> bool:
    """name contains one of spec's comma-separated parts ("" keeps all)."""
    return any(part in name for part in spec.split(","))


def chosen_variants(variants: dict, spec: str) -> dict:
    """The variants whose name contains one of spec's comma-separated parts ("" keeps all)."""
    return {name: bs for name, bs in variants.items() if chosen(name, spec)}


def launched_as_default(variant: str, bs, cfg, default_for):
    """bs launched in the config's default order (default_for: the block-size class's
    rule), unless the variant's name says which ("head-major", "tile-major"): the variants
    then differ from the default in what their names say."""
    if "major" in variant:
        return bs
    _, B, T, _, K, H, causal = unpack(cfg)
    kv = jax.ShapeDtypeStruct((B, T, K, H), jnp.bfloat16)
    default = default_for(q_len=T, kv_len=T, head_dim=H, causal=causal,
                          kv_bytes=kv_bytes(kv, kv))
    return dataclasses.replace(bs, head_major=default.head_major)


def unpack(cfg):
    """(name, B, T, N, K, H, causal) of a config tuple (K = N when it names none)."""
    name, B, T, N, H, causal, *kv_heads = cfg
    return name, B, T, N, (kv_heads or [N])[0], H, causal


# Tried besides the default, per head dim (name -> MosaicBlockSizes).
VARIANTS = {
    128: {
        "bk64 st4": MosaicBlockSizes(block_k=64, num_stages=4),
        "regs 232/40": MosaicBlockSizes(block_k=128, num_stages=2, consumer_registers=232,
                                        producer_registers=40),
        # The scheduling options (session 8) around the default (128-key tiles, 2 stages,
        # the softmax under PV, turns): the session 7 default without the overlap, no turns.
        "no overlap": MosaicBlockSizes(block_k=128, num_stages=2),
        "no-pingpong": MosaicBlockSizes(block_k=128, num_stages=2, pingpong=False),
        "overlap no-pingpong": MosaicBlockSizes(block_k=128, num_stages=2, pingpong=False,
                                                overlap_softmax=True),
        "persistent overlap": MosaicBlockSizes(block_k=128, num_stages=2,
                                               overlap_softmax=True, persistent=True),
        "persistent": MosaicBlockSizes(block_k=128, num_stages=2, persistent=True),
        # Session 10: the default launched head by head (each head's query tiles side by
        # side, its K/V from L2), on a grid or persistent.
        "head-major": MosaicBlockSizes(block_k=128, num_stages=2, overlap_softmax=True,
                                       head_major=True),
        "tile-major": MosaicBlockSizes(block_k=128, num_stages=2, overlap_softmax=True),
        "tile-major persistent overlap": MosaicBlockSizes(block_k=128, num_stages=2,
                                                          overlap_softmax=True,
                                                          persistent=True),
        "head-major persistent": MosaicBlockSizes(block_k=128, num_stages=2,
                                                  overlap_softmax=True, persistent=True,
                                                  head_major=True),
        # Session 14: 192-key tiles (FA-3 takes 176 on rows without a right bound; Mosaic's
        # wgmma takes contractions in steps of 64), two stages next to Q with the lse rows
        # stored from registers; T = 1024, 4096 and 16384 end in a key tail.
        "lse-reg": MosaicBlockSizes(block_k=128, num_stages=2, overlap_softmax=True,
                                    lse_through_smem=False),
        "bk192 ov lse-reg": MosaicBlockSizes(block_k=192, num_stages=2, overlap_softmax=True,
                                             lse_through_smem=False),
        "bk192 lse-reg": MosaicBlockSizes(block_k=192, num_stages=2, lse_through_smem=False),
    },
    # Around the session 7 default (256-query tiles of 64-key steps, 4 stages, turns, no
    # overlap), then around the session 8 one (the same tiles, no turns, overlap). Neither
    # list repeats the default, which every run times anyway.
    64: {
        "bq128 bk128 st4": MosaicBlockSizes(block_k=128, num_stages=4),
        "bq128 bk64 st4": MosaicBlockSizes(block_k=64, num_stages=4),
        "bq256 bk64 st2": MosaicBlockSizes(block_q=256, block_k=64, num_stages=2),
        "bq256 bk64 st6": MosaicBlockSizes(block_q=256, block_k=64, num_stages=6),
        "bq256 bk64 regs 232/40": MosaicBlockSizes(block_q=256, block_k=64, num_stages=4,
                                                   consumer_registers=232,
                                                   producer_registers=40),
        # The scheduling options (session 8): the softmax under PV on tiles seen in full,
        # no turns. Measured worse in session 8 and dropped: bq256 bk128 st2 (spills),
        # overlap on masked tiles too, overlap bq128 bk128 st4. Four 64-row consumers hung
        # on the H100 in session 8 at 120 registers each, more than the producer gives back
        # (flash_attention_mgpu.most_consumer_registers); back at 112 in session 9, and the
        # default since (no overlap, 4 stages). Around it:
        "4 consumers np-ov bq256 bk64 st4": MosaicBlockSizes(
            block_q=256, block_k=64, num_stages=4, consumers=4, pingpong=False,
            overlap_softmax=True),
        "4 consumers np bq256 bk64 st2": MosaicBlockSizes(
            block_q=256, block_k=64, num_stages=2, consumers=4, pingpong=False),
        "4 consumers np bq256 bk64 st3": MosaicBlockSizes(
            block_q=256, block_k=64, num_stages=3, consumers=4, pingpong=False),
        "4 consumers np bq256 bk64 st6": MosaicBlockSizes(
            block_q=256, block_k=64, num_stages=6, consumers=4, pingpong=False),
        "np-ov bq256 bk64 st4 (session 8 default)": MosaicBlockSizes(
            block_q=256, block_k=64, num_stages=4, pingpong=False, overlap_softmax=True),
        # Around the session 8 default (no turns, overlap, 256 x 64, 4 stages):
        "persistent np-ov bq256 bk64 st4": MosaicBlockSizes(
            block_q=256, block_k=64, num_stages=4, pingpong=False, overlap_softmax=True,
            persistent=True),
        "persistent np-ov bq256 bk64 st2": MosaicBlockSizes(
            block_q=256, block_k=64, num_stages=2, pingpong=False, overlap_softmax=True,
            persistent=True),
        "np-ov bq256 bk64 st2": MosaicBlockSizes(block_q=256, block_k=64, num_stages=2,
                                                 pingpong=False, overlap_softmax=True),
        "np-ov bq256 bk64 st3": MosaicBlockSizes(block_q=256, block_k=64, num_stages=3,
                                                 pingpong=False, overlap_softmax=True),
        "np-ov bq256 bk64 st6": MosaicBlockSizes(block_q=256, block_k=64, num_stages=6,
                                                 pingpong=False, overlap_softmax=True),
        "np-ov bq128 bk128 st4": MosaicBlockSizes(block_k=128, num_stages=4, pingpong=False,
                                                  overlap_softmax=True),
        "np-ov bq128 bk64 st4": MosaicBlockSizes(block_k=64, num_stages=4, pingpong=False,
                                                 overlap_softmax=True),
        "np bq128 bk128 st4": MosaicBlockSizes(block_k=128, num_stages=4, pingpong=False),
        "np-ov bq256 bk64 st4 regs 232/40": MosaicBlockSizes(
            block_q=256, block_k=64, num_stages=4, pingpong=False, overlap_softmax=True,
            consumer_registers=232, producer_registers=40),
        "overlap bq256 bk64 st4": MosaicBlockSizes(block_q=256, block_k=64, num_stages=4,
                                                   overlap_softmax=True),
        "no-pingpong bq256 bk64 st4": MosaicBlockSizes(block_q=256, block_k=64,
                                                       num_stages=4, pingpong=False),
        "no overlap, turns bq256 bk64 st4": MosaicBlockSizes(block_q=256, block_k=64,
                                                             num_stages=4),  # session 7's
        # Session 10: the default launched head by head (see the H = 128 ones).
        "head-major 4 consumers": MosaicBlockSizes(block_q=256, block_k=64, num_stages=4,
                                                   consumers=4, pingpong=False,
                                                   head_major=True),
        "tile-major 4 consumers": MosaicBlockSizes(block_q=256, block_k=64, num_stages=4,
                                                   consumers=4, pingpong=False),
        # Session 10: the full rows' default (softmax under PV) and the causal rows' one
        # (not), each tried on the other rows; the persistent grid with the overlap.
        "4 consumers np bq256 bk64 st4": MosaicBlockSizes(block_q=256, block_k=64,
                                                          num_stages=4, consumers=4,
                                                          pingpong=False),
        # Session 10, snake-order persistent shares on causal rows, in either launch order:
        "persistent 4 consumers np": MosaicBlockSizes(
            block_q=256, block_k=64, num_stages=4, consumers=4, pingpong=False,
            persistent=True),
        "tile-major persistent 4 consumers np": MosaicBlockSizes(
            block_q=256, block_k=64, num_stages=4, consumers=4, pingpong=False,
            persistent=True),
        "4 consumers np-ov st2": MosaicBlockSizes(block_q=256, block_k=64, num_stages=2,
                                                  consumers=4, pingpong=False,
                                                  overlap_softmax=True),
        "4 consumers np-ov st3": MosaicBlockSizes(block_q=256, block_k=64, num_stages=3,
                                                  consumers=4, pingpong=False,
                                                  overlap_softmax=True),
        "4 consumers np-ov st6": MosaicBlockSizes(block_q=256, block_k=64, num_stages=6,
                                                  consumers=4, pingpong=False,
                                                  overlap_softmax=True),
        "persistent 4 consumers np-ov": MosaicBlockSizes(
            block_q=256, block_k=64, num_stages=4, consumers=4, pingpong=False,
            overlap_softmax=True, persistent=True),
        "head-major persistent 4 consumers": MosaicBlockSizes(
            block_q=256, block_k=64, num_stages=4, consumers=4, pingpong=False,
            persistent=True, head_major=True),
        # Session 12: the H = 128 default's schedule (two 64-row consumers, 128-key tiles,
        # turns, the softmax under PV) at H = 64, the shape of cuDNN's H = 64 kernel
        # (64x128x64, 3 warpgroups); fewer instructions per key than 64-key steps.
        "h128 schedule st4": MosaicBlockSizes(block_k=128, num_stages=4, overlap_softmax=True),
        "h128 schedule st6": MosaicBlockSizes(block_k=128, num_stages=6, overlap_softmax=True),
        "h128 schedule st4 persistent": MosaicBlockSizes(block_k=128, num_stages=4,
                                                         overlap_softmax=True, persistent=True),
        # Session 14: FA-3's H = 64 tile (three 64-row consumers at 160 registers, 192 x 128;
        # T = 4096 and 16384 end in a ragged query tile), with and without the softmax
        # under PV, over the pipeline's depth.
        "3 consumers ov st4": MosaicBlockSizes(block_q=192, block_k=128, num_stages=4,
                                               consumers=3, pingpong=False,
                                               overlap_softmax=True),
        "3 consumers ov st3": MosaicBlockSizes(block_q=192, block_k=128, num_stages=3,
                                               consumers=3, pingpong=False,
                                               overlap_softmax=True),
        "3 consumers ov st6": MosaicBlockSizes(block_q=192, block_k=128, num_stages=6,
                                               consumers=3, pingpong=False,
                                               overlap_softmax=True),
        "3 consumers np st4": MosaicBlockSizes(block_q=192, block_k=128, num_stages=4,
                                               consumers=3, pingpong=False),
        "3 consumers ov bk64 st6": MosaicBlockSizes(block_q=192, block_k=64, num_stages=6,
                                                    consumers=3, pingpong=False,
                                                    overlap_softmax=True),
        "3 consumers np persistent": MosaicBlockSizes(block_q=192, block_k=128, num_stages=4,
                                                      consumers=3, pingpong=False,
                                                      persistent=True),
        # ... and on the causal rows, 64-key steps as the four-consumer default there (its
        # diagonal tiles mask half as many scores as 128-key ones) with 160 registers.
        "3 consumers np bk64 st4": MosaicBlockSizes(block_q=192, block_k=64, num_stages=4,
                                                    consumers=3, pingpong=False),
        "3 consumers np bk64 st6": MosaicBlockSizes(block_q=192, block_k=64, num_stages=6,
                                                    consumers=3, pingpong=False),
    },
}
TIMING = {"min_time": 0.2, "samples": 7}  # median of 7 batches of back-to-back calls
TINY_TIMING = {"min_time": 0.0, "min_iters": 1, "samples": 1}  # the interpreter takes seconds


def _error_text(e: BaseException) -> str:
    text = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    return text if len(text) <= 3000 else text[:1500] + "\n[...]\n" + text[-1500:]


def _impls(causal, block_sizes, interpret):
    """name -> jitted fn(q, k, v) -> (out, lse or None)."""
    ours = jax.jit(lambda q, k, v: flash_attention_mgpu(
        q, k, v, causal=causal, block_sizes=block_sizes, interpret=interpret))
    pallas = jax.jit(lambda q, k, v: fastattn.attention(
        q, k, v, causal=causal, return_lse=True, implementation="pallas"))
    cudnn = jax.jit(lambda q, k, v: (jax.nn.dot_product_attention(
        q, k, v, is_causal=causal, implementation="cudnn"), None))
    return {"mgpu": ours, "cudnn": cudnn, "pallas": pallas}


def run_config(cfg, *, variant=None, block_sizes=None, interpret=False,
               peers=("cudnn", "pallas"), peer_results=None):
    """Rows for one config; returns (rows, {impl: (out, lse)}). peer_results: the peers'
    outputs from an earlier run of the same config (block-size variants skip the peers)."""
    name, B, T, N, K, H, causal = unpack(cfg)
    label = name if variant is None else f"{name} [{variant}]"
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (B, T, N, H), jnp.bfloat16)
    k, v = (jax.random.normal(key, (B, T, K, H), jnp.bfloat16) for key in (kk, kv))
    flops = 4 * B * N * T * T * H * (0.5 if causal else 1.0)
    impls = _impls(causal, block_sizes, interpret)
    wanted = ["mgpu", *peers]
    rows, results = [], dict(peer_results or {})
    for impl in wanted:
        row = {"config": label, "impl": impl, "ms": None, "tflops": None}
        rows.append(row)
        try:
            t0 = time.perf_counter()
            out, lse = jax.block_until_ready(impls[impl](q, k, v))
            row["first_call_s"] = time.perf_counter() - t0  # compile + one run
            results[impl] = (out, lse)
            row["ms"] = time_fn(impls[impl], q, k, v, **(TINY_TIMING if interpret else TIMING))
            row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            print(f"{label:44s} {impl:7s} {row['ms']:9.3f} ms {row['tflops']:7.1f} TFLOP/s "
                  f"(first call {row['first_call_s']:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 -- one failure must not stop the others
            row["error"] = _error_text(e)
            print(f"{label:44s} {impl:7s} ERROR\n{row['error']}", flush=True)
    if "mgpu" in results:
        out, lse = results["mgpu"]
        mine = rows[0]
        for peer in ("cudnn", "pallas"):
            if peer in results:
                mine[f"err_vs_{peer}"] = rel_err(out, results[peer][0])
        if "pallas" in results:
            ref_lse = results["pallas"][1]
            mine["lse_err_vs_pallas"] = float(jnp.max(jnp.abs(lse - ref_lse)))
        errs = {key: f"{val:.2e}" for key, val in mine.items() if "err_vs" in key}
        print(f"{label:44s} mgpu    errors {errs}", flush=True)
    return rows, results


def print_table(rows):
    by = {(r["config"], r["impl"]): r for r in rows}
    configs = list(dict.fromkeys(r["config"] for r in rows))
    width = max(len(c) for c in configs) + 2
    cols = ["mgpu", "cudnn", "pallas", "mgpu/cudnn", "err/cudnn", "err/pallas", "lse err"]
    print("\nTFLOP/s (err = failed, - = not run); errors are relative L2 (lse: max abs)")
    print("config".ljust(width) + "".join(c.rjust(11) for c in cols))
    for c in configs:
        cells = []
        for impl in ("mgpu", "cudnn", "pallas"):
            r = by.get((c, impl))
            cells.append("-" if r is None else "err" if "error" in r else f"{r['tflops']:.1f}")
        ours, cudnn = by.get((c, "mgpu"), {}), by.get((c, "cudnn"), {})
        ratio = (ours.get("tflops") or 0) / (cudnn.get("tflops") or float("inf"))
        cells.append(f"{ratio:.2f}" if ratio else "-")
        for key in ("err_vs_cudnn", "err_vs_pallas", "lse_err_vs_pallas"):
            cells.append(f"{ours[key]:.1e}" if key in ours else "-")
        print(c.ljust(width) + "".join(x.rjust(11) for x in cells))


def parse_args(argv, doc: str, json_name: str):
    """The command line of the Hopper kernel checks (this one and mgpu_bwd_check.py)."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--configs", default="",
                   help="keep configs whose name contains one of these (comma-separated)")
    p.add_argument("--no-variants", action="store_true", help="default block sizes only")
    p.add_argument("--variants", default="",
                   help="only the variants whose name has one of these (comma-separated)")
    p.add_argument("--tiny", action="store_true", help="one small config, interpret mode (CPU)")
    p.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), json_name))
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv, __doc__, "mgpu_check.json")
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, {device.device_kind} "
          f"(compute capability {getattr(device, 'compute_capability', '?')})", flush=True)
    start = time.perf_counter()
    rows = []
    for cfg in TINY if args.tiny else CONFIGS:
        if not chosen(cfg[0], args.configs):
            continue
        new, results = run_config(cfg, interpret=args.tiny,
                                  peers=("pallas",) if args.tiny else ("cudnn", "pallas"))
        rows += new
        if not (args.no_variants or args.tiny):
            peers = {impl: res for impl, res in results.items() if impl != "mgpu"}
            head_dim = unpack(cfg)[5]
            for variant, bs in chosen_variants(VARIANTS.get(head_dim, {}),
                                               args.variants).items():
                bs = launched_as_default(variant, bs, cfg, MosaicBlockSizes.default_for)
                rows += run_config(cfg, variant=variant, block_sizes=bs, peers=(),
                                   peer_results=peers)[0]
        del results
        write_results(args.out, rows)  # after every config: a cut run keeps what it did
    print_table(rows)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return write_results(args.out, rows)


if __name__ == "__main__":
    main()
