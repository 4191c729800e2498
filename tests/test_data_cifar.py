"""CIFAR-10 as the paper uses it (section 4.2), on the real dataset beside the checkout (see conftest)."""

import itertools
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from resnet_jax import data, sharding
from resnet_jax.data import cifar, order

pytestmark = pytest.mark.skipif(not os.environ.get("TFDS_DATA_DIR"), reason="real CIFAR-10 not found")

FULL = data.DEFAULT_OPTIONS["cifar10"]
VAL = {**FULL, "validation_split": True}


def mesh_of(n):
    return sharding.make_mesh(jax.devices()[:n])


def take(it, k):
    return [{key: np.asarray(v) for key, v in b.items()} for b in itertools.islice(it, k)]


def test_importing_the_package_does_not_import_tensorflow():
    code = "import sys, resnet_jax, resnet_jax.data; assert 'tensorflow' not in sys.modules, 'tf imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_split_sizes_50k_10k_and_45k_5k():
    assert data.num_examples("cifar10", "train", None, FULL) == 50_000
    assert data.num_examples("cifar10", "test", None, FULL) == 10_000
    assert data.num_examples("cifar10", "train", None, VAL) == 45_000
    assert data.num_examples("cifar10", "validation", None, VAL) == 5_000
    images, labels = cifar.load(None, "train", FULL)
    assert images.shape == (50_000, 32, 32, 3) and images.dtype == np.uint8 and labels.shape == (50_000,)
    assert cifar.load(None, "test", FULL)[0].shape == (10_000, 32, 32, 3)


def test_validation_split_is_the_last_5k_disjoint_from_and_covering_the_training_set():
    full, full_labels = cifar.load(None, "train", FULL)
    train, train_labels = cifar.load(None, "train", VAL)
    val, val_labels = cifar.load(None, "validation", VAL)
    assert len(train) == 45_000 and len(val) == 5_000
    np.testing.assert_array_equal(np.concatenate([train, val]), full)
    np.testing.assert_array_equal(np.concatenate([train_labels, val_labels]), full_labels)
    # Disjoint as sets of images too, not just of positions: no validation image occurs in training.
    train_keys = {img.tobytes() for img in train}
    assert not any(img.tobytes() in train_keys for img in val)


def test_labels_are_balanced():
    np.testing.assert_array_equal(np.bincount(cifar.load(None, "train", FULL)[1]), [5_000] * 10)
    np.testing.assert_array_equal(np.bincount(cifar.load(None, "test", FULL)[1]), [1_000] * 10)


def test_mean_image_channel_averages_match_the_known_cifar10_values():
    mean, scale = cifar.statistics(None, FULL)
    assert mean.shape == (32, 32, 3) and float(scale) == 1.0
    # Published values for the lossless CIFAR-10; ours went through JPEG (PROVENANCE.txt), hence 0.5.
    np.testing.assert_allclose(mean.mean(axis=(0, 1)), (125.3, 123.0, 113.9), atol=0.5)
    mean_val, _ = cifar.statistics(None, VAL)
    assert not np.array_equal(mean, mean_val)  # computed from the training split in use


def test_augmented_images_are_windows_of_the_zero_padded_image_or_their_exact_mirrors():
    mesh, batch, seed, step = mesh_of(1), 64, 5, 123
    (b,) = take(data.train_batches("cifar10", data_dir=None, split="train", global_batch_size=batch, seed=seed,
                                   start_step=step, mesh=mesh, options=FULL), 1)
    images, labels = cifar.load(None, "train", FULL)
    mean, _ = cifar.statistics(None, FULL)
    idx = order.batch_indices(np, seed, step, batch, len(images))
    np.testing.assert_array_equal(b["label"], labels[idx])
    padded = np.pad(images[idx].astype(np.float32) - mean, ((0, 0), (4, 4), (4, 4), (0, 0)))
    seen = set()
    for out, pad_img in zip(b["image"], padded):
        # Search all 9 x 9 offsets and both orientations: exactly-equal floats, nothing approximate.
        matches = [(y, x, f) for y in range(9) for x in range(9) for f in (0, 1)
                   if np.array_equal(out, pad_img[y:y + 32, x:x + 32][:, ::-1] if f else pad_img[y:y + 32, x:x + 32])]
        assert matches, "augmented image is no window of the padded image"
        seen.update(matches)
    assert {f for _, _, f in seen} == {0, 1}


def test_crop_offsets_cover_the_padding_and_flips_are_fair():
    dy, dx, flip = order.crop_flip_draws(np, 0, 7, 20_000, 4)
    assert set(np.unique(dy)) == set(range(9)) and set(np.unique(dx)) == set(range(9))
    assert abs(flip.mean() - 0.5) < 0.02


def test_each_epoch_visits_every_example_once():
    n, batch = 1_000, 64  # batch does not divide n, so batches straddle epochs
    stream = np.concatenate([order.batch_indices(np, 9, k, batch, n) for k in range(-(-2 * n // batch))])
    np.testing.assert_array_equal(np.sort(stream[:n]), np.arange(n))
    np.testing.assert_array_equal(np.sort(stream[n:2 * n]), np.arange(n))
    assert not np.array_equal(stream[:n], stream[n:2 * n])  # a fresh order each epoch


@pytest.mark.parametrize("on_device", [False, True])
def test_same_seed_same_batches_and_resuming_at_step_k_continues_the_sequence(on_device):
    mesh, opts = mesh_of(2), {**FULL, "on_device": on_device}

    def run(seed, start, k):
        return take(data.train_batches("cifar10", data_dir=None, split="train", global_batch_size=32, seed=seed,
                                       start_step=start, mesh=mesh, options=opts), k)

    first = run(seed=1, start=0, k=5)
    again = run(seed=1, start=0, k=5)
    resumed = run(seed=1, start=3, k=2)
    for a, b in zip(first + first[3:], again + resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    other = run(seed=2, start=0, k=1)
    assert not np.array_equal(other[0]["label"], first[0]["label"])


@pytest.mark.parametrize("normalization", ["per_pixel_mean", "per_channel"])
def test_host_and_device_paths_give_identical_batches(normalization):
    mesh = mesh_of(2)
    start = 50_000 // 64 - 1  # crosses the first epoch boundary
    out = {}
    for on_device in (False, True):
        opts = {**FULL, "on_device": on_device, "normalization": normalization}
        it = data.train_batches("cifar10", data_dir=None, split="train", global_batch_size=64, seed=4,
                                start_step=start, mesh=mesh, options=opts)
        batches = list(itertools.islice(it, 3))
        assert batches[0]["image"].sharding == sharding.batch_sharding(mesh)
        assert batches[0]["image"].shape == (64, 32, 32, 3) and batches[0]["image"].dtype == np.float32
        assert batches[0]["label"].dtype == np.int32
        out[on_device] = [{k: np.asarray(v) for k, v in b.items()} for b in batches]
    for a, b in zip(out[False], out[True]):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_per_channel_normalization_gives_zero_mean_unit_variance():
    mean, scale = cifar.statistics(None, {**FULL, "normalization": "per_channel"})
    images, _ = cifar.load(None, "train", FULL)
    x = cifar.normalize(images[:20_000], mean, scale)
    np.testing.assert_allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=0.05)
    np.testing.assert_allclose(x.std(axis=(0, 1, 2)), 1.0, atol=0.05)


def _validate(**overrides):
    kwargs = dict(data_dir=None, train_split="train", eval_split="test", global_batch_size=128, mesh=mesh_of(8),
                  options=FULL)
    dataset = overrides.pop("dataset", "cifar10")
    kwargs.update(overrides)
    data.validate(dataset, **kwargs)


@pytest.mark.parametrize("overrides, message", [
    (dict(dataset="cifar100"), "unknown dataset 'cifar100'"),
    (dict(eval_split="validation"), "no split 'validation'"),
    (dict(train_split="trian"), "no split 'trian'"),
    (dict(global_batch_size=100), "does not divide over 8 devices"),
    (dict(global_batch_size=50_008), "exceeds the 50000 examples"),
    (dict(options={**VAL, "normalization": "zca"}), "unknown normalization 'zca'"),
    (dict(options={**FULL, "crop": 3}), "unknown data option(s) crop"),
    (dict(options={**FULL, "train_examples": -5}), "data.train_examples must be 0 (all) or a positive number"),
    (dict(options={**FULL, "train_examples": 1000}, global_batch_size=1008), "exceeds the 1000 examples"),
])
def test_bad_configuration_fails_in_one_line(overrides, message):
    with pytest.raises(ValueError) as e:
        _validate(**overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_train_examples_keeps_the_first_n_training_images_and_their_statistics():
    subset = {**FULL, "train_examples": 5_000}
    assert data.num_examples("cifar10", "train", None, subset) == 5_000
    assert data.num_examples("cifar10", "test", None, subset) == 10_000
    # A subset of the 45k never reaches into the validation images.
    assert data.num_examples("cifar10", "train", None, {**VAL, "train_examples": 50_000}) == 45_000
    full, full_labels = cifar.load(None, "train", FULL)
    images, labels = cifar.load(None, "train", subset)
    np.testing.assert_array_equal(images, full[:5_000])
    np.testing.assert_array_equal(labels, full_labels[:5_000])
    mean, _ = cifar.statistics(None, subset)
    np.testing.assert_allclose(mean, full[:5_000].mean(axis=0), rtol=1e-5)
    # An epoch of the subset visits each of its images once.
    batches = take(data.train_batches("cifar10", data_dir=None, split="train", global_batch_size=1_000, seed=0,
                                      start_step=0, mesh=mesh_of(1), options={**subset, "augment": False}), 5)
    seen = np.concatenate([b["image"] for b in batches]).reshape(5_000, -1)
    assert len({row.tobytes() for row in seen}) == 5_000


def test_validation_split_config_is_accepted():
    _validate(options=VAL, eval_split="validation", global_batch_size=45_000 - 45_000 % 8)


def test_missing_cifar_says_where_it_looked_and_what_to_set(tmp_path):
    with pytest.raises(ValueError) as e:
        _validate(data_dir=str(tmp_path), options={**FULL, "download": False})
    msg = str(e.value)
    assert str(tmp_path) in msg and "TFDS_DATA_DIR" in msg and "data_dir" in msg and "\n" not in msg
