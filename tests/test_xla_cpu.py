"""The XLA:CPU layer computes the same function and the same gradients as XLA's convolution and max pooling
(every speed change keeps the math), and it is applied only where a step is compiled for a CPU."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from resnet_jax import models, optim, xla_cpu
from resnet_jax.sharding import make_mesh
from resnet_jax.train_state import init_train_state
from resnet_jax.train_step import compile_eval_step, compile_train_step
from resnet_jax.xla_cpu import compiler, conv, pool

SYMMETRIC = models.blocks.symmetric_padding


def xla_conv(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def loss_and_grads(fn, x, w, dy):
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(fn(x, w) * dy), argnums=(0, 1)))(x, w)


def rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# (batch, size, c_in, c_out, kernel, stride, padding): every kind of convolution in the networks.
SHAPES = {
    "3x3 s1": (8, 16, 16, 16, 3, 1, SYMMETRIC(3)),
    "3x3 s2 (downsampling)": (8, 16, 16, 32, 3, 2, SYMMETRIC(3)),
    "3x3 s2 odd map": (4, 7, 8, 8, 3, 2, SYMMETRIC(3)),
    "1x1 s1 (bottleneck)": (4, 8, 32, 16, 1, 1, SYMMETRIC(1)),
    "1x1 s2 projection VALID": (4, 8, 16, 32, 1, 2, "VALID"),
    "7x7 s2 stem": (2, 32, 3, 16, 7, 2, SYMMETRIC(7)),
    "3x3 VALID": (4, 9, 4, 8, 3, 1, "VALID"),
    "3x3 SAME string": (4, 8, 4, 8, 3, 2, "SAME"),
}


@pytest.mark.parametrize("name", SHAPES)
def test_auto_conv_matches_xla_forward_and_gradients(name):
    n, size, cin, cout, k, s, padding = SHAPES[name]
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (n, size, size, cin))
    w = jax.random.normal(kw, (k, k, cin, cout))
    y_ref = xla_conv(x, w, (s, s), padding)
    dy = jax.random.normal(kd, y_ref.shape)
    fast = lambda x, w: conv.conv_general_dilated(x, w, (s, s), padding,  # noqa: E731
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    (loss, (dx, dw)), (loss_ref, (dx_ref, dw_ref)) = (loss_and_grads(fast, x, w, dy),
                                                      loss_and_grads(lambda x, w: xla_conv(x, w, (s, s), padding),
                                                                     x, w, dy))
    assert jnp.array_equal(jax.jit(fast)(x, w), jax.jit(lambda x, w: xla_conv(x, w, (s, s), padding))(x, w))
    assert float(loss) == pytest.approx(float(loss_ref), rel=1e-5)
    assert jnp.array_equal(dx, dx_ref)  # XLA's own input gradient, untouched
    assert rel_err(dw, dw_ref) < 1e-5


@pytest.mark.parametrize("chunk", [1, 2, 4])
@pytest.mark.parametrize("w_shape", [(3, 3, 8, 16), (1, 1, 8, 32)])  # dy^T @ patches and patches^T @ dy
def test_weight_gradient_is_the_same_in_any_chunking(chunk, w_shape):
    kx, kd = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (4, 10, 10, 8))
    k = w_shape[0]
    pads = ((k // 2, k // 2),) * 2
    dy = jax.random.normal(kd, (4, 5, 5, w_shape[3]))
    ref = jax.linear_transpose(lambda w: xla_conv(x, w, (2, 2), pads), jnp.zeros(w_shape))(dy)[0]
    got = jax.jit(lambda x, dy: conv.patch_weight_grad(x, dy, w_shape, (2, 2), pads, chunk=chunk))(x, dy)
    assert rel_err(got, ref) < 1e-5


PATCH_CASES = [((3, 3), (1, 1), ((1, 1), (1, 1))), ((3, 3), (2, 2), ((0, 1), (0, 1))),
               ((7, 7), (2, 2), ((3, 3), (3, 3))), ((1, 1), (2, 2), ((0, 0), (0, 0)))]


@pytest.mark.parametrize("kernel, strides, pads", PATCH_CASES)
def test_patches_are_the_flat_concatenation_of_the_kernel_taps(kernel, strides, pads):
    x = jax.random.normal(jax.random.key(2), (2, 11, 11, 5))
    (kh, kw), (sh, sw) = kernel, strides
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    ho, wo = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    flat = jnp.concatenate([xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
                            for i in range(kh) for j in range(kw)], axis=-1)
    assert jnp.array_equal(conv.patches(x, kernel, strides, pads, (ho, wo)), flat)


def test_patches_compile_to_fused_kernels_on_cpu():
    # XLA:CPU leaves a concatenation of more than 8 operands, or one along the minor dimension, unfused: a
    # separate kernel that copies every patch once more (the reason `patches` stacks in two steps).
    x = jax.device_put(jnp.ones((4, 32, 32, 16)), jax.devices("cpu")[0])  # XLA:CPU's program, even beside a GPU
    hlo = jax.jit(lambda x: conv.patches(x, (3, 3), (1, 1), ((1, 1), (1, 1)), (32, 32))).lower(x).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    assert " concatenate(" not in entry and "fusion(" in entry


def test_chunk_divides_the_batch_and_respects_the_budget():
    assert conv.weight_grad_chunk(128, (3, 3, 16, 16), (32, 32)) == 4  # 590 KB of patches per image
    assert conv.weight_grad_chunk(6, (3, 3, 16, 16), (32, 32)) == 6
    assert conv.weight_grad_chunk(10, (3, 3, 16, 16), (32, 32)) == 5  # 7 fit; 5 is the largest divisor
    for batch in (1, 7, 30, 128):
        chunk = conv.weight_grad_chunk(batch, (7, 7, 3, 64), (112, 112))
        assert batch % chunk == 0 and chunk >= 1


def test_unusual_convolutions_fall_back_to_lax():
    x = jnp.ones((2, 8, 8, 4))
    w = jnp.ones((3, 3, 2, 4))  # two feature groups
    got = conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=2)
    want = lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=2)
    assert jnp.array_equal(got, want)


def test_specialize_swaps_only_the_default_layers_on_a_cpu():
    model = models.create("resnet50")
    cpu, options = xla_cpu.specialize(model, "cpu")
    assert cpu.pool is pool.max_pool and cpu.conv.keywords == {"conv_general_dilated": conv.conv_general_dilated}
    assert options == compiler.CPU_OPTIONS
    assert models.model_options(cpu) == models.model_options(model)  # the same architecture, the same record
    a, b = models.abstract_variables(model), models.abstract_variables(cpu)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda u, v: u.shape == v.shape, a, b))
    own = model.clone(conv=functools.partial(nn.Conv, precision="highest"))  # a caller's own convolution stays
    assert xla_cpu.specialize(own, "cpu")[0].conv is own.conv


@pytest.mark.parametrize("platform", ["gpu", "tpu", "cuda", "rocm"])
def test_specialize_changes_nothing_off_the_cpu(platform):
    model = models.create("resnet50")
    assert xla_cpu.specialize(model, platform) == (model, None)
    assert xla_cpu.specialize(model, "cpu", enabled=False) == (model, None)


def one_sgd_step(name: str, image: int, layer: bool, options: dict[str, str] | None):
    """(state, metrics) after one SGD step of `name`, with or without the layer's gradients, compiled with
    `options`."""
    tx = optim.sgd(optax.constant_schedule(0.1))
    mesh = make_mesh(jax.devices()[:1])
    batch = {"image": jax.random.normal(jax.random.key(2), (8, image, image, 3)),
             "label": jnp.arange(8, dtype=jnp.int32) % 10}
    model = models.create(name, num_classes=10)
    state = init_train_state(model, tx, seed=0, image_shape=(image, image, 3))
    if layer:
        model, _ = xla_cpu.specialize(model, "cpu")
    step = compile_train_step(mesh, model=model, compiler_options=options, tx=tx, schedule=optax.constant_schedule(0.1))
    return step(state, batch)


def assert_same_step(a, b, params_atol: float = 1e-6):
    (s_a, m_a), (s_b, m_b) = a, b
    assert float(m_a["loss"]) == pytest.approx(float(m_b["loss"]), rel=1e-6)
    assert float(m_a["grad_norm"]) == pytest.approx(float(m_b["grad_norm"]), rel=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(s_a.params), jax.tree_util.tree_leaves(s_b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=params_atol)


@pytest.mark.parametrize("name, image", [("resnet20", 16), ("resnet18", 64)])
def test_train_step_is_the_same_with_the_layers_gradients(name, image):
    """One SGD step of a whole network (CIFAR basic blocks with option A; ImageNet stem, max-pool, stride-2
    and projection shortcuts) with the layer's gradients and with XLA's, both compiled with the layer's
    compiler options: same loss, gradient norm and parameters."""
    options = compiler.compiler_options()
    assert_same_step(one_sgd_step(name, image, True, options), one_sgd_step(name, image, False, options))


def test_cpu_compiler_options_keep_the_function():
    """The options only move the convolutions from YNNPACK's kernels to Eigen's: the straightforward step of
    ResNet-20 is the same with them. (Through a max-pool the comparison is chaotic: a float32 rounding that
    flips a ReLU or a window's maximum reroutes that gradient, so ResNet-18's parameters after one step differ
    by up to 5.5e-4 while its loss and gradient norm agree; measured 2026-11-29.)"""
    straightforward = one_sgd_step("resnet20", 16, False, None)
    assert_same_step(one_sgd_step("resnet20", 16, False, compiler.CPU_OPTIONS), straightforward)
    assert_same_step(one_sgd_step("resnet20", 16, True, compiler.CPU_OPTIONS), straightforward)
    assert_same_step(one_sgd_step("resnet18", 64, True, compiler.CPU_OPTIONS),
                     one_sgd_step("resnet18", 64, False, None), params_atol=2e-3)


def test_bfloat16_weight_gradient_close_to_float32():
    kx, kw, kd = jax.random.split(jax.random.key(3), 3)
    x, w = jax.random.normal(kx, (4, 8, 8, 8)), jax.random.normal(kw, (3, 3, 8, 8))
    dy = jax.random.normal(kd, (4, 8, 8, 8))
    pad = SYMMETRIC(3)
    fast = lambda x, w: conv.conv_general_dilated(x, w, (1, 1), pad,  # noqa: E731
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    _, (_, dw16) = loss_and_grads(fast, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), dy.astype(jnp.bfloat16))
    _, (_, dw32) = loss_and_grads(fast, x, w, dy)
    assert dw16.dtype == jnp.bfloat16
    assert rel_err(dw16.astype(jnp.float32), dw32) < 0.02


def test_users_own_ynn_fusion_list_wins(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert compiler.compiler_options() == compiler.CPU_OPTIONS
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-dot")
    assert compiler.compiler_options() is None
    assert xla_cpu.specialize(models.create("resnet20"), "cpu")[1] is None


def test_cpu_compiler_options_reach_the_compiler():
    """This jaxlib knows the options (a rename upstream would silently lose the speed-up), and the train and
    eval steps hand the options they are given to XLA: a bad value there fails their compilation."""
    assert compiler.accepted(tuple(compiler.CPU_OPTIONS.items()))
    assert not compiler.accepted(((compiler.YNN_FUSIONS, "NOT_A_FUSION_TYPE"),))
    bad = {compiler.YNN_FUSIONS: "NOT_A_FUSION_TYPE"}
    model = models.create("resnet20", num_classes=10)
    tx = optim.sgd(optax.constant_schedule(0.1))
    state = init_train_state(model, tx, seed=0, image_shape=(8, 8, 3))
    batch = {"image": jnp.zeros((2, 8, 8, 3)), "label": jnp.zeros((2,), jnp.int32)}
    mesh = make_mesh(jax.devices("cpu")[:1])
    for step in (compile_train_step(mesh, model=model, compiler_options=bad, tx=tx,
                                    schedule=optax.constant_schedule(0.1)),
                 compile_eval_step(mesh, model, bad)):
        with pytest.raises(Exception, match="NOT_A_FUSION_TYPE"):
            step.lower(state, batch).compile()


@pytest.mark.parametrize("shape", [(4, 16, 16, 8), (2, 15, 13, 3)])  # even and odd maps
def test_max_pool_gradient_picks_xla_s_element(shape):
    """The same forward; the gradient at the same positions (the first maximum of each window, ties included:
    post-ReLU zeros and repeated values), equal within float32 rounding where windows overlap."""
    x = jnp.maximum(jax.random.normal(jax.random.key(4), shape), 0.0)
    x = x.at[:, ::3, ::2].set(1.0)
    pads = SYMMETRIC(3)
    ref_fn = lambda x: nn.max_pool(x, (3, 3), (2, 2), padding=pads)  # noqa: E731
    ours_fn = lambda x: pool.max_pool(x, (3, 3), (2, 2), pads)  # noqa: E731
    y_ref, vjp_ref = jax.vjp(ref_fn, x)
    y, vjp = jax.vjp(ours_fn, x)
    assert jnp.array_equal(y, y_ref)
    dy = jax.random.normal(jax.random.key(5), y.shape)
    dx_ref, dx = jax.jit(vjp_ref)(dy)[0], jax.jit(vjp)(dy)[0]
    assert jnp.array_equal(dx != 0, dx_ref != 0)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-6)
    zeros = jnp.zeros((1, 8, 8, 2))  # every window tied: the first (top-left) element takes it all
    ones = jnp.ones((1, 4, 4, 2))
    assert jnp.array_equal(jax.vjp(ours_fn, zeros)[1](ones)[0], jax.vjp(ref_fn, zeros)[1](ones)[0])
