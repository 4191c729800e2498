"""The networks of He et al. (2015): sizes, structure, modes, precision and errors, checked against the paper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_jax import analysis, models
from resnet_jax.models import analytic_macs, count_params, create, forward_macs, layout


def n_params(name, **options):
    return count_params(models.abstract_variables(create(name, **options))["params"])


# Published counts: the CIFAR nets of section 4.2 (option A) and torchvision's ImageNet nets (option B).
PUBLISHED = {
    "resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018,
    "resnet110": 1_727_962, "resnet1202": 19_421_274,
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_counts_match_published(name):
    assert n_params(name) == PUBLISHED[name]


def test_option_b_counts_cifar():
    assert n_params("resnet20", shortcut="B") == 272_474
    assert n_params("resnet56", shortcut="B") == 855_770


@pytest.mark.parametrize("name", ["resnet20", "resnet18", "resnet50"])
def test_option_a_adds_no_parameters_and_plain_has_no_shortcut(name):
    plain = create(name.replace("resnet", "plain"))
    params = models.abstract_variables(plain)["params"]
    assert not any("proj" in str(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    assert count_params(params) == n_params(name, shortcut="A")


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_option_c_projects_every_block_and_b_only_where_shape_changes(name):
    def blocks_with_projection(shortcut):
        params = models.abstract_variables(create(name, shortcut=shortcut))["params"]
        return {k for k, v in params.items() if k.startswith("stage") and "proj_conv" in v}, \
            {k for k in params if k.startswith("stage")}

    projected_c, blocks = blocks_with_projection("C")
    assert projected_c == blocks
    projected_b, _ = blocks_with_projection("B")
    model = create(name)
    # B projects the first block of each stage that changes the shape: stride 2, or 64 -> 256 in bottlenecks.
    expected = {f"stage{i}_block1" for i in range(2, len(model.stage_sizes) + 1)}
    if model.bottleneck:
        expected.add("stage1_block1")
    assert projected_b == expected


# Table 1, "FLOPs" (multiply-adds), stride on the first 1x1 as in the paper's models.
TABLE1_MACS = {"resnet18": 1.8e9, "resnet34": 3.6e9, "resnet50": 3.8e9, "resnet101": 7.6e9, "resnet152": 11.3e9}


@pytest.mark.parametrize("name", TABLE1_MACS)
def test_multiply_adds_match_table1(name):
    model = create(name, stride_on="1x1")
    dense = analytic_macs(model)
    xla = forward_macs(model)
    valid_taps_only = analytic_macs(model, skip_padding=True)
    # Every kernel tap, as the paper counts: within 5% of Table 1.
    assert dense == pytest.approx(TABLE1_MACS[name], rel=0.05)
    # XLA's cost analysis of the compiled program skips taps that fall on zero padding (6-7% of a basic
    # net's work, mostly on the 7x7 maps of conv5_x) and adds BN and ReLU arithmetic on top.
    assert valid_taps_only <= xla <= 1.05 * valid_taps_only
    if create(name).bottleneck:
        assert xla == pytest.approx(TABLE1_MACS[name], rel=0.05)
    else:
        assert xla == pytest.approx(TABLE1_MACS[name], rel=0.075)


def test_stride_placement_in_bottleneck():
    # v1.5 moves the stride to the 3x3: more work, same parameters.
    assert n_params("resnet50", stride_on="3x3") == n_params("resnet50")
    assert analytic_macs(create("resnet50", stride_on="3x3")) > 1.05 * analytic_macs(create("resnet50"))


def small_batch(model, n=4, seed=0):
    size = 32 if model.stem == "cifar" else 64
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def test_output_shapes_and_he_init():
    model = create("resnet20")
    x = small_batch(model)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert jax.jit(model.apply)(variables, x).shape == (4, 10)
    kernel = variables["params"]["stage2_block1"]["conv2"]["kernel"]
    fan_in = 3 * 3 * 32
    assert float(jnp.std(kernel)) == pytest.approx(np.sqrt(2 / fan_in), rel=0.05)
    imagenet = create("resnet18")
    x = small_batch(imagenet)
    logits = jax.jit(lambda x: imagenet.apply(imagenet.init(jax.random.key(0), x), x))(x)
    assert logits.shape == (4, 1000) and logits.dtype == jnp.float32


def test_train_mode_updates_batch_stats_and_eval_mode_uses_them():
    model = create("resnet20")
    x = small_batch(model) * 3 + 1
    variables = model.init(jax.random.key(0), x)
    logits_train, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    stats_before = variables["batch_stats"]["stem_bn"]
    stats_after = updates["batch_stats"]["stem_bn"]
    assert not np.allclose(stats_before["mean"], stats_after["mean"])
    # Running average with momentum 0.9 starting from mean 0.
    features = jax.lax.conv_general_dilated(
        x, variables["params"]["stem_conv"]["kernel"], (1, 1), [(1, 1), (1, 1)],
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(stats_after["mean"], 0.1 * features.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    # Eval mode reads the running averages: new stats change eval outputs, and eval does not mutate them.
    eval_before = model.apply(variables, x)
    eval_after = model.apply({**variables, **updates}, x)
    assert not np.allclose(eval_before, eval_after)
    # In train mode a batch's own statistics are used, so the same batch gives a different result than eval.
    assert not np.allclose(logits_train, eval_before)


def test_zero_init_last_bn_makes_blocks_identity():
    model = create("resnet20", shortcut="B", zero_init_last_bn=True)
    variables = model.init(jax.random.key(0), small_batch(model))
    assert all(float(jnp.abs(v["bn2"]["scale"]).max()) == 0 for k, v in variables["params"].items()
               if k.startswith("stage"))
    default = create("resnet20").init(jax.random.key(0), small_batch(model))
    assert float(default["params"]["stage1_block1"]["bn2"]["scale"].min()) == 1.0


def test_option_a_shortcut_is_subsample_and_zero_pad():
    from resnet_jax.models.blocks import shortcut

    x = jnp.arange(2 * 4 * 4 * 16, dtype=jnp.float32).reshape(2, 4, 4, 16)
    y = shortcut(x, 32, 2, "A", conv=None, norm=None)
    assert y.shape == (2, 2, 2, 32)
    np.testing.assert_array_equal(y[..., 8:24], x[:, ::2, ::2, :])
    assert float(jnp.abs(y[..., :8]).max()) == 0 and float(jnp.abs(y[..., 24:]).max()) == 0
    assert shortcut(x, 16, 1, "A", conv=None, norm=None) is x


def test_bfloat16_close_to_float32_with_float32_params():
    f32, bf16 = create("resnet20"), create("resnet20", dtype="bfloat16")
    x = small_batch(f32, n=16)
    variables = f32.init(jax.random.key(0), x)
    bf16_vars = bf16.init(jax.random.key(0), x)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(bf16_vars))
    a = np.asarray(f32.apply(variables, x))
    b = np.asarray(bf16.apply(variables, x))
    assert b.dtype == np.float32
    # Measured at init, batch 16: relative max difference 0.6% (ResNet-20), 0.8% (ResNet-56), 0.5% (ResNet-50).
    assert np.abs(a - b).max() / np.abs(a).max() < 0.03
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.75


def test_list_and_config_construction():
    names = models.list_models()
    assert {"resnet18", "resnet152", "plain34", "resnet20", "resnet1202", "plain56"} <= set(names)
    for name in names:
        create(name)  # every listed name builds
    import ml_collections

    cfg = ml_collections.ConfigDict({"name": "resnet50", "shortcut": "C", "stride_on": "3x3"})
    model = models.from_config(cfg)
    assert (model.shortcut, model.stride_on, model.bottleneck) == ("C", "3x3", True)
    assert create("resnet50", family="cifar").stage_sizes == (8, 8, 8)
    assert create("plain20").shortcut == "plain"


@pytest.mark.parametrize("call, message", [
    (lambda: create("resnet21"), "depth 21 is neither an ImageNet depth"),
    (lambda: create("resnet22", family="cifar"), "CIFAR depth must be 6n+2"),
    (lambda: create("resnet20", family="imagenet"), "ImageNet depth 20 has no stage table"),
    (lambda: create("resnet20", shortcut="D"), "unknown shortcut 'D'; allowed: A, B, C, plain"),
    (lambda: create("vgg16"), "unknown model 'vgg16'"),
    (lambda: create("resnet20", stride_on="2x2"), "unknown stride_on '2x2'"),
    (lambda: create("resnet20", dtype="float16"), "unknown dtype 'float16'"),
    (lambda: create("resnet20", widht=3), "unknown model option 'widht'"),
    (lambda: create("plain20", shortcut="B"), "plain20 has no shortcuts"),
    (lambda: create("resnet20", family="mnist"), "unknown family 'mnist'"),
    (lambda: create("resnet20", scan_blocks="yes"), "unknown scan_blocks 'yes'; allowed: True, False"),
])
def test_bad_input_one_clear_line(call, message):
    with pytest.raises(ValueError) as info:
        call()
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, options", [("resnet14", {}), ("plain14", {}), ("resnet18", {"num_classes": 10}),
                                           ("resnet50", {"num_classes": 10, "shortcut": "C"})])
def test_scanned_blocks_compute_the_same_function(name, options):
    model = create(name, **options)
    x = small_batch(model) * 2 + 0.5
    variables = jax.jit(model.init)(jax.random.key(0), x)
    scanned, scanned_vars = layout.scanned(model, variables)
    assert scanned.scan_blocks and "stage1_block2" not in scanned_vars["params"]
    assert jax.tree.map(jnp.shape, scanned_vars) == jax.tree.map(jnp.shape, models.abstract_variables(
        scanned, x.shape[1:]))
    assert count_params(scanned_vars["params"]) == count_params(variables["params"])

    def train_apply(m, v):
        return jax.jit(lambda v: m.apply(v, x, train=True, mutable=["batch_stats"]))(v)

    logits, updates = train_apply(model, variables)
    scanned_logits, scanned_updates = train_apply(scanned, scanned_vars)
    np.testing.assert_allclose(scanned_logits, logits, rtol=1e-5, atol=1e-5)
    back, back_vars = layout.unrolled(scanned, {**scanned_vars, **scanned_updates})
    assert not back.scan_blocks
    for a, b in zip(jax.tree.leaves({**variables, **updates}), jax.tree.leaves(back_vars)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(back_vars) == jax.tree.structure({**variables, **updates})
    # Multiply-adds are counted over every block, not once per scanned stage.
    assert analytic_macs(scanned) == analytic_macs(model)
    # Figure 7's analysis names the layers as the unrolled net does.
    moments = analysis.layer_response_moments(model, variables, x)
    scanned_moments = analysis.layer_response_moments(scanned, scanned_vars, x)
    assert list(scanned_moments) == list(moments)
    np.testing.assert_allclose(np.stack(list(scanned_moments.values())), np.stack(list(moments.values())),
                               rtol=1e-4)


def test_resnet1202_scanned_is_the_published_size():
    assert n_params("resnet1202", scan_blocks=True) == PUBLISHED["resnet1202"]
    params = models.abstract_variables(create("resnet1202", scan_blocks=True))["params"]
    assert params["stage3_repeated"]["block"]["conv1"]["kernel"].shape == (199, 3, 3, 64, 64)
