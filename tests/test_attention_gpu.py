"""The conformance suite on a real GPU: bf16, T up to 4096, every head dim, compiled kernels.

Skipped on a CPU (CI); run on the GPU machine with
    PYTHONPATH=. python -m pytest -q tests/test_attention_gpu.py
"""

import jax
import pytest

from tests.attention_cases import Case
from tests.test_attention_conformance import _check_against_oracle

pytestmark = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")

HEAD_DIMS = [32, 40, 64, 80, 96, 111, 128, 256]

CASES = (
    [Case(2, 1000, 1000, 4, 2, h, dtype="bfloat16", causal=True) for h in HEAD_DIMS]
    + [Case(1, 4096, 4096, 4, 1, 128, dtype="bfloat16"),
       Case(1, 4096, 4096, 4, 1, 128, dtype="bfloat16", causal=True),
       Case(1, 4096, 4096, 2, 2, 64, dtype="bfloat16", window=(1024, 0)),
       Case(1, 1, 4096, 8, 1, 128, dtype="bfloat16", causal=True),
       Case(1, 17, 4095, 16, 2, 128, dtype="float16", causal=True),
       Case(2, 1025, 513, 8, 8, 64, dtype="bfloat16", causal=True),
       Case(2, 777, 777, 4, 2, 128, dtype="bfloat16", segments=True),
       Case(1, 2048, 2048, 4, 4, 128, dtype="bfloat16", causal=True, softcap=30.0),
       Case(1, 500, 700, 4, 2, 64, dtype="float32", window=(100, 20))]
)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_pallas_on_gpu_matches_float64_oracle(case):
    _check_against_oracle("pallas", case, block_sizes=None)


@pytest.mark.parametrize("B, T, N, K, H, causal", [(2, 1024, 8, 2, 128, True),
                                                    (1, 777, 4, 4, 64, False)])
def test_cudnn_implementation_matches_the_oracle(B, T, N, K, H, causal):
    """implementation="cudnn" (jax.nn.dot_product_attention inside our registry): output and
    gradients against the f32 reference under the tolerance policy (no lse: cuDNN gives none)."""
    import jax.numpy as jnp
    import numpy as np

    import fastattn
    from pallas_kernels.flash_attention import flash_attention_reference
    from tests.tolerance import assert_within_policy

    keys = jax.random.split(jax.random.PRNGKey(T), 4)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (B, T, K, H), jnp.bfloat16) for kk in keys[1:3])
    d_out = jax.random.normal(keys[3], (B, T, N, H), jnp.float32)

    def run(attend, *args):
        return jax.value_and_grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)
                                                          * d_out), argnums=(0, 1, 2))(*args)

    got = run(lambda q, k, v: fastattn.attention(q, k, v, causal=causal,
                                                 implementation="cudnn"), q, k, v)
    oracle = run(lambda q, k, v: flash_attention_reference(q, k, v, causal=causal)[0],
                 *(x.astype(jnp.float32) for x in (q, k, v)))
    low = run(lambda q, k, v: flash_attention_reference(
        q, k, v, causal=causal, compute_dtype=jnp.bfloat16)[0], q, k, v)
    as_f32 = lambda x: np.asarray(jnp.asarray(x, jnp.float32))
    for name, g, o, lp in zip(("loss", "dq", "dk", "dv"), jax.tree.leaves(got),
                              jax.tree.leaves(oracle), jax.tree.leaves(low)):
        assert_within_policy(name, as_f32(g), as_f32(o), as_f32(lp), dtype="bfloat16",
                             factor=3)
