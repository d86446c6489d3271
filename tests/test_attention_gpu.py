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
