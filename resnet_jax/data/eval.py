"""Evaluation without dropping or double-counting: shards, padding, masks, and averaging over views.

The rule (every example of an evaluation split is scored exactly once): process p of P reads the
contiguous examples [p*N//P, (p+1)*N//P) of the split; every process yields the same number of batches,
ceil(max_p n_p / local_batch); rows past the end of its shard are zeros with mask 0. So the sum of the
mask over all batches is N whatever the batch size, device count or process count.
"""

from collections.abc import Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np


def shard_range(n: int, index: int, count: int) -> tuple[int, int]:
    """The contiguous slice [start, stop) of n examples that process `index` of `count` evaluates."""
    return n * index // count, n * (index + 1) // count


def num_batches(n: int, count: int, local_batch: int) -> int:
    """Batches every process yields: enough for the largest shard, at least one (so that all processes
    take part in every collective of the eval step)."""
    largest = max(stop - start for start, stop in (shard_range(n, i, count) for i in range(count)))
    return max(1, -(-largest // local_batch))


def pad_batch(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """Pad every field of a (possibly partial or empty) batch to `size` rows and add `mask` (1 real, 0 pad).
    `index` is padded with -1 so that a padded row can never be mistaken for example 0."""
    real = len(next(iter(batch.values())))
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        fill = np.full((size - real,) + value.shape[1:], -1 if key == "index" else 0, value.dtype)
        out[key] = np.concatenate([value, fill])
    out["mask"] = (np.arange(size) < real).astype(np.float32)
    return out


def padded_batches(batches: Iterable[Mapping[str, np.ndarray]], local_batch: int, total: int,
                   template: Mapping[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
    """Exactly `total` local batches of `local_batch` rows: the given ones padded, then all-padding ones
    made from `template` (one example, used for shapes and dtypes only)."""
    emitted = 0
    for batch in batches:
        yield pad_batch(batch, local_batch)
        emitted += 1
    empty = {k: np.asarray(v)[:0] for k, v in template.items()}
    for _ in range(total - emitted):
        yield pad_batch(empty, local_batch)


def image_keys(batch: Mapping[str, jax.Array]) -> list[str]:
    """The image fields of an eval batch: "image", or "image_224", "image_256", ... in multi-scale mode."""
    return sorted(k for k in batch if k == "image" or k.startswith("image_"))


def average_view_scores(logits_fn: Callable[[jax.Array], jax.Array], batch: Mapping[str, jax.Array]) -> jax.Array:
    """Softmax scores [B, classes] averaged over every view of every image, jittable.

    An image field is [B, H, W, 3] (one view) or [B, V, H, W, 3] (10-crop, multi-scale: V views per image).
    The views go through the network as one batch of B*V; B stays the leading axis, so the batch sharding
    carries over. Averaging softmax scores, not logits, is the paper's "scores averaged" (sections 3.4, 4.1).
    """
    scores = []
    for key in image_keys(batch):
        x = batch[key]
        if x.ndim == 4:
            x = x[:, None]
        b, v = x.shape[:2]
        logits = logits_fn(x.reshape((b * v,) + x.shape[2:]))
        scores.append(jax.nn.softmax(logits.astype(jnp.float32)).reshape(b, v, -1))
    return jnp.concatenate(scores, axis=1).mean(axis=1)
