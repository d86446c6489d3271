"""Attention check: does every attention implementation agree, and how fast is each here?

Run:    PYTHONPATH=. python experiments/attention_check.py [--tiny]
Prints: a table of each implementation's error against the float32 reference and its time
        for one causal GQA attention (forward and forward + backward) on this machine.
        On a CPU the Pallas kernels run in interpret mode (correct, slow); on a GPU they are
        compiled through Triton.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import fastattn

DEFAULT = dict(B=2, T=256, N=8, K=2, H=64)
TINY = dict(B=1, T=64, N=4, K=2, H=32)


def _time(fn, *args, repeats=3):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a smaller shape (seconds)")
    args = parser.parse_args(argv)
    shape = TINY if args.tiny else DEFAULT
    B, T, N, K, H = (shape[x] for x in "BTNKH")
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16)
               for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
    print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}")
    print(f"causal GQA attention, bf16: B={B} T=S={T} N={N} query heads on K={K} kv heads, H={H}")
    print(f"default implementation here: "
          f"{fastattn.default_implementation(q, k, causal=True)!r}\n")

    def forward(impl):
        return jax.jit(lambda q, k, v: fastattn.attention(q, k, v, causal=True, implementation=impl))

    def forward_backward(impl):
        loss = lambda q, k, v: jnp.sum(fastattn.attention(
            q, k, v, causal=True, implementation=impl).astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    oracle = forward("reference")(*(x.astype(jnp.float32) for x in (q, k, v)))
    rows = []
    for impl in tqdm(["reference", "xla", "pallas"], desc="implementations", unit="impl"):
        out = forward(impl)(q, k, v)
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - oracle)))
        rows.append((impl, err, _time(forward(impl), q, k, v),
                     _time(forward_backward(impl), q, k, v)))

    print(f"\n{'implementation':<16}{'max |err| vs f32':>18}{'fwd ms':>10}{'fwd+bwd ms':>12}")
    for impl, err, fwd_ms, bwd_ms in rows:
        print(f"{impl:<16}{err:>18.2e}{fwd_ms:>10.1f}{bwd_ms:>12.1f}")
    worst = max(err for _, err, _, _ in rows)
    print(f"\nall implementations agree with the float32 reference to {worst:.1e} "
          "(bf16 rounding is ~4e-3 relative)")
    return rows


if __name__ == "__main__":
    main()
