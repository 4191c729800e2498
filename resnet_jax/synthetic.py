"""Random images made on the device: input for benchmarks and tests that must not wait on a pipeline."""

from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from resnet_jax.sharding import batch_sharding


def batches(global_batch_size: int, image_shape: tuple[int, int, int], num_classes: int, mesh: Mesh,
            seed: int = 0, num_batches: int | None = None) -> Iterator[dict[str, jax.Array]]:
    """The same batch again and again (or `num_batches` times, for an evaluation), sharded like real ones."""

    def make():
        key_image, key_label = jax.random.split(jax.random.key(seed))
        return {"image": jax.random.normal(key_image, (global_batch_size, *image_shape), jnp.float32),
                "label": jax.random.randint(key_label, (global_batch_size,), 0, num_classes, jnp.int32)}

    batch = jax.jit(make, out_shardings=batch_sharding(mesh))()
    count = 0
    while num_batches is None or count < num_batches:
        count += 1
        yield batch
