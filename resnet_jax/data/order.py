"""Which example, which crop, which flip: counter-based draws that numpy and JAX compute bit for bit alike.

Every random choice of a training batch is a hash of (seed, counter), never the state of a generator, so
batch k is a pure function of (seed, k): a run resumed at step k draws exactly what an uninterrupted run
draws, without replaying steps 0..k-1 (docs/data.md, "Determinism and resuming"). The same integer arithmetic
in numpy (host path) and in jax.numpy (device path) gives the two CIFAR paths identical batches.

The mixer is Chris Wellons' `lowbias32` on uint32 words; its statistical quality is far beyond what shuffling
and 9x9 crop offsets need.
"""

from typing import Any

import numpy as np

# Separate streams so that, e.g., the crop offset of example i never equals a shuffle key.
_PERMUTATION, _CROP_Y, _CROP_X, _FLIP = 1, 2, 3, 4


def _mix(xp: Any, x: Any) -> Any:
    x = x ^ (x >> 16)
    x = x * xp.asarray(0x7FEB352D, dtype=xp.uint32)
    x = x ^ (x >> 15)
    x = x * xp.asarray(0x846CA68B, dtype=xp.uint32)
    return x ^ (x >> 16)


def hash32(xp: Any, *words: Any) -> Any:
    """uint32 hash of a sequence of (broadcastable) uint32 words; xp is numpy or jax.numpy."""
    with np.errstate(over="ignore"):  # wrap-around is the point; numpy warns only for 0-d operands
        h = xp.asarray(0x9E3779B9, dtype=xp.uint32)
        for w in words:
            h = _mix(xp, h ^ xp.asarray(w).astype(xp.uint32))
        return h


def as_seed(seed: int) -> int:
    """A Python int seed folded into uint32 range (negative seeds allowed)."""
    return int(seed) % (1 << 32)


def permutation(xp: Any, seed: Any, epoch: Any, n: int) -> Any:
    """The order of the n examples in `epoch`: argsort of per-example hash keys (stable, so ties are
    broken by index identically in numpy and XLA)."""
    keys = hash32(xp, _PERMUTATION, seed, epoch, xp.arange(n, dtype=xp.uint32))
    if xp is np:
        return np.argsort(keys, kind="stable")
    return xp.argsort(keys, stable=True)


def batch_indices(xp: Any, seed: Any, step: Any, batch: int, n: int, perms: Any = None,
                  epoch_orders: tuple[Any, Any] | None = None) -> Any:
    """Dataset indices of the `batch` examples of training step `step`.

    The examples form one endless stream, epoch after epoch, each epoch a fresh permutation; step k takes
    stream positions [k * batch, (k + 1) * batch). With batch <= n a batch touches at most two epochs.
    `perms(epoch)` may supply cached permutations (host path), or `epoch_orders` the permutations of the
    batch's first epoch and the next (device path).
    """
    positions = step * batch + xp.arange(batch)
    first_epoch = (step * batch) // n
    epoch = positions // n
    within = positions % n
    if epoch_orders is None:
        perm = perms or (lambda e: permutation(xp, seed, e, n))
        epoch_orders = perm(first_epoch), perm(first_epoch + 1)
    return xp.where(epoch == first_epoch, epoch_orders[0][within], epoch_orders[1][within])


def crop_flip_draws(xp: Any, seed: Any, step: Any, batch: int, pad: int) -> tuple[Any, Any, Any]:
    """(dy, dx, flip) for each example of step `step`: offsets in [0, 2 * pad] into the padded image, and
    flip in {0, 1} (paper section 4.2: random crop of the padded image, random horizontal flip)."""
    i = xp.arange(batch, dtype=xp.uint32)
    dy = hash32(xp, _CROP_Y, seed, step, i) % (2 * pad + 1)
    dx = hash32(xp, _CROP_X, seed, step, i) % (2 * pad + 1)
    flip = hash32(xp, _FLIP, seed, step, i) >> 31
    return dy.astype(xp.int32), dx.astype(xp.int32), flip.astype(xp.int32)
