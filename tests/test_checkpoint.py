"""Checkpoints in one process: exact resume, keep last K and best by validation error, restore on another
device count, one-line mismatch errors, fallback past a damaged checkpoint, NaN stops without saving."""

import pathlib
import shutil

import jax
import numpy as np
import pytest

from resnet_jax import checkpoint, restore, trainer
from resnet_jax import config as config_lib
from resnet_jax.sharding import make_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
def one_device():
    # Eight virtual devices time-share two cores; one is faster and avoids XLA's collective timeouts.
    return make_mesh(jax.devices()[:1])


def synthetic_config(**overrides):
    base = {"dataset": "synthetic", "model.name": "resnet8", "batch_size": 8, "eval_batch_size": 8,
            "num_train_steps": 6, "log_every_steps": 1, "eval_every_steps": 1000, "checkpoint_every_steps": 2,
            "eval_splits": ()}
    return config_lib.load(str(ROOT / "experiments/configs/cifar10/quick.py"), {**base, **overrides})


def write_initial_checkpoint(config, workdir, mesh, step=2):
    """A checkpoint of a freshly initialised state, written without compiling a train step."""
    run = trainer.Run(config, str(workdir), mesh=mesh)
    state = run._init()
    checkpoint.save(run.checkpoints, step, state, run.meta())
    run.checkpoints.wait_until_finished()
    return state


def leaves(state):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(state))]


def test_stop_and_resume_equals_uninterrupted_bit_for_bit_on_real_cifar10(tmp_path):
    """Real CIFAR-10 through the on-device pipeline (random crops and flips), resnet8, 24 steps with the step
    schedule's first decay at step 12, checkpoints every 5: stopped at 10 and at 17, then resumed."""
    c = config_lib.load(str(ROOT / "experiments/configs/cifar10/quick.py"), {
        "model.name": "resnet8", "batch_size": 32, "num_train_steps": 24, "log_every_steps": 8,
        "eval_every_steps": 1000, "checkpoint_every_steps": 5, "eval_splits": ()})
    whole = trainer.train_and_evaluate(c, str(tmp_path / "whole"), mesh=one_device())
    # One Run (one compilation); every train() call restores from the newest checkpoint on disk.
    run = trainer.Run(c, str(tmp_path / "parts"), mesh=one_device())
    assert run.train(stop_after=10)["step"] == 10
    assert run.train(stop_after=7)["step"] == 17
    resumed = run.train()
    assert resumed["step"] == 24
    for a, b in zip(leaves(whole["state"]), leaves(resumed["state"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_keeps_last_k_and_the_best_by_validation_error(tmp_path):
    mngr = checkpoint.manager(tmp_path, max_to_keep=2, keep_best=True, async_save=False)
    state = {"w": np.zeros(3, np.float32)}
    errors = {1: None, 2: 0.30, 3: 0.20, 4: None, 5: 0.25, 6: 0.40, 7: None}
    for step, error in errors.items():
        checkpoint.save(mngr, step, state, {"model": "x"}, None if error is None else {"top1_error": error})
    mngr.wait_until_finished()
    assert sorted(mngr.all_steps()) == [3, 6, 7]  # the last two, and the lowest validation error
    assert mngr.best_step() == 3
    # Reopened (as by a resumed run), the metrics are read back and the same checkpoints survive.
    again = checkpoint.manager(tmp_path, max_to_keep=2, keep_best=True, async_save=False)
    checkpoint.save(again, 8, state, {"model": "x"}, None)
    again.wait_until_finished()
    assert sorted(again.all_steps()) == [3, 7, 8]


def test_only_a_non_test_split_ranks_checkpoints():
    c = synthetic_config(eval_splits=("test",))
    assert trainer.best_checkpoint_split(c) is None
    c = synthetic_config(eval_splits=("test", "validation"))
    assert trainer.best_checkpoint_split(c) == "validation"
    c.keep_best_checkpoint = False
    assert trainer.best_checkpoint_split(c) is None


def test_training_saves_validation_error_beside_evaluated_checkpoints(tmp_path):
    # Synthetic data ignores the split name, so "validation" here is only a label; what is tested is that the
    # trainer saves at every evaluation with the validation error and keeps last K plus the best.
    c = synthetic_config(num_train_steps=8, eval_every_steps=2, checkpoint_every_steps=3, keep_checkpoints=1,
                         eval_splits=("validation", "test"))
    trainer.train_and_evaluate(c, str(tmp_path), mesh=one_device())
    mngr = checkpoint.manager(tmp_path, keep_best=True, read_only=True, async_save=False)
    metrics = {s: mngr.metrics(s) for s in mngr.all_steps()}
    assert 8 in metrics and mngr.best_step() in metrics
    assert set(metrics) == {8, mngr.best_step()}
    assert all(set(m) <= {"top1_error"} for m in metrics.values())
    assert restore.load(tmp_path, best=True).config.model.name == "resnet8"
    assert restore.evaluate(tmp_path, split="test", best=True)["num_examples"] == 16  # 2 synthetic batches of 8


def test_written_on_8_devices_restores_on_1_and_the_reverse(tmp_path):
    assert len(jax.devices()) == 8
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
    for written, read in ((jax.devices(), jax.devices()[:1]), (jax.devices()[:1], jax.devices())):
        workdir = tmp_path / f"{len(written)}to{len(read)}"
        saved = write_initial_checkpoint(synthetic_config(batch_size=16), workdir, make_mesh(written))
        assert {d for x in jax.tree_util.tree_leaves(saved) for d in x.sharding.device_set} == set(written)
        state, meta, step = restore.load_state(workdir, mesh=make_mesh(read))
        assert step == 2 and meta["next_batch"] == 2
        assert {d for x in jax.tree_util.tree_leaves(state) for d in x.sharding.device_set} == set(read)
        for a, b in zip(leaves(saved), leaves(state), strict=True):
            np.testing.assert_array_equal(a, b)
        model, variables, config = restore.load(workdir)
        expected = model.apply(jax.device_get(saved.variables), images)
        np.testing.assert_array_equal(model.apply(variables, images), expected)
        assert config.model.name == "resnet8"


def test_another_architecture_fails_with_one_line(tmp_path):
    write_initial_checkpoint(synthetic_config(**{"model.shortcut": "B"}), tmp_path, one_device())
    with pytest.raises(ValueError) as info:
        trainer.Run(synthetic_config(**{"model.name": "resnet20"}), str(tmp_path), mesh=one_device()).train()
    assert str(info.value).startswith("checkpoint holds resnet8 (78,042 parameters); the config asks for "
                                      "resnet20 (269,722 parameters) (")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"checkpoint holds resnet8 with shortcut='B' \(78,042 parameters\); "
                                         r"the config asks for resnet8 with shortcut='A' \(75,290 parameters\)"):
        trainer.Run(synthetic_config(), str(tmp_path), mesh=one_device()).initial_state()


def test_architecture_message_names_both_networks(tmp_path):
    write_initial_checkpoint(synthetic_config(**{"model.name": "resnet20"}), tmp_path, one_device())
    with pytest.raises(ValueError, match=r"^checkpoint holds resnet20 \(269,722 parameters\); the config asks "
                                         r"for resnet8 \(75,290 parameters\)"):
        trainer.Run(synthetic_config(), str(tmp_path), mesh=one_device()).initial_state()


def test_damaged_newest_checkpoint_falls_back_with_a_warning(tmp_path, capsys):
    c = synthetic_config(num_train_steps=4)
    pristine = tmp_path / "pristine"
    trainer.train_and_evaluate(c, str(pristine), mesh=one_device())
    at_2, _, _ = restore.load_state(pristine, 2)

    def truncate(newest):
        for p in (newest / "state").rglob("*"):
            if p.is_file() and p.stat().st_size > 1000:
                p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])

    damages = {"truncated arrays": truncate,
               "deleted arrays": lambda newest: shutil.rmtree(newest / "state" / "d"),
               "garbled meta": lambda newest: (newest / "meta" / "metadata").write_text('{"model": "resn')}
    for name, damage in damages.items():
        workdir = tmp_path / name.replace(" ", "_")
        shutil.copytree(pristine, workdir)
        damage(workdir / "checkpoints" / "4")
        capsys.readouterr()
        run = trainer.Run(c, str(workdir), mesh=one_device())
        state = run.initial_state()
        err = capsys.readouterr().err
        assert "warning: unreadable checkpoint(s) step 4" in err and "restored step 2 instead" in err, name
        for a, b in zip(leaves(at_2), leaves(state), strict=True):
            np.testing.assert_array_equal(a, b)
        # The damaged one is moved aside, so that the resumed run can write step 4 again.
        assert (workdir / "checkpoints_corrupt" / "4").is_dir() and not (workdir / "checkpoints" / "4").exists()
    assert run.train()["step"] == 4 and checkpoint.manager(workdir, read_only=True).latest_step() == 4


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = trainer.train_batches

    def poisoned(config, model, mesh, start_step):
        for step, batch in enumerate(real(config, model, mesh, start_step), start=start_step + 1):
            yield {**batch, "image": batch["image"] * np.nan} if step == 6 else batch

    monkeypatch.setattr(trainer, "train_batches", poisoned)
    c = synthetic_config(num_train_steps=10, checkpoint_every_steps=1, log_every_steps=4)
    with pytest.raises(FloatingPointError, match=r"^non-finite loss or gradient at step 6 \(loss \S+, gradient "
                                                 r"norm nan\); stopping without saving, the last good checkpoint "
                                                 r"\(step 5\) is kept$"):
        trainer.train_and_evaluate(c, str(tmp_path), mesh=one_device())
    mngr = checkpoint.manager(tmp_path, read_only=True)
    assert mngr.latest_step() == 5
    state, _, _ = restore.load_state(tmp_path)
    assert all(np.isfinite(x).all() for x in leaves(state))


def test_a_nan_learning_rate_is_refused_before_compiling(tmp_path):
    c = synthetic_config(num_train_steps=4, **{"optimizer.learning_rate": float("nan")})
    with pytest.raises(ValueError, match=r"^config.optimizer.learning_rate is nan; allowed: a finite positive number$"):
        trainer.train_and_evaluate(c, str(tmp_path), mesh=one_device())
    assert not (tmp_path / "checkpoints").exists()


def test_a_first_step_to_infinity_saves_nothing(tmp_path):
    c = synthetic_config(num_train_steps=4, checkpoint_every_steps=1, log_every_steps=100,
                         **{"optimizer.learning_rate": 1e39})  # inf in float32
    with pytest.raises(FloatingPointError, match="after step 1; stopping without saving, no checkpoint"):
        trainer.train_and_evaluate(c, str(tmp_path), mesh=one_device())
    assert checkpoint.manager(tmp_path, read_only=True).latest_step() is None


def test_a_run_resumes_across_the_xla_cpu_layer_switch(tmp_path):
    """Checkpoints record the network, not how a CPU computes its gradients: a run saved with the layer on
    resumes with it off and the reverse, and ends where an uninterrupted run ends (within float32 rounding)."""
    def run(layer):  # a new launch: a new Run, which reads the workdir afresh
        return trainer.Run(synthetic_config(xla_cpu_layer=layer), str(tmp_path / "switched"), mesh=one_device())

    without_config = lambda meta: {k: v for k, v in meta.items() if k != "config"}  # noqa: E731
    assert without_config(run(True).meta()) == without_config(run(False).meta())
    assert run(True).train(stop_after=2)["step"] == 2
    assert run(False).train(stop_after=2)["step"] == 4
    switched = run(True).train()
    assert switched["step"] == 6
    whole = trainer.train_and_evaluate(synthetic_config(xla_cpu_layer=False), str(tmp_path / "whole"),
                                       mesh=one_device())
    # Six SGD steps at lr 0.1 grow the two formulations' float32 rounding to about 1e-5.
    for a, b in zip(leaves(whole["state"]), leaves(switched["state"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


FORMAT_1 = ROOT / "tests" / "data" / "format1_resnet8"  # written by the version before the XLA:CPU layer


def test_a_checkpoint_and_a_file_of_the_previous_format_restore_and_resume(tmp_path):
    """The previous version recorded `conv_impl` in the model's options and config and kept an unused key in the
    train state: its checkpoint (ResNet-8, 4 steps on synthetic data) and its export of that checkpoint load,
    evaluate and resume."""
    workdir = tmp_path / "run"
    shutil.copytree(FORMAT_1, workdir)
    assert "conv_impl" in checkpoint.read_meta(workdir, 4)["model_options"]
    model, variables, config = restore.load(workdir)
    assert "conv_impl" not in config.model and config.xla_cpu_layer is True
    exported = restore.load(ROOT / "tests" / "data" / "format1_resnet8.npz")
    assert exported.model == model
    for a, b in zip(leaves(variables), leaves(exported.variables), strict=True):
        np.testing.assert_array_equal(a, b)
    assert restore.evaluate(workdir, split="test")["num_examples"] == 32
    with config.unlocked():
        config.num_train_steps = 6
    assert trainer.Run(config, str(workdir), mesh=one_device()).train()["step"] == 6
    # A config file of that time, with model.conv_impl, still runs.
    old = synthetic_config()
    with old.unlocked():
        old.model.conv_impl = "xla"
        del old["xla_cpu_layer"]
    run = trainer.Run(old, str(tmp_path / "old_config"), mesh=one_device())
    assert run.config.xla_cpu_layer is False and "conv_impl" not in run.config.model
