"""Max pooling with a gradient that XLA:CPU computes quickly, for the ImageNet stem.

XLA:CPU expands the max-pool gradient (select-and-scatter) into a reduce-window over the padded input carrying
four int32 index maps of its size. `max_pool` routes each output's gradient to the first maximum of its window in
row-major order, which is the element XLA's select (>=) picks, with one comparison and one strided pad per window
tap: the same selection, and where windows overlap the same sum within float32 rounding (tests/test_xla_cpu.py).
A `custom_vjp` for compiled CPU train steps only (`resnet_jax.xla_cpu.specialize`); measurements:
docs/performance.md.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from resnet_jax.xla_cpu.conv import Pads


def _pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int], pads: Pads) -> jax.Array:
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0)))


def first_max_grad(x: jax.Array, y: jax.Array, dy: jax.Array, window: tuple[int, int], strides: tuple[int, int],
                   pads: Pads) -> jax.Array:
    """d(loss)/dx for y = max-pool(x): each dy to the first position of its window (row-major) holding y."""
    (kh, kw), (sh, sw), (ho, wo) = window, strides, y.shape[1:3]
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    hp, wp = xp.shape[1:3]
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, dy.dtype)
    for i in range(kh):
        for j in range(kw):
            view = xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
            hit = (view == y) & ~taken
            taken = taken | hit
            # Interior padding (stride - 1) puts tap (i, j) of every window back where it was read from.
            spread = ((0, 0, 0), (i, hp - i - sh * (ho - 1) - 1, sh - 1), (j, wp - j - sw * (wo - 1) - 1, sw - 1),
                      (0, 0, 0))
            dxp = dxp + lax.pad(jnp.where(hit, dy, 0), jnp.zeros((), dy.dtype), spread)
    (top, _), (left, _) = pads
    return dxp[:, top:top + x.shape[1], left:left + x.shape[2], :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int], pads: Pads) -> jax.Array:
    return _pool(x, window, strides, pads)


def _fwd(x, window, strides, pads):
    y = _pool(x, window, strides, pads)
    return y, (x, y)


def _bwd(window, strides, pads, residuals, dy):
    x, y = residuals
    return (first_max_grad(x, y, dy, window, strides, pads),)


_max_pool.defvjp(_fwd, _bwd)


def max_pool(inputs: jax.Array, window_shape: Sequence[int], strides: Sequence[int] | None = None,
             padding: str | Sequence[tuple[int, int]] = "VALID") -> jax.Array:
    """`flax.linen.max_pool` for NHWC input, with the CPU gradient above."""
    window = tuple(int(k) for k in window_shape)
    strides = tuple(int(s) for s in strides) if strides is not None else (1,) * len(window)
    if isinstance(padding, str):
        padding = lax.padtype_to_pads(inputs.shape[1:3], window, strides, padding)
    return _max_pool(inputs, window, strides, tuple((int(lo), int(hi)) for lo, hi in padding))
