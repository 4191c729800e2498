"""The ImageNet pipeline (sections 3.4, 4.1) on a tiny ImageNet that the tests make: JPEGs of several sizes
(some smaller than the crop), grayscale and CMYK ones, packed as ILSVRC2012_img_{train,val}.tar and prepared
by TFDS' own imagenet2012 builder, so the files and records are those of the real dataset."""

import io
import itertools
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from resnet_jax import data, sharding
from resnet_jax.data import imagenet

pytest.importorskip("tensorflow_datasets")

SYNSETS = ("n01440764", "n01443537", "n01484850")
# (height, width, PIL mode): portrait, landscape, smaller than the crop, grayscale, CMYK.
SHAPES = [(120, 90, "RGB"), (75, 140, "RGB"), (40, 60, "RGB"), (96, 96, "L"), (80, 100, "CMYK")]
NUM_VAL = 7  # divisible by none of 3 and 8 devices


def jpeg(rng, h, w, mode):
    yy, xx = np.mgrid[0:h, 0:w]
    channels = {"L": 1, "RGB": 3, "CMYK": 4}[mode]
    base = np.stack([(yy * (c + 1) * 7 + xx * 3 + rng.integers(0, 255)) % 256 for c in range(channels)], -1)
    pixels = base.astype(np.uint8)[..., 0] if mode == "L" else base.astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import importlib.resources.abc
    import sys

    import tensorflow_datasets as tfds

    # TFDS 4.9.10 lazily imports the `importlib_resources` backport when it prepares a dataset, and this
    # environment lacks it (a user running `tfds build` needs `pip install importlib-resources`). The standard
    # library module offers what TFDS uses from it (abc.Traversable).
    sys.modules.setdefault("importlib_resources", importlib.resources)

    root = tmp_path_factory.mktemp("tiny_imagenet")
    manual = root / "downloads" / "manual"
    manual.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train:
        for synset in SYNSETS:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for i, (h, w, mode) in enumerate(SHAPES):
                    add(t, f"{synset}_{i}.JPEG", jpeg(rng, h, w, mode))
            add(train, f"{synset}.tar", inner.getvalue())
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(NUM_VAL):
            add(val, f"ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg(rng, *SHAPES[i % len(SHAPES)]))
    config = tfds.download.DownloadConfig(manual_dir=str(manual), try_download_gcs=False, num_shards=3)
    tfds.builder("imagenet2012", data_dir=str(root)).download_and_prepare(download_config=config)
    return str(root)


def options(**kw):
    return {**data.DEFAULT_OPTIONS["imagenet2012"], **kw}


def mesh_of(n):
    return sharding.make_mesh(jax.devices()[:n])


def numpy(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def train(data_dir, k, *, start_step=0, seed=0, batch=4, mesh=None, **kw):
    it = data.train_batches("imagenet2012", data_dir=data_dir, split="train", global_batch_size=batch, seed=seed,
                            start_step=start_step, mesh=mesh or mesh_of(2), options=options(**kw))
    return [numpy(b) for b in itertools.islice(it, k)]


def evaluate(data_dir, *, batch=4, mesh=None, **kw):
    it = data.eval_batches("imagenet2012", data_dir=data_dir, split="validation", global_batch_size=batch,
                           mesh=mesh or mesh_of(2), options=options(**kw))
    return [numpy(b) for b in it]


def test_missing_imagenet_names_the_tar_files_the_manual_dir_and_the_command(tmp_path):
    with pytest.raises(ValueError) as e:
        data.validate("imagenet2012", data_dir=str(tmp_path), train_split="train", eval_split="validation",
                      global_batch_size=8, mesh=mesh_of(8), options={})
    msg = str(e.value)
    assert "\n" not in msg
    for part in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", str(tmp_path / "downloads" / "manual"),
                 f"tfds build imagenet2012 --data_dir {tmp_path}"):
        assert part in msg


def test_the_tiny_dataset_is_prepared_like_the_real_one(data_dir):
    assert data.num_examples("imagenet2012", "train", data_dir, {}) == len(SYNSETS) * len(SHAPES)
    assert data.num_examples("imagenet2012", "validation", data_dir, {}) == NUM_VAL
    assert len(imagenet._files(data_dir, "train")[0]) == 3  # several files, as in the real 1024-file split
    data.validate("imagenet2012", data_dir=data_dir, train_split="train", eval_split="validation",
                  global_batch_size=8, mesh=mesh_of(8), options={})


@pytest.mark.parametrize("overrides, message", [
    (dict(global_batch_size=16), "exceeds the 15 examples"),
    (dict(eval_split="test"), "no split 'test'"),
    (dict(options={"eval_mode": "12crop"}), "unknown eval_mode '12crop'"),
    (dict(options={"train_crop": "random"}), "unknown train_crop 'random'"),
])
def test_bad_configuration_fails_in_one_line(data_dir, overrides, message):
    kwargs = dict(data_dir=data_dir, train_split="train", eval_split="validation", global_batch_size=8,
                  mesh=mesh_of(8), options={})
    kwargs.update(overrides)
    with pytest.raises(ValueError) as e:
        data.validate("imagenet2012", **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_grayscale_and_cmyk_jpegs_decode_to_rgb():
    rng = np.random.default_rng(1)
    gray = np.asarray(imagenet.decode(jpeg(rng, 30, 20, "L")))
    assert gray.shape == (30, 20, 3) and np.array_equal(gray[..., 0], gray[..., 2])
    assert np.asarray(imagenet.decode(jpeg(rng, 30, 20, "CMYK"))).shape == (30, 20, 3)


def test_scale_augmentation_draws_the_shorter_side_from_256_to_480():
    sides = np.array([int(imagenet.sample_shorter_side(np.array([3, i]), (256, 480))) for i in range(600)])
    assert sides.min() >= 256 and sides.max() <= 480
    assert sides.min() < 270 and sides.max() > 466  # the whole range is used
    for h, w in [(40, 60), (500, 375), (96, 96)]:
        out = imagenet.resize_shorter(np.zeros((h, w, 3), np.uint8), 300).shape
        assert min(out[:2]) == 300 and abs(out[0] / out[1] - h / w) < 0.01


@pytest.mark.parametrize("train_crop", ["scale", "inception"])
def test_training_batches_shapes_dtypes_and_labels(data_dir, train_crop):
    (batch,) = train(data_dir, 1, train_crop=train_crop)
    assert batch["image"].shape == (4, 224, 224, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(len(SYNSETS)))
    assert np.isfinite(batch["image"]).all() and np.abs(batch["image"]).max() < 255


def test_same_seed_same_batches_and_resuming_at_step_k_continues_the_sequence(data_dir):
    full = train(data_dir, 6, seed=7)  # 24 examples: crosses into the second epoch of 15
    again = train(data_dir, 6, seed=7)
    resumed = train(data_dir, 3, seed=7, start_step=3)
    for a, b in zip(full + full[3:], again + resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(train(data_dir, 1, seed=8)[0]["image"], full[0]["image"])


def test_file_plan_visits_every_record_once_per_epoch_and_resumes_mid_file():
    paths, lengths = ["a", "b", "c"], [4, 5, 3]

    def stream(start, count):
        items = ((p, int(r)) for p, records in imagenet._file_plan(paths, lengths, [0, 1, 2], 11, start)
                 for r in records)
        return list(itertools.islice(items, count))

    two_epochs = stream(0, 24)
    assert sorted(two_epochs[:12]) == sorted(two_epochs[12:]) == sorted((p, r) for p, n in zip(paths, lengths)
                                                                        for r in range(n))
    assert two_epochs[:12] != two_epochs[12:]
    for start in (1, 5, 12, 17):
        assert stream(start, 24 - start) == two_epochs[start:]


def test_center_crop_evaluation(data_dir):
    batches = evaluate(data_dir)
    assert all(b["image"].shape == (4, 224, 224, 3) and b["image"].dtype == np.float32 for b in batches)
    assert sum(b["mask"].sum() for b in batches) == NUM_VAL


def test_ten_crop_gives_ten_views_per_image_the_last_five_mirrors_of_the_first(data_dir):
    views = evaluate(data_dir, eval_mode="10crop")
    center = evaluate(data_dir)
    for b, c in zip(views, center):
        assert b["image"].shape == (4, 10, 224, 224, 3)
        np.testing.assert_array_equal(b["image"][:, 5:], b["image"][:, :5, :, ::-1])
        np.testing.assert_array_equal(b["image"][:, 4], c["image"])  # view 4 is the centre crop


def test_multiscale_gives_two_views_at_each_of_the_five_scales(data_dir):
    (first, *_) = evaluate(data_dir, eval_mode="multiscale")
    assert data.image_keys(first) == ["image_224", "image_256", "image_384", "image_480", "image_640"]
    for s in (224, 256, 384, 480, 640):
        assert first[f"image_{s}"].shape == (4, 2, s, s, 3)
        np.testing.assert_array_equal(first[f"image_{s}"][:, 1], first[f"image_{s}"][:, 0, :, ::-1])


@pytest.mark.parametrize("devices, batch", [(1, 2), (3, 3), (8, 8)])
def test_every_validation_image_is_scored_exactly_once(data_dir, devices, batch):
    batches = evaluate(data_dir, batch=batch, mesh=mesh_of(devices))
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    assert mask.sum() == NUM_VAL
    np.testing.assert_array_equal(np.sort(index[mask == 1]), np.arange(NUM_VAL))
    assert (index[mask == 0] == -1).all()
    pad_images = np.concatenate([b["image"] for b in batches])[mask == 0]
    assert not pad_images.any()
