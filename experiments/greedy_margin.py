"""How stable is a greedy token of the random-weight serving model under bf16 rounding?

Question: bench_serving's runs (continuous vs static, budget 512 vs 2048) give different greedy
          tokens on the random-weight 0.85B Llama in bf16. Is that rounding (near-tied logits
          that any change of batch shape can flip) or a bug? Measure how far apart the top two
          logits are, how far bf16 logits are from f32 ones, and how often the bf16 argmax
          differs from the f32 argmax, on one prompt through the same weights.
Run:      PYTHONPATH=. python experiments/greedy_margin.py [--tokens 96] [--tiny]
          (CPU is enough: one forward pass per dtype)
Prints:   median top-1 / top-2 gap of the f32 logits, median over positions of the largest
          |bf16 - f32| logit difference, and the share of positions whose argmax agrees.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from models import LLAMA_0_85B, TINY, Llama


def margins(config, tokens: int) -> dict[str, float]:
    model = Llama(config)
    # The serving benchmark's weights: PRNGKey(0), cast to the model's dtype.
    params = jax.jit(lambda k: jax.tree.map(lambda p: p.astype(config.dtype), model.init(
        k, jnp.zeros((1, 8), jnp.int32))["params"]))(jax.random.PRNGKey(0))
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (1, tokens)))
    logits = {}
    for dtype in ("float32", "bfloat16"):
        m = Llama(dataclasses.replace(config, dtype=dtype))
        p = jax.tree.map(lambda x: x.astype(dtype), params)
        logits[dtype] = np.asarray(jax.jit(lambda p, t: m.apply({"params": p}, t))(
            p, prompt)[0].astype(jnp.float32))
    f32, bf16 = logits["float32"], logits["bfloat16"]
    top2 = np.sort(f32, axis=-1)[:, -2:]
    return {"gap_median": float(np.median(top2[:, 1] - top2[:, 0])),
            "bf16_error_median": float(np.median(np.abs(bf16 - f32).max(axis=-1))),
            "argmax_agreement": float(np.mean(f32.argmax(-1) == bf16.argmax(-1)))}


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--tiny", action="store_true", help="the tiny model (CI)")
    args = parser.parse_args(argv)
    config = TINY if args.tiny else LLAMA_0_85B
    r = margins(config, args.tokens)
    print(f"top-1 / top-2 logit gap (f32), median over positions: {r['gap_median']:.4f}")
    print(f"largest |bf16 - f32| logit difference, median over positions: "
          f"{r['bf16_error_median']:.4f}")
    print(f"positions whose bf16 argmax is the f32 argmax: {r['argmax_agreement']:.1%}")
    return r


if __name__ == "__main__":
    main()
