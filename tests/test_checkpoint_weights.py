"""Weights in and out: a checkpoint exported to .npz/.safetensors and read back is identical; Keras weights give
Keras' logits after a round trip through a file; a torchvision state dict maps every key, numerically right, and
is never applied to a network that computes something else."""

import json
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import checkpoint, export, models, restore, trainer, weights
from resnet_jax.sharding import make_mesh
from resnet_jax.weights import formats
from tests.keras_models import import_keras, randomize
from tests.test_checkpoint import synthetic_config


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_export_then_import_gives_identical_variables(tmp_path, suffix):
    run = trainer.Run(synthetic_config(), str(tmp_path / "run"), mesh=make_mesh(jax.devices()[:1]))
    state = run._init()
    checkpoint.save(run.checkpoints, 3, state, run.meta())
    run.checkpoints.wait_until_finished()
    out = export.export_checkpoint(tmp_path / "run", tmp_path / f"resnet8{suffix}")
    model, variables, meta = weights.load(out)
    assert_trees_equal(variables, jax.device_get(state.variables))
    assert meta["model"] == "resnet8" and meta["step"] == 3 and model == run.model
    assert meta["model_options"] == run.meta()["model_options"]  # one record for checkpoints and files
    flat, _ = formats.read(out)
    assert flat["params/stage1_block1/conv1/kernel"].shape == (3, 3, 16, 16)
    assert "batch_stats/stage3_block1/bn2/var" in flat
    model, loaded, config = restore.load(out)
    assert model == models.from_config(run.config.model) and config.model.name == "resnet8"
    assert_trees_equal(loaded, variables)


def test_safetensors_reader_reads_bfloat16_and_metadata(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, -2], np.int64)}
    formats.write_safetensors(tmp_path / "x.safetensors", arrays, {"k": "v"})
    read, meta = formats.read_safetensors(tmp_path / "x.safetensors")
    assert meta == {"k": "v"}
    assert_trees_equal(read, arrays)
    # bfloat16 (what many published weights use) is the top half of a float32.
    values = np.array([1.5, -2.0, 3.140625], np.float32)
    raw = (values.view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, len(raw)]}}).encode()
    (tmp_path / "bf.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + raw)
    np.testing.assert_array_equal(formats.read_safetensors(tmp_path / "bf.safetensors")[0]["w"], values)


def randomized_keras_resnet50(size):
    keras = import_keras()
    return randomize(keras.applications.ResNet50(weights=None, input_shape=(size, size, 3),
                                                 classifier_activation=None, classes=7))


def test_keras_resnet50_weights_through_a_file_give_keras_logits(tmp_path):
    keras_model = randomized_keras_resnet50(64)
    images = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    expected = np.asarray(keras_model(images, training=False))
    converted = weights.from_keras(keras_model)
    assert converted.meta["create_options"] == {"shortcut": "B", "stride_on": "1x1", "num_classes": 7,
                                                "bn_epsilon": 1e-5}
    path = weights.save(tmp_path / "keras_resnet50.npz", converted)
    loaded_model, variables, _ = restore.load(path)
    assert loaded_model == converted.model
    logits = np.asarray(jax.jit(loaded_model.apply)(variables, images))
    # Measured: about 5e-7 (float32 rounding in a different summation order).
    assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-5


# torchvision.models.resnet: (block, layers); BasicBlock expansion 1, Bottleneck expansion 4; stride on the
# first block of layers 2-4, in the 3x3 (conv2) of a Bottleneck; downsample where the shape changes.
TORCHVISION = {18: ("basic", [2, 2, 2, 2]), 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3]),
               101: ("bottleneck", [3, 4, 23, 3]), 152: ("bottleneck", [3, 8, 36, 3])}


def torchvision_table(depth, num_classes=1000):
    """{key: shape} of torchvision's resnet<depth>().state_dict(), from its architecture definition."""
    block, layers = TORCHVISION[depth]
    expansion = 1 if block == "basic" else 4
    table = {"conv1.weight": (64, 3, 7, 7)}

    def bn(prefix, c):
        table.update({f"{prefix}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")})
        table[f"{prefix}.num_batches_tracked"] = ()

    bn("bn1", 64)
    inplanes = 64
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers), start=1):
        for b in range(blocks):
            p = f"layer{i}.{b}"
            if block == "basic":
                convs = [(planes, inplanes, 3), (planes, planes, 3)]
            else:
                convs = [(planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)]
            for j, (out, inp, k) in enumerate(convs, start=1):
                table[f"{p}.conv{j}.weight"] = (out, inp, k, k)
                bn(f"{p}.bn{j}", out)
            stride = 2 if i > 1 and b == 0 else 1
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                table[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    table["fc.weight"], table["fc.bias"] = (num_classes, 512 * expansion), (num_classes,)
    return table


def random_state_dict(table, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in table.items():
        if key.endswith("num_batches_tracked"):
            out[key] = np.array(100, np.int64)
        elif key.endswith("running_var"):
            out[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        elif key.endswith(("running_mean", "bias")):
            out[key] = rng.normal(0, 0.1, shape).astype(np.float32)
        elif len(shape) == 4:
            out[key] = (rng.normal(0, 1, shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)
        elif key.startswith("fc."):
            out[key] = rng.normal(0, 0.05, shape).astype(np.float32)
        else:
            out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    return out


@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152])
def test_torchvision_state_dict_maps_every_key(depth):
    table = torchvision_table(depth)
    state_dict = {k: np.zeros(s, np.float32) for k, s in table.items()}
    model, variables, meta = weights.from_torchvision(state_dict)  # raises on any key or variable left over
    options = {"shortcut": "B", "stride_on": "3x3", "num_classes": 1000}
    assert meta["model"] == f"resnet{depth}" and meta["create_options"] == options
    assert model == models.create(f"resnet{depth}", **options)
    abstract = models.abstract_variables(model)
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(variables)
    # The parameter count is torchvision's (11,689,512 for resnet18 ... 60,192,808 for resnet152).
    trainable = sum(np.prod(s) for k, s in table.items() if not k.endswith(("running_mean", "running_var",
                                                                           "num_batches_tracked")))
    assert models.count_params(variables["params"]) == trainable
    with pytest.raises(ValueError, match="keys not mapped onto"):
        weights.from_torchvision({**state_dict, "layer9.0.extra.weight": np.zeros(1)})


def torchvision_forward(sd, images_nchw, depth):
    """torchvision's ResNet forward (eval mode) written directly on its state dict, in its layouts (NCHW
    activations, OIHW kernels): an independent reference for the mapping."""
    def conv(x, key, stride=1):
        w = sd[key]
        pad = w.shape[-1] // 2
        return jax.lax.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2,
                                            dimension_numbers=("NCHW", "OIHW", "NCHW"))

    def bn(x, p):
        shape = (1, -1, 1, 1)
        return (x - sd[f"{p}.running_mean"].reshape(shape)) / jnp.sqrt(sd[f"{p}.running_var"].reshape(shape)
                                                                         + 1e-5) \
            * sd[f"{p}.weight"].reshape(shape) + sd[f"{p}.bias"].reshape(shape)

    block, layers = TORCHVISION[depth]
    x = jax.nn.relu(bn(conv(images_nchw, "conv1.weight", 2), "bn1"))
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 3, 3), (1, 1, 2, 2), [(0, 0), (0, 0), (1, 1), (1, 1)])
    for i, blocks in enumerate(layers, start=1):
        for b in range(blocks):
            p, stride = f"layer{i}.{b}", 2 if i > 1 and b == 0 else 1
            n = 2 if block == "basic" else 3
            y = x
            for j in range(1, n + 1):
                s = stride if (block == "basic" and j == 1) or (block != "basic" and j == 2) else 1
                y = bn(conv(y, f"{p}.conv{j}.weight", s), f"{p}.bn{j}")
                if j < n:
                    y = jax.nn.relu(y)
            identity = bn(conv(x, f"{p}.downsample.0.weight", stride), f"{p}.downsample.1") \
                if f"{p}.downsample.0.weight" in sd else x
            x = jax.nn.relu(y + identity)
    return x.mean(axis=(2, 3)) @ sd["fc.weight"].T + sd["fc.bias"]


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_weights_give_torchvision_logits(tmp_path, depth):
    sd = random_state_dict(torchvision_table(depth, num_classes=5))
    path = tmp_path / f"resnet{depth}.safetensors"
    formats.write_safetensors(path, sd)
    out = export.import_torchvision(path, tmp_path / f"resnet{depth}.npz")
    model, variables, _ = restore.load(out)
    assert model.stride_on == "3x3" and model.num_classes == 5
    images = np.random.default_rng(1).normal(size=(2, 64, 64, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(model.apply)(variables, images))
    reference = np.asarray(jax.jit(lambda x: torchvision_forward(sd, x, depth))(images.transpose(0, 3, 1, 2)))
    assert np.abs(ours - reference).max() / np.abs(reference).max() < 1e-4


@pytest.fixture(scope="module")
def torchvision_resnet50(tmp_path_factory):
    """A torchvision ResNet-50 state dict in a .safetensors file, as DataParallel saves it (`module.` names)."""
    sd = random_state_dict(torchvision_table(50, num_classes=5))
    path = tmp_path_factory.mktemp("tv") / "resnet50.safetensors"
    formats.write_safetensors(path, {f"module.{k}": v for k, v in sd.items()})
    return path, sd


def test_torchvision_weights_refuse_a_network_that_downsamples_elsewhere(tmp_path, torchvision_resnet50):
    """models.create("resnet50") downsamples in the first 1x1, torchvision's in the 3x3: the shapes agree and the
    functions differ, so every loading path builds the matching network or refuses in one line."""
    path, sd = torchvision_resnet50
    default = models.create("resnet50", num_classes=5)
    assert default.stride_on == "1x1"
    expected = "the weights in .* are resnet50 with stride_on='3x3'; the model given has stride_on='1x1'"
    with pytest.raises(ValueError, match=expected) as info:
        weights.load(path, model=default)
    assert "\n" not in str(info.value) and "models.create('resnet50', shortcut='B', stride_on='3x3'" in str(info.value)
    # Without a model, or with the right one, the raw file (module. prefix and all) loads as its own network.
    for model in (None, models.create("resnet50", stride_on="3x3", num_classes=5)):
        loaded = weights.load(path, model=model)
        assert loaded.model.stride_on == "3x3"
    assert restore.load(path).model.stride_on == "3x3"
    out = export.import_torchvision(path, tmp_path / "r50.npz")
    with pytest.raises(ValueError, match=expected):
        weights.load(out, model=default)
    images = np.random.default_rng(2).normal(size=(1, 64, 64, 3)).astype(np.float32)
    model, variables, _ = weights.load(out)
    reference = np.asarray(jax.jit(lambda x: torchvision_forward(sd, x, 50))(images.transpose(0, 3, 1, 2)))
    ours = np.asarray(jax.jit(model.apply)(variables, images))
    assert np.abs(ours - reference).max() / np.abs(reference).max() < 1e-4


def test_files_that_are_not_weights_say_what_they_are(tmp_path):
    unknown = tmp_path / "unknown.safetensors"
    formats.write_safetensors(unknown, {"encoder.weight": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match=r"holds neither resnet_jax weights \(no metadata\) nor a torchvision ResNet"):
        restore.load(unknown)
    with pytest.raises(ValueError, match="unknown weights format '.h5'"):
        weights.load(tmp_path / "x.h5")
    with pytest.raises(SystemExit, match=r"^error: unknown weights format '.onnx'"):
        export.main([str(tmp_path), str(tmp_path / "out.onnx")])
    with pytest.raises(ValueError, match="need the record of their network"):
        weights.save(tmp_path / "bare.npz", ({"params": {}}, {}))
