"""Math shared by the Pallas kernels (Triton backend)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import triton as plgpu

LOG2E = math.log2(math.e)


def dot(a, b, *, contract: tuple[int, int]):
    """2-D matmul with f32 accumulation; `contract` names the contracted axis of a and of b.
    f32 inputs use full f32 precision (Triton would otherwise pick TF32)."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, ((contract[:1], contract[1:]), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)


def exp2(x, *, interpret: bool):
    """2**x for f32 x. On the GPU one `ex2.approx.ftz.f32` (libdevice's exp2f, which
    jnp.exp2 lowers to, adds denormal handling that a softmax does not need: results below
    2**-126 flush to 0). The softmax is exp-bound at H <= 64, so the instruction count matters.
    Interpret mode (CPU) uses jnp.exp2."""
    if interpret:
        return jnp.exp2(x)
    [y] = plgpu.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return y
