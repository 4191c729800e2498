"""Throughput of the input pipelines, in images per second (docs/data.md, "Throughput").

    python -m resnet_jax.data.benchmark [--batch 128] [--steps 50] [--skip-cifar]

CIFAR-10 (needs the dataset, see TFDS_DATA_DIR): training batches with augmentation through the public
`train_batches`, host path and on-device path, on the default JAX devices. ImageNet-style: JPEG decode plus
the training augmentation (scale, crop, flip, PCA lighting) and the centre-crop evaluation transform, on one
tf.data thread, over generated JPEGs of ImageNet's typical size, so the number is per CPU core.
"""

import argparse
import io
import itertools
import time

import jax
import numpy as np

from resnet_jax import data, sharding
from resnet_jax.data import imagenet, tf_util


def _rate(batches, batch_size: int, steps: int, warmup: int = 3) -> float:
    for b in itertools.islice(batches, warmup):
        jax.block_until_ready(b)
    start = time.perf_counter()
    for b in itertools.islice(batches, steps):
        jax.block_until_ready(b)
    return batch_size * steps / (time.perf_counter() - start)


def cifar(batch: int, steps: int) -> dict[str, float]:
    """Prints and returns images/s of CIFAR-10 training batches, host and on-device paths."""
    mesh = sharding.make_mesh()
    rates = {}
    for on_device in (False, True):
        options = {**data.DEFAULT_OPTIONS["cifar10"], "on_device": on_device}
        batches = data.train_batches("cifar10", data_dir=None, split="train", global_batch_size=batch, seed=0,
                                     start_step=0, mesh=mesh, options=options)
        rate = _rate(batches, batch, steps)
        path = "device (jitted JAX)" if on_device else "host (numpy)"
        print(f"cifar10 train, augment, {path:20s} {mesh.devices.size} {jax.devices()[0].platform} device(s): "
              f"{rate:10,.0f} images/s")
        rates[f"cifar10 train, augment, {'device' if on_device else 'host'}"] = rate
    return rates


def synthetic_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """JPEGs shaped like ImageNet's (about 500x375, 4:3 either way, quality 90): smooth colour fields with
    texture, so that they compress to ImageNet's typical ~110 KB rather than to noise or to nothing."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        h, w = (375, 500) if i % 3 else (500, 375)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = rng.uniform(0, 6.3, size=3)
        base = np.stack([128 + 80 * np.sin(xx / rng.uniform(20, 90) + yy / rng.uniform(20, 90) + p) for p in phase],
                        -1)
        pixels = np.clip(base + rng.normal(0, 18, size=(h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def imagenet_per_core(count: int, repeats: int) -> dict[str, float]:
    """Prints and returns images/s of the ImageNet transforms on one CPU core."""
    tf = tf_util.tf()
    jpegs = synthetic_jpegs(count)
    print(f"generated {count} JPEGs, mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} KB")
    options = dict(imagenet.DEFAULT_OPTIONS)
    transforms = {
        "imagenet train (decode, scale aug, crop, flip, PCA)": lambda i, x: imagenet.preprocess_train(
            x, tf.stack([tf.constant(0, tf.int64), i]), options),
        "imagenet eval center (decode, resize 256, crop)": lambda i, x: imagenet.preprocess_eval(x, options),
        "imagenet eval 10crop": lambda i, x: imagenet.preprocess_eval(x, {**options, "eval_mode": "10crop"}),
    }
    rates = {}
    for name, fn in transforms.items():
        ds = tf.data.Dataset.from_tensor_slices(jpegs).repeat(repeats).enumerate().map(fn, num_parallel_calls=1)
        opts = tf.data.Options()
        opts.threading.private_threadpool_size = 1
        opts.threading.max_intra_op_parallelism = 1
        ds = ds.with_options(opts)
        for _ in ds.take(8):
            pass
        start = time.perf_counter()
        n = sum(1 for _ in ds)
        rates[f"{name}, 1 CPU core"] = n / (time.perf_counter() - start)
        print(f"{name:52s} 1 CPU core: {rates[f'{name}, 1 CPU core']:10,.0f} images/s")
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--jpegs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--skip-cifar", action="store_true")
    args = parser.parse_args()
    if not args.skip_cifar:
        cifar(args.batch, args.steps)
    imagenet_per_core(args.jpegs, args.repeats)


if __name__ == "__main__":
    main()
