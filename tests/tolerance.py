"""The written tolerance policy (STYLE.md 12, RELIABILITY.md 1).

The oracle is the reference computed in float64. An implementation's error against it must be
at most `factor` times the error of the same reference computed in the inputs' own dtype (what
that precision alone costs), plus a small floor relative to the oracle's magnitude.
factor is 2 for outputs and 3 for gradients.
"""

import numpy as np

FLOOR = {"float32": 2e-5, "float16": 5e-4, "bfloat16": 2e-3}


def floor_for(dtype) -> float:
    return FLOOR[np.dtype(dtype).name]


def _finite_diff(actual, oracle):
    actual = np.asarray(actual, np.float64)
    oracle = np.asarray(oracle, np.float64)
    same_inf = np.isinf(actual) & np.isinf(oracle) & (np.sign(actual) == np.sign(oracle))
    assert np.array_equal(np.isnan(actual), np.isnan(oracle)), "NaN where the oracle has none"
    assert np.array_equal(np.isinf(actual), np.isinf(oracle)), "infinities differ from the oracle"
    diff = np.abs(np.where(same_inf, 0.0, actual) - np.where(same_inf, 0.0, oracle))
    return diff, np.where(np.isinf(oracle), 0.0, oracle)


def assert_within_policy(what, actual, oracle, low_precision, *, dtype, factor):
    err, finite_oracle = _finite_diff(actual, oracle)
    base, _ = _finite_diff(low_precision, oracle)
    scale = max(1.0, float(np.max(np.abs(finite_oracle), initial=0.0)))
    bound = factor * float(np.max(base, initial=0.0)) + floor_for(dtype) * scale
    worst = float(np.max(err, initial=0.0))
    assert worst <= bound, (
        f"{what}: max error {worst:.3e} (mean {float(np.mean(err)):.3e}) exceeds "
        f"{factor} x low-precision reference error {float(np.max(base, initial=0.0)):.3e} "
        f"+ floor {floor_for(dtype) * scale:.3e}")


def assert_bitwise_equal(actual, expected, what: str = "") -> None:
    """Equal to the last bit (NaN equals itself, -0.0 differs from 0.0): the raw bits of the
    two arrays compared as unsigned integers."""
    def bits(x):
        x = np.asarray(x)
        return x.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[x.dtype.itemsize])

    np.testing.assert_array_equal(bits(actual), bits(expected), err_msg=what)
