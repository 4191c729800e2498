"""The train step, schedules and sharding: one step for every device count, the paper's recipes."""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import models, optim, xla_cpu
from resnet_jax.sharding import global_batch, make_mesh, mesh_platform
from resnet_jax.train_state import init_train_state
from resnet_jax.train_step import compile_train_step, forward_train, train_step
from resnet_jax.trainer import flat_params


def tiny_setup(ghost_batch_size=0, weight_decay=1e-4):
    model = models.create("resnet8")  # 6n+2 with n=1: every kind of block, compiles in seconds
    schedule = optim.learning_rate_schedule(name="step", base_learning_rate=0.1, num_train_steps=10)
    tx = optim.sgd(schedule, weight_decay=weight_decay)
    return model, schedule, tx


def batches(n_steps, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    return [{"image": rng.normal(size=(batch, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, 10, batch).astype(np.int32)} for _ in range(n_steps)]


def train_on(devices, ghost_batch_size, data):
    """The state after `data`, each step compiled as training compiles it for `devices`."""
    model, schedule, tx = tiny_setup()
    mesh = make_mesh(devices)
    state = jax.jit(lambda: init_train_state(model, tx, 0))()
    compiled, options = xla_cpu.specialize(model, mesh_platform(mesh))
    step = compile_train_step(mesh, model=compiled, compiler_options=options, tx=tx, schedule=schedule,
                              ghost_batch_size=ghost_batch_size)
    for b in data:
        state, _ = step(state, global_batch(b, mesh))
    return state


@pytest.mark.parametrize("ghost_batch_size", [0, 4])
def test_one_and_eight_devices_give_the_same_parameters(ghost_batch_size):
    assert len(jax.devices()) == 8, "conftest sets 8 virtual CPU devices"
    data = batches(3, batch=32)
    one = train_on(jax.devices()[:1], ghost_batch_size, data)
    eight = train_on(jax.devices(), ghost_batch_size, data)
    # atol 1e-5: on CPU the CIFAR nets' convolutions run in Eigen's kernels (resnet_jax/xla_cpu/compiler.py), whose
    # summation order depends on the batch each device holds; three steps at lr 0.1 grow that float32 rounding
    # to 6e-6 here. BN statistics per device instead of global (ghost batches of 4) differ by 5e-3.
    np.testing.assert_allclose(flat_params(eight), flat_params(one), rtol=2e-5, atol=1e-5)
    stats = lambda s: np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(jax.device_get(s.batch_stats))])  # noqa: E731
    np.testing.assert_allclose(stats(eight), stats(one), rtol=2e-5, atol=2e-6)
    assert int(eight.step) == 3


def test_ghost_batches_normalise_each_group_on_its_own():
    model, _, _ = tiny_setup()
    x = jnp.asarray(batches(1, batch=8)[0]["image"])
    x = x.at[4:].multiply(5.0)  # two groups with different statistics
    variables = jax.jit(model.init)(jax.random.key(0), x)
    forward = {k: jax.jit(lambda v, x, k=k: forward_train(model, v, x, k)[0]) for k in (0, 4, 8)}
    whole, groups, same = (forward[k](variables, x) for k in (0, 4, 8))
    first_half = forward[0](variables, x[:4])
    np.testing.assert_allclose(groups[:4], first_half, rtol=1e-5, atol=1e-5)
    assert not np.allclose(groups, whole, atol=1e-3)
    # One group of the whole batch is global BN.
    np.testing.assert_allclose(same, whole, rtol=1e-5, atol=1e-5)


def test_first_step_is_sgd_with_l2_weight_decay():
    model, schedule, tx = tiny_setup(weight_decay=1e-4)
    state = jax.jit(lambda: init_train_state(model, tx, 0))()
    batch = {k: jnp.asarray(v) for k, v in batches(1)[0].items()}

    def loss(params):
        logits, _ = forward_train(model, {"params": params, "batch_stats": state.batch_stats}, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    grads = jax.jit(jax.grad(loss))(state.params)
    expected = jax.tree_util.tree_map(lambda p, g: p - 0.1 * (g + 1e-4 * p), state.params, grads)
    new_state, metrics = jax.jit(functools.partial(train_step, model=model, tx=tx, schedule=schedule))(state, batch)
    for a, b in zip(jax.tree_util.tree_leaves(new_state.params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(metrics["learning_rate"]) == pytest.approx(0.1)
    assert float(metrics["grad_norm"]) == pytest.approx(float(optax.tree.norm(grads)), rel=1e-5)
    assert 0.0 <= float(metrics["top1_error"]) <= 1.0 and float(metrics["top5_error"]) <= float(metrics["top1_error"])


def test_cifar_schedule_divides_at_32k_and_48k_and_scales_with_length():
    s = optim.learning_rate_schedule(name="step", base_learning_rate=0.1, num_train_steps=64_000)
    assert [float(s(k)) for k in (0, 31_999, 32_000, 47_999, 48_000, 63_999)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    short = optim.learning_rate_schedule(name="step", base_learning_rate=0.1, num_train_steps=6_400)
    assert [float(short(k)) for k in (3_199, 3_200, 4_800)] == pytest.approx([0.1, 0.01, 0.001])


def test_resnet110_warms_up_at_001_then_returns_to_01():
    s = optim.learning_rate_schedule(name="step", base_learning_rate=0.1, num_train_steps=64_000,
                                     warmup_steps=400, warmup="constant", warmup_learning_rate=0.01)
    assert [float(s(k)) for k in (0, 399, 400, 31_999, 32_000)] == pytest.approx([0.01, 0.01, 0.1, 0.1, 0.01])


def test_linear_warmup_and_cosine():
    s = optim.learning_rate_schedule(name="cosine", base_learning_rate=1.6, num_train_steps=1000,
                                     warmup_steps=100, warmup="linear")
    assert float(s(0)) == pytest.approx(0.0)
    assert float(s(50)) == pytest.approx(0.8)
    assert float(s(100)) == pytest.approx(1.6)
    assert float(s(550)) == pytest.approx(0.8, rel=1e-3)
    assert float(s(1000)) == pytest.approx(0.0, abs=1e-6)


def test_linear_scaling_rule_from_config():
    from experiments.configs.imagenet import resnet50
    from resnet_jax.config import base_learning_rate

    c = resnet50.get_config()
    assert base_learning_rate(c) == pytest.approx(0.1)
    c.batch_size, c.optimizer.reference_batch_size = 4096, 256
    assert base_learning_rate(c) == pytest.approx(1.6)


def test_weight_decay_mask():
    params = models.abstract_variables(models.create("resnet8"))["params"]
    everything = optim.weight_decay_mask(params, "all")
    kernels = optim.weight_decay_mask(params, "kernels")
    assert all(jax.tree_util.tree_leaves(everything))
    assert kernels["stem_conv"]["kernel"] and kernels["head"]["kernel"]
    assert not kernels["stem_bn"]["scale"] and not kernels["stem_bn"]["bias"] and not kernels["head"]["bias"]
    with pytest.raises(ValueError, match="unknown weight_decay_on 'bn'"):
        optim.sgd(optax.constant_schedule(0.1), weight_decay_on="bn")


def test_model_and_train_step_run_without_tensorflow(tmp_path):
    """The GPU machines have no TensorFlow: with it made unimportable, the model, the train step, checkpoints
    and launch.py on synthetic data still work."""
    code = (
        "import sys; sys.modules['tensorflow'] = None; sys.modules['tensorflow_datasets'] = None\n"
        "sys.argv = ['launch.py', '--config', 'experiments/configs/cifar10/quick.py', '--workdir', sys.argv[1],\n"
        "            '--config.dataset=synthetic', '--config.model.name=resnet8', '--config.batch_size=8',\n"
        "            '--config.eval_batch_size=8', '--config.num_train_steps=2', '--config.log_every_steps=1']\n"
        "import runpy; runpy.run_path('launch.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                            timeout=600, cwd=pathlib.Path(__file__).resolve().parents[1],
                            env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 2/2" in result.stdout and (tmp_path / "checkpoints" / "2").exists()
