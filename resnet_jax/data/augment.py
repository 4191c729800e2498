"""CIFAR-10 training batches made on the accelerator: the dataset lives there as uint8, and one jitted
function of (seed, step) gathers, normalises, pads, crops and flips (paper section 4.2). The host passes
two scalars per step and, once an epoch, asks the device to sort that epoch's order; the accelerator never
waits on it. Pure JAX: no TensorFlow here.

The draws come from `order`, the same integer rule the numpy host path uses, so both paths give the same
batches for the same (seed, step).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from resnet_jax import sharding
from resnet_jax.data import order


def normalize(images: jax.Array, mean: jax.Array, scale: jax.Array) -> jax.Array:
    """(x - mean) * scale in float32; the host path does the same two operations in the same order."""
    return (images.astype(jnp.float32) - mean) * scale


def pad_crop_flip(images: jax.Array, dy: jax.Array, dx: jax.Array, flip: jax.Array, pad: int) -> jax.Array:
    """Zero-pad `pad` pixels on each side, take the HxW window at (dy, dx), mirror where flip == 1.

    Padding comes after normalisation, so the network sees zeros around the image, as in the paper's
    "4 pixels are padded on each side" (and fb.resnet.torch, which reproduced it)."""
    h, w = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

    def one(img, y, x, f):
        crop = jax.lax.dynamic_slice(img, (y, x, 0), (h, w, img.shape[-1]))
        return jnp.where(f == 1, crop[:, ::-1], crop)

    return jax.vmap(one)(padded, dy, dx, flip)


def make_train_step_batch(images: np.ndarray, labels: np.ndarray, mean: np.ndarray, scale: np.ndarray, *,
                          mesh: Mesh, global_batch_size: int, augment: bool,
                          pad: int) -> Callable[[int, int], dict[str, jax.Array]]:
    """Put the (small) dataset on every device of `mesh` and return batch(seed, step).

    The dataset is replicated, not sharded: a random gather from a sharded table would need an all-to-all
    each step, while 50k x 32 x 32 x 3 bytes (150 MB) fits on any accelerator. Each device gathers only its
    own rows of the batch, because the indices are constrained to the batch sharding before the gather.
    """
    rep = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, rep, lambda index: x[index])

    table, table_labels = put(images), put(labels.astype(np.int32))
    mean_d, scale_d = put(mean.astype(np.float32)), put(scale.astype(np.float32))
    n = images.shape[0]

    # An epoch's order is sorted once, on the device, and kept there; sorting it again every step would
    # cost more than the rest of the batch on a CPU.
    permutation = jax.jit(lambda seed, epoch: order.permutation(jnp, seed, epoch, n), out_shardings=rep)

    @jax.jit
    def batch(table, table_labels, mean, scale, perm0, perm1, seed, step):
        idx = order.batch_indices(jnp, seed, step, global_batch_size, n,
                                  epoch_orders=(perm0, perm1))
        idx = jax.lax.with_sharding_constraint(idx, batch_sh)
        x = normalize(table[idx], mean, scale)
        if augment:
            dy, dx, flip = order.crop_flip_draws(jnp, seed, step, global_batch_size, pad)
            shard = lambda a: jax.lax.with_sharding_constraint(a, batch_sh)  # noqa: E731
            x = pad_crop_flip(x, shard(dy), shard(dx), shard(flip), pad)
        return {"image": jax.lax.with_sharding_constraint(x, batch_sh),
                "label": jax.lax.with_sharding_constraint(table_labels[idx], batch_sh)}

    def scalar(value: np.generic) -> jax.Array:
        # Explicit, so that a training loop run under jax.transfer_guard("disallow") passes: these two scalars
        # are the only host-to-device traffic of a step.
        return jax.device_put(value, rep)

    cache: dict[tuple[int, int], jax.Array] = {}

    def perm(seed: int, epoch: int) -> jax.Array:
        if (seed, epoch) not in cache:
            for key in [k for k in cache if k[1] < epoch - 1]:
                del cache[key]
            cache[(seed, epoch)] = permutation(scalar(np.uint32(seed)), scalar(np.int32(epoch)))
        return cache[(seed, epoch)]

    def call(seed: int, step: int) -> dict[str, jax.Array]:
        s = order.as_seed(seed)
        epoch = step * global_batch_size // n
        return batch(table, table_labels, mean_d, scale_d, perm(s, epoch), perm(s, epoch + 1),
                     scalar(np.uint32(s)), scalar(np.int32(step)))

    return call
