"""CIFAR-10 as in section 4.2 of the paper: 50k/10k or 45k/5k splits, per-pixel mean subtraction, 4-pixel
zero padding with a random 32x32 crop and a random horizontal flip; evaluation on the single original view.

The whole dataset (180 MB) is held in memory by every process: it is one TFRecord file, the per-pixel mean
needs the whole training split anyway, and holding it all makes the batch sequence independent of the
number of hosts (each process still builds only its own rows of every batch). Two training paths draw the
same batches from `order`: numpy on the host, or `augment` on the accelerator (`on_device`).
"""

import functools
import itertools
import pathlib
import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from resnet_jax import sharding
from resnet_jax.data import eval as eval_lib
from resnet_jax.data import order

NAME = "cifar10"
TRAIN_SIZE, TEST_SIZE, VALIDATION_SIZE = 50_000, 10_000, 5_000

DEFAULT_OPTIONS: dict[str, Any] = {
    "validation_split": False,  # True: the paper's 45k train / 5k validation split (section 4.2)
    "train_examples": 0,  # N > 0: train on the first N training images only (CPU-budget experiments)
    "normalization": "per_pixel_mean",  # or "per_channel" (mean/std per colour channel)
    "augment": True,  # 4-pixel zero pad, random 32x32 crop, random horizontal flip
    "pad": 4,
    "on_device": True,  # dataset in accelerator memory, crops and flips in JAX
    "download": True,  # let TFDS download CIFAR-10 when it is not under data_dir
}
NORMALIZATIONS = ("per_pixel_mean", "per_channel")


def splits(options: Mapping[str, Any]) -> dict[str, tuple[str, slice]]:
    """Our split name -> (TFDS split, rows of it in the original order). The validation images are the last
    5k of the training set, so "train" and "validation" are disjoint and together cover it."""
    cut = TRAIN_SIZE - VALIDATION_SIZE if options["validation_split"] else TRAIN_SIZE
    subset = int(options.get("train_examples") or 0)
    result = {"train": ("train", slice(0, min(subset, cut) if subset > 0 else cut)),
              "test": ("test", slice(0, TEST_SIZE))}
    if options["validation_split"]:
        result["validation"] = ("train", slice(cut, TRAIN_SIZE))
    return result


def num_examples(split: str, options: Mapping[str, Any]) -> int:
    _, rows = splits(options)[split]
    return rows.stop - rows.start


def builder(data_dir: str | None, download: bool) -> Any:
    """The TFDS builder, prepared; a one-line ValueError saying where we looked if it cannot be had."""
    import tensorflow_datasets as tfds

    b = tfds.builder(NAME, data_dir=data_dir)
    if b.is_prepared():
        return b
    where = f"CIFAR-10 not found at {b.data_dir}"
    fix = "set TFDS_DATA_DIR or config.data_dir to the directory that holds cifar10/"
    if not download:
        raise ValueError(f"{where} (downloading disabled by data.download=False); {fix}")
    try:
        b.download_and_prepare()
    except Exception as e:  # noqa: BLE001 - any failure to fetch means the same thing to the user
        cause = " ".join(str(e).split())[:240]
        raise ValueError(f"{where} and downloading it failed ({type(e).__name__}: {cause}); {fix}") from e
    return b


@functools.lru_cache(maxsize=4)
def _load_tfds_split(data_dir: str | None, tfds_split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """All images (uint8 [N, 32, 32, 3]) and labels of a TFDS split, in the original CIFAR order.

    TFDS shuffles examples when it writes them; sorting by `id` (train_00000, ...) restores the original
    order, so "the last 5k of the training set" means the same images on every machine."""
    import tensorflow_datasets as tfds

    from resnet_jax.data import tf_util

    tf_util.hide_accelerators()
    b = builder(data_dir, download)
    try:
        data = tfds.as_numpy(b.as_dataset(split=tfds_split, batch_size=-1, shuffle_files=False))
    except Exception as e:  # noqa: BLE001 - TensorFlow reports damaged records as assorted errors
        files = ", ".join(str(f) for f in sorted(pathlib.Path(b.data_dir).glob(f"{NAME}-{tfds_split}.tfrecord*")))
        cause = " ".join(str(e).split())[:200]
        raise ValueError(f"cannot read CIFAR-10 {tfds_split!r} from {files or b.data_dir} ({type(e).__name__}: "
                         f"{cause}); the file is damaged: prepare the dataset again") from None
    ids = np.asarray(data["id"])
    order_ = np.argsort(ids, kind="stable")
    return data["image"][order_], data["label"][order_].astype(np.int32)


def load(data_dir: str | None, split: str, options: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    tfds_split, rows = splits(options)[split]
    images, labels = _load_tfds_split(data_dir, tfds_split, bool(options["download"]))
    return images[rows], labels[rows]


@functools.lru_cache(maxsize=4)
def _statistics(data_dir: str | None, normalization: str, validation_split: bool, train_examples: int,
                download: bool) -> tuple[np.ndarray, np.ndarray]:
    options = {"validation_split": validation_split, "train_examples": train_examples, "download": download}
    images, _ = load(data_dir, "train", options)
    x = images.astype(np.float64)
    if normalization == "per_pixel_mean":
        # Section 4.2: "the per-pixel mean subtracted"; no division, the inputs keep the 0..255 scale.
        return x.mean(axis=0).astype(np.float32), np.float32(1.0)
    mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
    return mean.astype(np.float32), (1.0 / std).astype(np.float32)


def statistics(data_dir: str | None, options: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, scale) for x -> (x - mean) * scale, from the training images in use (45k, 50k or a subset)."""
    return _statistics(data_dir, options["normalization"], bool(options["validation_split"]),
                       int(options.get("train_examples") or 0), bool(options["download"]))


def normalize(images: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Host twin of augment.normalize: same operations, same order, same float32 results."""
    return (images.astype(np.float32) - mean) * scale


def pad_crop_flip(images: np.ndarray, dy: np.ndarray, dx: np.ndarray, flip: np.ndarray, pad: int) -> np.ndarray:
    """Host twin of augment.pad_crop_flip."""
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    rows = dy[:, None] + np.arange(h)
    cols = dx[:, None] + np.arange(w)
    cols = np.where(flip[:, None] == 1, cols[:, ::-1], cols)
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


def _prefetch(iterator: Iterator[Any], size: int) -> Iterator[Any]:
    """Run `iterator` in one background thread, `size` items ahead, so host work overlaps the train step.
    One producer keeps the order; numpy releases the GIL for the copies that dominate here."""
    q: queue.Queue = queue.Queue(maxsize=size)
    done = object()

    def produce():
        try:
            for item in iterator:
                q.put(item)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            q.put(e)
        q.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def host_batches(images: np.ndarray, labels: np.ndarray, mean: np.ndarray, scale: np.ndarray, *, seed: int,
                 start_step: int, global_batch_size: int, process_index: int, local_batch: int, augment: bool,
                 pad: int) -> Iterator[dict[str, np.ndarray]]:
    """This process' rows of training batches start_step, start_step + 1, ... as numpy (host path)."""
    n = len(images)
    s = order.as_seed(seed)
    rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
    cache: dict[int, np.ndarray] = {}

    def perm(epoch: int) -> np.ndarray:
        if epoch not in cache:
            for old in [e for e in cache if e < epoch - 1]:
                del cache[old]
            cache[epoch] = order.permutation(np, s, epoch, n)
        return cache[epoch]

    for step in itertools.count(start_step):
        idx = order.batch_indices(np, s, step, global_batch_size, n, perms=perm)[rows]
        x = normalize(images[idx], mean, scale)
        if augment:
            dy, dx, flip = (d[rows] for d in order.crop_flip_draws(np, s, step, global_batch_size, pad))
            x = pad_crop_flip(x, dy, dx, flip, pad)
        yield {"image": x, "label": labels[idx]}


def train_batches(*, data_dir: str | None, split: str, global_batch_size: int, seed: int, start_step: int,
                  mesh: Mesh, options: Mapping[str, Any]) -> Iterator[dict[str, jax.Array]]:
    images, labels = load(data_dir, split, options)
    mean, scale = statistics(data_dir, options)
    local = sharding.local_batch_size(global_batch_size, mesh)
    if options["on_device"]:
        from resnet_jax.data import augment

        make = augment.make_train_step_batch(images, labels, mean, np.broadcast_to(scale, mean.shape[-1:]),
                                             mesh=mesh, global_batch_size=global_batch_size,
                                             augment=bool(options["augment"]), pad=int(options["pad"]))
        return (make(seed, step) for step in itertools.count(start_step))
    host = host_batches(images, labels, mean, scale, seed=seed, start_step=start_step,
                        global_batch_size=global_batch_size, process_index=jax.process_index(),
                        local_batch=local, augment=bool(options["augment"]), pad=int(options["pad"]))
    return (sharding.global_batch(b, mesh) for b in _prefetch(host, size=2))


def eval_batches(*, data_dir: str | None, split: str, global_batch_size: int, mesh: Mesh,
                 options: Mapping[str, Any]) -> Iterator[dict[str, jax.Array]]:
    """One pass over `split`, the single original 32x32 view, normalised with the training statistics."""
    images, labels = load(data_dir, split, options)
    mean, scale = statistics(data_dir, options)
    local = sharding.local_batch_size(global_batch_size, mesh)
    n, p, count = len(images), jax.process_index(), jax.process_count()
    start, stop = eval_lib.shard_range(n, p, count)

    def real():
        for lo in range(start, stop, local):
            hi = min(lo + local, stop)
            yield {"image": normalize(images[lo:hi], mean, scale), "label": labels[lo:hi],
                   "index": np.arange(lo, hi, dtype=np.int32)}

    template = {"image": np.zeros((1,) + images.shape[1:], np.float32), "label": labels[:1],
                "index": np.zeros(1, np.int32)}
    total = eval_lib.num_batches(n, count, local)
    for batch in eval_lib.padded_batches(real(), local, total, template):
        yield sharding.global_batch(batch, mesh)
