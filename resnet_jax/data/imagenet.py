"""ImageNet 2012 as in sections 3.4 and 4.1 of the paper, read from TFDS' prepared TFRecords with tf.data.

Training: scale augmentation (shorter side resized to a random length in [256, 480]), a random 224x224 crop,
a horizontal flip, AlexNet's PCA colour augmentation; or the "inception" random-resized crop of modern
recipes. Evaluation: the centre 224 crop of the image resized to 256, the paper's 10-crop testing, or its
multi-scale testing (shorter side in {224, 256, 384, 480, 640}, scores averaged).

Mean subtraction is per channel, not per pixel as in the paper: a 224 crop of an image rescaled by a random
factor has no fixed correspondence to the pixels of a mean image, so a per-pixel mean would amount to a
blurred per-channel one anyway.

Reading, several hosts and resuming: process p of P reads only the TFRecord files p, p+P, p+2P, ...
Its examples form one endless stream: in each epoch its files in an order hashed from (seed, epoch), each
file's records in an order hashed from (seed, epoch, file). Batch k is stream positions [kL, (k+1)L), and
every random draw is seeded by (seed, process, position). A run resumed at step k computes where position
kL falls, starts reading at that file and discards the records of that one file before it, undecoded; it
never replays the first k batches. The sequence depends on the number of processes (which fixes who reads
what), not on anything else.
"""

import functools
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from resnet_jax import sharding
from resnet_jax.data import eval as eval_lib
from resnet_jax.data import order, tf_util

NAME = "imagenet2012"
TRAIN_CROPS = ("scale", "inception")
EVAL_MODES = ("center", "10crop", "multiscale")
NORMALIZATIONS = ("mean", "mean_std")

DEFAULT_OPTIONS: dict[str, Any] = {
    "train_crop": "scale",  # "scale": section 3.4 scale augmentation; "inception": random-resized crop
    "scale_range": (256, 480),  # shorter side drawn uniformly from these integers, both included
    "crop_size": 224,
    "pca_lighting": 0.1,  # std of AlexNet's PCA colour noise (Krizhevsky et al. 2012); 0 disables
    "normalization": "mean",  # "mean": subtract the per-channel mean (paper, see module doc); "mean_std"
    "eval_mode": "center",  # "center" | "10crop" | "multiscale"
    "eval_resize": 256,  # shorter side before the centre or 10 crops
    "multiscale_sizes": (224, 256, 384, 480, 640),  # section 3.4, after VGG's dense testing
    "threads": None,  # tf.data threads per process; None: one per core
}

# Per-channel statistics of the ImageNet training set (RGB, 0..255), and the eigen-decomposition of its
# pixel covariance used by AlexNet's PCA lighting (values as published with fb.resnet.torch).
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
PCA_EIGVAL = (0.2175 * 255, 0.0188 * 255, 0.0045 * 255)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


def check_options(options: Mapping[str, Any]) -> None:
    for key, allowed in (("train_crop", TRAIN_CROPS), ("eval_mode", EVAL_MODES), ("normalization", NORMALIZATIONS)):
        if options[key] not in allowed:
            raise ValueError(f"unknown {key} {options[key]!r}; choose one of {', '.join(allowed)}")
    lo, hi = options["scale_range"]
    if not options["crop_size"] <= lo <= hi:
        raise ValueError(f"scale_range {tuple(options['scale_range'])} must satisfy crop_size <= low <= high")


@functools.lru_cache(maxsize=8)
def builder(data_dir: str | None) -> Any:
    """The prepared TFDS builder, or a one-line ValueError that says where the tar files go and which
    command prepares them (TFDS cannot download ImageNet)."""
    import tensorflow_datasets as tfds

    b = tfds.builder(NAME, data_dir=data_dir)
    if not b.is_prepared():
        root = pathlib.Path(str(b.data_dir)).parents[1]
        manual = root / "downloads" / "manual"
        raise ValueError(f"ImageNet 2012 is not prepared under {root}: put ILSVRC2012_img_train.tar and "
                         f"ILSVRC2012_img_val.tar in {manual} and run `tfds build imagenet2012 --data_dir {root} "
                         f"--manual_dir {manual}`")
    return b


def split_names(data_dir: str | None) -> tuple[str, ...]:
    return tuple(builder(data_dir).info.splits.keys())


def num_examples(data_dir: str | None, split: str) -> int:
    return int(builder(data_dir).info.splits[split].num_examples)


def _files(data_dir: str | None, split: str) -> tuple[list[str], list[int]]:
    b = builder(data_dir)
    info = b.info.splits[split]
    return [os.path.join(str(b.data_dir), f) for f in info.filenames], [int(n) for n in info.shard_lengths]


def check_shards(data_dir: str | None, split: str) -> None:
    count = len(_files(data_dir, split)[0])
    if count < jax.process_count():
        raise ValueError(f"{NAME} {split!r} has {count} files, fewer than the {jax.process_count()} processes "
                         f"that would each read their own")


# ---------------------------------------------------------------------------------------------- transforms


def decode(encoded: Any) -> Any:
    """JPEG bytes -> uint8 [h, w, 3]. channels=3 turns grayscale and CMYK JPEGs into RGB."""
    tf = tf_util.tf()
    return tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")


def resize_shorter(image: Any, size: Any) -> Any:
    """Resize (bilinear, antialiased when shrinking) so that the shorter side is `size`; float32 0..255."""
    tf = tf_util.tf()
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    size_f = tf.cast(size, tf.float32)
    factor = size_f / tf.minimum(h, w)
    new_h = tf.where(h <= w, tf.cast(size, tf.int32), tf.cast(tf.round(h * factor), tf.int32))
    new_w = tf.where(w < h, tf.cast(size, tf.int32), tf.cast(tf.round(w * factor), tf.int32))
    return tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)


def _center_crop(image: Any, height: int, width: int) -> Any:
    tf = tf_util.tf()
    shape = tf.shape(image)
    top, left = (shape[0] - height) // 2, (shape[1] - width) // 2
    return tf.slice(image, tf.stack([top, left, 0]), [height, width, 3])


def sample_shorter_side(seed: Any, scale_range: tuple[int, int]) -> Any:
    """Section 3.4: "shorter side randomly sampled in [256, 480]" (integers, both ends included)."""
    tf = tf_util.tf()
    lo, hi = scale_range
    return tf.random.stateless_uniform([], seed, minval=lo, maxval=hi + 1, dtype=tf.int32)


def _lighting(seed: Any, std: float) -> Any:
    """AlexNet's PCA colour augmentation: add eigvec @ (alpha * eigval) to every pixel, alpha ~ N(0, std)."""
    tf = tf_util.tf()
    alpha = tf.random.stateless_normal([3], seed, stddev=std)
    return tf.linalg.matvec(tf.constant(PCA_EIGVEC), alpha * tf.constant(PCA_EIGVAL))


def _normalize(image: Any, normalization: str) -> Any:
    tf = tf_util.tf()
    image = tf.cast(image, tf.float32) - tf.constant(MEAN_RGB)
    if normalization == "mean_std":
        image = image / tf.constant(STD_RGB)
    return image


def preprocess_train(encoded: Any, seed: Any, options: Mapping[str, Any]) -> Any:
    """JPEG bytes and a stateless seed [2] -> float32 [crop, crop, 3], normalised."""
    tf = tf_util.tf()
    crop = int(options["crop_size"])
    seeds = tf.random.experimental.stateless_split(seed, 4)
    image = decode(encoded)
    if options["train_crop"] == "scale":
        # Upscaling first makes images smaller than the crop (or than 256) valid inputs too.
        image = resize_shorter(image, sample_shorter_side(seeds[0], tuple(options["scale_range"])))
        image = tf.image.stateless_random_crop(image, [crop, crop, 3], seeds[1])
    else:
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            tf.shape(image), tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=seeds[0],
            min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.08, 1.0), max_attempts=10,
            use_image_if_no_bounding_boxes=True)
        image = tf.image.resize(tf.slice(image, begin, size), [crop, crop], method="bilinear", antialias=True)
    image = tf.image.stateless_random_flip_left_right(image, seeds[2])
    if options["pca_lighting"]:
        image = image + _lighting(seeds[3], float(options["pca_lighting"]))
    return _normalize(image, options["normalization"])


def eval_shapes(options: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Per-example shape of each image field in an eval batch."""
    crop = int(options["crop_size"])
    if options["eval_mode"] == "center":
        return {"image": (crop, crop, 3)}
    if options["eval_mode"] == "10crop":
        return {"image": (10, crop, crop, 3)}
    return {f"image_{s}": (2, s, s, 3) for s in options["multiscale_sizes"]}


def preprocess_eval(encoded: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """JPEG bytes -> the image field(s) of `eval_shapes`, normalised.

    10crop (section 3.4, after AlexNet): four corners and centre of the image resized to 256, and their
    mirrors; [10, 224, 224, 3]. multiscale: for each size S, the image resized to shorter side S and its
    central SxS square, with its mirror: [2, S, S, 3]. The paper runs the network fully convolutionally on
    the whole rectangle; a square keeps one static shape per scale (one compilation) at the price of the
    ends of the longer side (a quarter of a 4:3 image). Both views weigh equally in the average.
    """
    tf = tf_util.tf()
    crop, norm = int(options["crop_size"]), options["normalization"]
    image = decode(encoded)
    if options["eval_mode"] == "multiscale":
        out = {}
        for s in options["multiscale_sizes"]:
            square = _center_crop(resize_shorter(image, s), s, s)
            out[f"image_{s}"] = _normalize(tf.stack([square, tf.image.flip_left_right(square)]), norm)
        return out
    image = resize_shorter(image, int(options["eval_resize"]))
    if options["eval_mode"] == "center":
        return {"image": _normalize(_center_crop(image, crop, crop), norm)}
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    corners = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop), ((h - crop) // 2, (w - crop) // 2)]
    crops = [tf.slice(image, tf.stack([y, x, 0]), [crop, crop, 3]) for y, x in corners]
    views = tf.stack(crops + [tf.image.flip_left_right(c) for c in crops])
    return {"image": _normalize(views, norm)}


# ---------------------------------------------------------------------------------------------- pipelines


def _parse(b: Any) -> Any:
    import tensorflow_datasets as tfds

    features = b.info.features

    def parse(record):
        example = features.deserialize_example(record, decoders={"image": tfds.decode.SkipDecoding()})
        return example["image"], example["label"]

    return parse


def _with_threads(ds: Any, threads: int | None) -> Any:
    tf = tf_util.tf()
    opts = tf.data.Options()
    opts.deterministic = True
    if threads:
        opts.threading.private_threadpool_size = int(threads)
    return ds.with_options(opts)


def _file_plan(paths: list[str], lengths: list[int], file_ids: list[int], seed: int,
               start: int) -> Iterator[tuple[str, np.ndarray]]:
    """(file, record order) for this process' stream from position `start` on, forever; the first file's
    order lacks the records before `start`, which are therefore never decoded."""
    n = sum(lengths)
    epoch, skip = divmod(start, n)
    while True:
        for j in order.permutation(np, seed, epoch, len(paths)):
            records = order.permutation(np, seed, epoch * 1_000_003 + file_ids[j], lengths[j])
            if skip >= lengths[j]:
                skip -= lengths[j]
                continue
            yield paths[j], records[skip:].astype(np.int64)
            skip = 0
        epoch += 1


def train_dataset(data_dir: str | None, split: str, *, local_batch: int, seed: int, start_step: int,
                  process_index: int, process_count: int, options: Mapping[str, Any]) -> Any:
    """This process' training batches (a tf.data.Dataset of numpy-able dicts) from start_step on."""
    tf = tf_util.tf()
    b = builder(data_dir)
    paths, lengths = _files(data_dir, split)
    mine = list(range(process_index, len(paths), process_count))
    s = order.as_seed(seed)
    plan = functools.partial(_file_plan, [paths[i] for i in mine], [lengths[i] for i in mine], mine, s,
                             start_step * local_batch)
    files = tf.data.Dataset.from_generator(plan, output_signature=(tf.TensorSpec([], tf.string),
                                                                   tf.TensorSpec([None], tf.int64)))

    def read(path, records):
        # One file at a time (about 1,250 ImageNet records, 140 MB) so its records can be reordered.
        whole = tf.data.TFRecordDataset(path).batch(1 << 20)
        return whole.map(lambda r: tf.gather(r, records)).unbatch()

    # Each example's draws are seeded by (seed, process, stream position): independent of timing and threads.
    stream_seed = int(order.hash32(np, s, process_index)) & 0x7FFFFFFF
    parse = _parse(b)

    def prepare(position, record):
        encoded, label = parse(record)
        seed_pair = tf.stack([tf.constant(stream_seed, tf.int64), position])
        return {"image": preprocess_train(encoded, seed_pair, options), "label": tf.cast(label, tf.int32)}

    ds = files.flat_map(read).enumerate(start=start_step * local_batch)
    ds = ds.map(prepare, num_parallel_calls=options["threads"] or tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(2)
    return _with_threads(ds, options["threads"])


def train_batches(*, data_dir: str | None, split: str, global_batch_size: int, seed: int, start_step: int,
                  mesh: Mesh, options: Mapping[str, Any]) -> Iterator[dict[str, jax.Array]]:
    local = sharding.local_batch_size(global_batch_size, mesh)
    ds = train_dataset(data_dir, split, local_batch=local, seed=seed, start_step=start_step,
                       process_index=jax.process_index(), process_count=jax.process_count(), options=options)
    return (sharding.global_batch(batch, mesh) for batch in ds.as_numpy_iterator())


def eval_dataset(data_dir: str | None, split: str, *, start: int, stop: int, local_batch: int,
                 options: Mapping[str, Any]) -> Any:
    """Examples [start, stop) of the split in order, preprocessed for evaluation, in batches (last partial)."""
    import tensorflow_datasets as tfds

    tf = tf_util.tf()
    b = builder(data_dir)
    ds = b.as_dataset(split=f"{split}[{start}:{stop}]", shuffle_files=False,
                      decoders={"image": tfds.decode.SkipDecoding()})

    def prepare(position, example):
        out = preprocess_eval(example["image"], options)
        out["label"] = tf.cast(example["label"], tf.int32)
        out["index"] = tf.cast(position, tf.int32)
        return out

    ds = ds.enumerate(start=start).map(prepare, num_parallel_calls=options["threads"] or tf.data.AUTOTUNE,
                                       deterministic=True)
    return _with_threads(ds.batch(local_batch).prefetch(2), options["threads"])


def eval_batches(*, data_dir: str | None, split: str, global_batch_size: int, mesh: Mesh,
                 options: Mapping[str, Any]) -> Iterator[dict[str, jax.Array]]:
    local = sharding.local_batch_size(global_batch_size, mesh)
    n, count = num_examples(data_dir, split), jax.process_count()
    start, stop = eval_lib.shard_range(n, jax.process_index(), count)
    real = (eval_dataset(data_dir, split, start=start, stop=stop, local_batch=local, options=options)
            .as_numpy_iterator() if stop > start else iter(()))
    template = {k: np.zeros((1,) + shape, np.float32) for k, shape in eval_shapes(options).items()}
    template.update(label=np.zeros(1, np.int32), index=np.zeros(1, np.int32))
    for batch in eval_lib.padded_batches(real, local, eval_lib.num_batches(n, count, local), template):
        yield sharding.global_batch(batch, mesh)
