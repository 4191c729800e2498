"""XLA's convolution with the weight gradient computed as a product of patches, for XLA:CPU.

The forward pass and the input gradient are XLA's own. For the weight gradient (the "backward-filter"
convolution) XLA:CPU transposes the activation and the output gradient to put the channels first, and in a
whole train step those transposes cost more than every convolution of the step. `conv_general_dilated` computes
it instead as the product of the input's patches (the k*k shifted views of the padded input, side by side along
the channels) with the output gradient, over chunks of the batch so that a chunk's patches stay in cache. It is
the same sum of products in another order, equal to XLA's within float32 rounding (tests/test_xla_cpu.py).

A `custom_vjp`, so it has no forward-mode derivative: it is for compiled train steps on a CPU, never part of the
model (`resnet_jax.xla_cpu.specialize` puts it in). Plugged into `flax.linen.Conv(conv_general_dilated=...)`,
so parameters keep their names and shapes. Measurements: docs/performance.md.
"""

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")

Pads = tuple[tuple[int, int], tuple[int, int]]


def _pads(padding: Any, x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int]) -> Pads:
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(x_shape[1:3], w_shape[:2], strides, padding)
    return tuple((int(lo), int(hi)) for lo, hi in padding)  # type: ignore[return-value]


def _conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads) -> jax.Array:
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC)


def patches(x: jax.Array, kernel: tuple[int, int], strides: tuple[int, int], pads: Pads,
            out_hw: tuple[int, int]) -> jax.Array:
    """[N, Ho, Wo, kh*kw*C]: the input under each kernel tap, ordered (tap row, tap column, channel) as the
    HWIO kernel flattens, so that patches @ kernel.reshape(-1, C_out) is the convolution.

    Built in two stacks of kw and then kh views along an axis before the channels, not as one concatenation
    of kh*kw views along the channels: XLA:CPU fuses no concatenation of more than 8 operands nor one along
    the minor dimension, so the flat form would write every patch twice.
    """
    (kh, kw), (sh, sw), (ho, wo) = kernel, strides, out_hw
    if any(lo or hi for lo, hi in pads):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    cols = jnp.stack([x[:, :, j:j + sw * (wo - 1) + 1:sw] for j in range(kw)], axis=3)  # [N, Hp, Wo, kw, C]
    taps = jnp.stack([cols[:, i:i + sh * (ho - 1) + 1:sh] for i in range(kh)], axis=3)  # [N, Ho, Wo, kh, kw, C]
    return taps.reshape(*taps.shape[:3], -1)


# Patch bytes per chunk: small enough that a chunk's patches stay in the last-level cache between being
# written and being multiplied, large enough that each matrix product keeps every core busy.
CHUNK_BYTES = 4 << 20


def weight_grad_chunk(batch: int, w_shape: Sequence[int], out_hw: Sequence[int], itemsize: int = 4) -> int:
    """Images per chunk: the most whose patches fit CHUNK_BYTES, rounded down to a divisor of the batch."""
    per_image = out_hw[0] * out_hw[1] * w_shape[0] * w_shape[1] * w_shape[2] * itemsize
    chunk = max(1, min(batch, CHUNK_BYTES // max(per_image, 1)))
    while batch % chunk:
        chunk -= 1
    return chunk


def _dy_first(w_shape: Sequence[int]) -> bool:
    """Whether to compute dy^T @ patches (else patches^T @ dy): the product's kernel reads its second operand
    as written and XLA:CPU transposes the first, so the smaller per pixel goes first (dy for a 3x3 kernel,
    9 C_in against C_out; the input for a 1x1 kernel that widens, C_in against 4 C_in). Transposing the
    larger instead would copy every chunk's patches once more."""
    kh, kw, c_in, c_out = w_shape
    return kh * kw * c_in >= c_out


def _patch_weight_grad(x: jax.Array, dy: jax.Array, w_shape: Sequence[int], strides: tuple[int, int],
                       pads: Pads) -> jax.Array:
    """One chunk's patches(x)^T @ dy, contracting the pixels, in float32 ([C_out, K] if `_dy_first`)."""
    # In float32 whatever the compute dtype: XLA:CPU has no bfloat16 x bfloat16 -> float32 kernel for every
    # operand order, and the sum over every pixel of the batch is where bfloat16 would lose most.
    x, dy = x.astype(jnp.float32), dy.astype(jnp.float32)
    p = patches(x, tuple(w_shape[:2]), strides, pads, dy.shape[1:3])
    a, b = (dy, p) if _dy_first(w_shape) else (p, dy)
    return lax.dot_general(a, b, (((0, 1, 2), (0, 1, 2)), ((), ())), preferred_element_type=jnp.float32)


def patch_weight_grad(x: jax.Array, dy: jax.Array, w_shape: Sequence[int], strides: tuple[int, int],
                      pads: Pads, chunk: int | None = None) -> jax.Array:
    """d(loss)/d(kernel) = patches(x)^T @ dy, summed over chunks of `chunk` images, accumulated in float32.

    `lax.scan` rather than one batched product: a chunk's patches are written and read while in cache.
    """
    n = x.shape[0]
    chunk = chunk or weight_grad_chunk(n, w_shape, dy.shape[1:3])
    if chunk >= n:
        total = _patch_weight_grad(x, dy, w_shape, strides, pads)
    else:
        xs = x.reshape(n // chunk, chunk, *x.shape[1:])
        dys = dy.reshape(n // chunk, chunk, *dy.shape[1:])

        def add_chunk(total, x_dy):
            return total + _patch_weight_grad(*x_dy, w_shape, strides, pads), None

        k = w_shape[0] * w_shape[1] * w_shape[2]
        zeros = jnp.zeros((w_shape[3], k) if _dy_first(w_shape) else (k, w_shape[3]), jnp.float32)
        total, _ = lax.scan(add_chunk, zeros, (xs, dys))
    return (total.T if _dy_first(w_shape) else total).reshape(w_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_fast_wgrad(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads) -> jax.Array:
    return _conv(x, w, strides, pads)


def _fwd(x, w, strides, pads):
    return _conv(x, w, strides, pads), (x, w)


def _bwd(strides, pads, residuals, dy):
    x, w = residuals
    dx = jax.linear_transpose(lambda x_: _conv(x_, w, strides, pads), x)(dy)[0]
    dw = patch_weight_grad(x, dy, w.shape, strides, pads).astype(w.dtype)
    return dx, dw


_conv_fast_wgrad.defvjp(_fwd, _bwd)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """`lax.conv_general_dilated` with the CPU weight gradient above, for the plain 2-D NHWC/HWIO convolutions
    this network uses; anything else (dilation, groups, other layouts) goes to lax unchanged."""
    plain = (lhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1 and precision is None
             and preferred_element_type is None and all(d == 1 for d in (lhs_dilation or (1, 1)))
             and all(d == 1 for d in (rhs_dilation or (1, 1)))
             and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count, precision,
                                        preferred_element_type)
    strides = tuple(int(s) for s in window_strides)
    return _conv_fast_wgrad(lhs, rhs, strides, _pads(padding, lhs.shape, rhs.shape, strides))
