"""Faults and bad input: nothing saved is lost or altered, nothing reports success when it did nothing, and every
mistake is answered in one line that names it (before anything compiles, where it is a config's)."""

import json
import os
import pathlib
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from resnet_jax import checkpoint, metrics, models, restore, trainer, weights, workdir_lock
from resnet_jax import config as config_lib
from resnet_jax.weights import formats
from tests.test_checkpoint import leaves, one_device, synthetic_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
SYNTHETIC = ["--config", "experiments/configs/cifar10/quick.py", "--config.dataset=synthetic",
             "--config.model.name=resnet8", "--config.batch_size=8", "--config.eval_batch_size=8",
             "--config.log_every_steps=1", "--config.eval_every_steps=100", "--config.checkpoint_every_steps=2"]


def launch(*args, env=None, preexec_fn=None, timeout=600):
    environ = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **(env or {})}
    return subprocess.run([sys.executable, "launch.py", *args], cwd=ROOT, env=environ, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec_fn)


def last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def one_line_error(result, message: str) -> None:
    assert result.returncode != 0, result.stdout[-1000:]
    assert last_line(result).startswith("error: ") and message in last_line(result), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]


# --- a config's mistakes, before anything compiles ------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    ({"keep_checkpoints": 0}, "config.keep_checkpoints is 0; allowed: an integer of at least 1"),
    ({"log_every_steps": 0}, "config.log_every_steps is 0; allowed: a positive integer"),
    ({"eval_every_steps": -5}, "config.eval_every_steps is -5"),
    ({"checkpoint_every_steps": 0}, "config.checkpoint_every_steps is 0"),
    ({"optimizer.momentum": 1.0}, "config.optimizer.momentum is 1.0; allowed: a number in [0, 1)"),
    ({"optimizer.learning_rate": 0.0}, "config.optimizer.learning_rate is 0.0"),
    ({"schedule.boundaries": (0.75, 0.5)}, "config.schedule.boundaries is (0.75, 0.5)"),
    ({"max_param_norm": -1.0}, "config.max_param_norm is -1.0"),
    ({"model.num_classes": 5, "dataset": "cifar10"}, "config.model.num_classes is 5, but cifar10's labels run to 9"),
])
def test_bad_values_are_one_line(overrides, message):
    config = synthetic_config(**overrides)
    with pytest.raises(ValueError) as info:
        config_lib.validate(config, one_device(), check_data=False)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_fields_name_the_closest_one():
    config = synthetic_config()
    with config.unlocked():
        config.optimzer = config.optimizer
    with pytest.raises(ValueError, match=r"^unknown config field 'optimzer'; did you mean optimizer\?$"):
        config_lib.check_fields(config)
    config = synthetic_config()
    with config.schedule.unlocked():
        config.schedule.boundary = (0.5,)
    with pytest.raises(ValueError, match=r"unknown config field 'schedule.boundary'; did you mean schedule.boundaries"):
        config_lib.check_fields(config)


def test_negative_padding_is_refused_before_the_data_is_read(tmp_path):
    config = synthetic_config(dataset="cifar10", data_dir=str(tmp_path / "nothing"), **{"data.pad": -1})
    with pytest.raises(ValueError, match=r"^data.pad is -1; allowed: 0 or a positive number of pixels$"):
        config_lib.validate(config, one_device())


@pytest.mark.parametrize("args, message", [
    (["--config.optimzer.momentum=0.5"], "unknown config field 'optimzer' in --config.*; did you mean 'optimizer'?"),
    (["--config.optimizer.momemtum=0.5"], "unknown config field 'momemtum' in --config.*; did you mean 'momentum'?"),
    (["--config.batch_size=abc"], "flag --config.batch_size=abc"),
    (["--max_steps=0"], "--max_steps is 0; allowed: a positive number of steps"),
    (["--config.keep_checkpoints=0"], "config.keep_checkpoints is 0"),
])
def test_launch_answers_bad_overrides_in_one_line(tmp_path, args, message):
    result = launch(*SYNTHETIC, "--workdir", str(tmp_path / "run"), *args)
    one_line_error(result, message)
    assert not (tmp_path / "run").exists()


def test_launch_answers_a_bad_config_file_in_one_line(tmp_path):
    one_line_error(launch("--config", str(tmp_path / "missing.py"), "--workdir", str(tmp_path)),
                   f"no config file at {tmp_path / 'missing.py'}")
    broken = tmp_path / "broken.py"
    broken.write_text("import ml_collections\n\ndef get_config(:\n    pass\n")
    one_line_error(launch("--config", str(broken), "--workdir", str(tmp_path)),
                   f"config file {broken}, line 3: invalid syntax")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    one_line_error(launch("--config", str(empty), "--workdir", str(tmp_path)),
                   f"config file {empty} has no get_config()")


# --- nothing lost, nothing silent --------------------------------------------------------------------------------

def trained(workdir, steps=4, **overrides):
    """A run of `steps` steps with a checkpoint every 2, in this process."""
    return trainer.Run(synthetic_config(num_train_steps=steps, **overrides), str(workdir), mesh=one_device()).train()


def test_a_flipped_bit_in_a_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    trained(tmp_path)
    path = checkpoint.checkpoints_dir(tmp_path)
    data = max((p for p in (path / "4" / "state").rglob("*") if p.is_file() and "d" == p.parent.name),
               key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))
    run = trainer.Run(synthetic_config(num_train_steps=4), str(tmp_path), mesh=one_device())
    state = run.initial_state()
    assert int(state.step) == 2
    err = capsys.readouterr().err
    assert "warning: unreadable checkpoint(s) step 4" in err and "restored step 2 instead" in err
    assert (tmp_path / checkpoint.CORRUPT_DIR / "4").is_dir()


def test_digests_catch_altered_arrays_that_still_decode(tmp_path):
    trained(tmp_path)
    run = trainer.Run(synthetic_config(num_train_steps=4), str(tmp_path), mesh=one_device())
    meta = checkpoint.read_meta(tmp_path, 4)
    name = "params/head/bias"
    meta["digests"][name] ^= 1  # as if the bytes of that array had changed since the save
    target = checkpoint.abstract_state(run.state_shapes, run.mesh)
    with pytest.raises(ValueError, match=f"{name} does not match the digest recorded when it was saved"):
        checkpoint.read(run.checkpoints, 4, target, meta)
    assert int(checkpoint.read(run.checkpoints, 4, target, checkpoint.read_meta(tmp_path, 4)).step) == 4


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(tmp_path):
    trained(tmp_path, steps=2)
    saved = leaves(restore.load_state(tmp_path)[0])
    with pytest.raises(FloatingPointError, match=r"diverged: parameter norm .* after step 4 is above max_param_norm "
                                                 r"1; stopping without saving, the last good checkpoint \(step 2\)"):
        trained(tmp_path, steps=6, max_param_norm=1.0)
    with pytest.raises(FloatingPointError, match=r"diverged: loss .* at step 3 is above max_loss 0.001; stopping "
                                                 r"without saving, the last good checkpoint \(step 2\) is kept"):
        trained(tmp_path, steps=6, max_loss=1e-3)
    assert restore.steps(tmp_path) == [2]
    for a, b in zip(saved, leaves(restore.load_state(tmp_path)[0]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_eval_without_a_checkpoint_fails_in_one_line(tmp_path):
    result = launch(*SYNTHETIC, "--workdir", str(tmp_path / "typo"), "--mode=eval")
    one_line_error(result, f"no checkpoint in {tmp_path / 'typo'} to evaluate")
    assert "top-1 error" not in result.stdout


def test_a_finished_run_says_it_has_nothing_to_train(tmp_path, capsys):
    trained(tmp_path, steps=2)
    capsys.readouterr()
    assert trained(tmp_path, steps=2)["step"] == 2
    assert "nothing to train" in capsys.readouterr().out


def test_resuming_past_the_end_is_refused_and_changes_are_named(tmp_path, capsys):
    trained(tmp_path, steps=4)
    with pytest.raises(ValueError, match=r"the checkpoint is at step 4, beyond num_train_steps 2"):
        trained(tmp_path, steps=2)
    trained(tmp_path, steps=6, batch_size=16)
    assert "batch_size changed since the checkpoint at step 4 (8 -> 16): the data order" in capsys.readouterr().err


def test_an_evaluation_that_fails_keeps_the_checkpoint_of_its_step(tmp_path, monkeypatch):
    def broken(self, state, writer=None):
        raise ValueError("cannot read CIFAR-10 'test' (damaged)")

    monkeypatch.setattr(trainer.Run, "evaluate", broken)
    with pytest.raises(ValueError, match="damaged"):
        trained(tmp_path, steps=6, eval_every_steps=3, checkpoint_every_steps=100)
    assert restore.steps(tmp_path) == [3]


def test_the_log_continues_from_the_restored_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "split": "train", "loss": 1.0} for s in range(1, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 7, "spl')  # a torn last line
    writer = metrics.MetricWriter(tmp_path, enabled=True, start_step=4)
    writer.write(5, "train", {"loss": 2.0})
    writer.close()
    events = metrics.read(tmp_path)
    assert [(e["step"], e["loss"]) for e in events] == [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 2.0)]
    path.write_text(path.read_text() + json.dumps({"step": 2, "split": "test", "loss": 0.5}) + "\n")
    assert [e["step"] for e in metrics.read(tmp_path)] == [1, 2, 2, 3, 4, 5]  # by step, whatever the line order


def test_the_log_of_a_resumed_run_has_every_step_once(tmp_path):
    trained(tmp_path, steps=4)
    with (tmp_path / "metrics.jsonl").open("a") as f:  # what a kill after step 5's log line leaves
        f.write(json.dumps({"step": 5, "split": "train", "loss": 9.0}) + '\n{"step": 6, "split": "tr')
    trained(tmp_path, steps=6)
    steps = [e["step"] for e in metrics.read(tmp_path) if e["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert all(e["loss"] != 9.0 for e in metrics.read(tmp_path))


# --- one run per workdir -------------------------------------------------------------------------------------------

def write_lock(workdir: pathlib.Path, host: str, pid: int, age: float = 0.0) -> pathlib.Path:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / workdir_lock.LOCK_NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "started": time.time() - age}))
    os.utime(path, (time.time() - age, time.time() - age))
    return path


def test_a_workdir_in_use_is_refused_naming_its_holder(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, socket.gethostname(), sleeper.pid)
        with pytest.raises(RuntimeError, match=rf"workdir .* is in use by process {sleeper.pid} on "
                                               rf"{socket.gethostname()} since .*; wait for that run to end"):
            trainer.Run(synthetic_config(), str(tmp_path), mesh=one_device())
        write_lock(tmp_path, "another-host", 1234, age=5.0)  # alive elsewhere: its heartbeat is fresh
        result = launch(*SYNTHETIC, "--workdir", str(tmp_path), "--config.num_train_steps=2")
        one_line_error(result, "is in use by process 1234 on another-host")
        assert not (tmp_path / "checkpoints").exists()
    finally:
        sleeper.kill()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path / "here", socket.gethostname(), dead.pid)
    write_lock(tmp_path / "there", "another-host", 1234, age=workdir_lock.STALE_S + 10)
    for workdir in (tmp_path / "here", tmp_path / "there"):
        run = trainer.Run(synthetic_config(), str(workdir), mesh=one_device())
        assert json.loads((workdir / workdir_lock.LOCK_NAME).read_text())["pid"] == os.getpid()
        run.close()
        assert not (workdir / workdir_lock.LOCK_NAME).exists()
    err = capsys.readouterr().err
    assert err.count("warning: taking over the lock of") == 2 and "which is gone" in err


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    one_line_error(launch(*SYNTHETIC, "--workdir", str(tmp_path / "file")), "is a file, not a directory")


# --- signals and disks ---------------------------------------------------------------------------------------------

def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    log = tmp_path / "log"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    process = subprocess.Popen([sys.executable, "launch.py", *SYNTHETIC, "--workdir", str(tmp_path / "run"),
                                "--config.num_train_steps=100000", "--config.checkpoint_every_steps=50000"],
                               cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while "step 3/" not in log.read_text():
        assert process.poll() is None and time.time() < deadline, log.read_text()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=300) == 0, log.read_text()[-2000:]
    text = log.read_text()
    assert "interrupted: saved step" in text and "Traceback" not in text
    saved = restore.steps(tmp_path / "run")
    assert saved and saved[-1] >= 3 and not (tmp_path / "run" / workdir_lock.LOCK_NAME).exists()


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    first = launch(*SYNTHETIC, "--workdir", str(workdir), "--config.num_train_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]

    def small_files():  # every file this process writes stops at 64 KiB, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    result = launch(*SYNTHETIC, "--workdir", str(workdir), "--config.num_train_steps=4",
                    env={"JAX_ENABLE_COMPILATION_CACHE": "false"}, preexec_fn=small_files)
    one_line_error(result, "saving the checkpoint of step 4")
    assert "the previous checkpoint (step 2) is kept" in last_line(result)
    assert restore.steps(workdir)[-1] == 2 and int(restore.load_state(workdir)[0].step) == 2


def test_a_damaged_dataset_file_is_named(tmp_path):
    source = pathlib.Path(os.environ.get("TFDS_DATA_DIR", "")) / "cifar10"
    if not source.is_dir():
        pytest.skip("the real CIFAR-10 is not here (TFDS_DATA_DIR)")
    shutil.copytree(source, tmp_path / "cifar10")
    test_file = next((tmp_path / "cifar10").rglob("cifar10-test.tfrecord*"))
    raw = bytearray(test_file.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)
    test_file.write_bytes(bytes(raw))
    from resnet_jax.data import cifar

    with pytest.raises(ValueError, match=rf"cannot read CIFAR-10 'test' from {test_file} .*the file is damaged"):
        cifar.load(str(tmp_path), "test", {**cifar.DEFAULT_OPTIONS, "download": False})


def test_the_download_path_reaches_the_network(tmp_path, monkeypatch):
    """With the pinned requirements, TFDS' download of CIFAR-10 gets as far as the network (none here), and the
    error names that cause rather than a missing module."""
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # the downloader's retries back off
    from resnet_jax.data import cifar

    with pytest.raises(ValueError) as info:
        cifar.builder(str(tmp_path), download=True)
    message = str(info.value)
    assert "downloading it failed" in message and "ModuleNotFoundError" not in message and "\n" not in message
    assert "www.cs.toronto.edu" in message or "Connection" in message, message


# --- weight files --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    model = models.create("resnet8")
    variables = jax.device_get(jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32)))
    path = tmp_path_factory.mktemp("w") / "resnet8.safetensors"
    weights.save(path, (variables, weights.model_record("resnet8", {})))
    return path


def rewritten(good_file, tmp_path, change):
    arrays, metadata = formats.read(good_file)
    change(arrays)
    return formats.write(tmp_path / "bad.npz", arrays, metadata)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("params/head/bias"), r"params/head/bias is missing; the network \(cifar basic blocks"),
    (lambda a: a.update({"params/extra/kernel": np.zeros(3)}), "params/extra/kernel is not a variable of the network"),
    (lambda a: a.update({"params/head/bias": np.zeros(7)}),
     r"params/head/bias has shape \[7\]; the network .* needs \[10\]"),
])
def test_weight_files_with_wrong_keys_are_refused_at_load(good_file, tmp_path, change, message):
    path = rewritten(good_file, tmp_path, change)
    with pytest.raises(ValueError, match=f"^{path}: {message}"):
        weights.load(path)


@pytest.mark.parametrize("suffix, content, message", [
    (".npz", b"", "is not a readable .npz file"),
    (".npz", b"PK\x03\x04 truncated", "is not a readable .npz file"),
    (".safetensors", b"", "is not a safetensors file: 0 bytes"),
    (".safetensors", (1 << 40).to_bytes(8, "little") + b"{}", "its header claims"),
    (".safetensors", (4).to_bytes(8, "little") + b"nope", "its header is not a JSON object"),
    (".pth", b"not a zip", "not a readable PyTorch file|torch is not installed"),
])
def test_malformed_weight_files_are_one_line(tmp_path, suffix, content, message):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as info:
        restore.load(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_truncated_safetensors_file_names_the_array(good_file, tmp_path):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(good_file.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"cut.safetensors: .* lies at bytes .* the file is truncated or damaged"):
        weights.load(path)


def test_a_torchvision_file_with_a_wrong_shape_names_file_and_key(tmp_path):
    from tests.test_checkpoint_weights import random_state_dict, torchvision_table

    sd = random_state_dict(torchvision_table(18, num_classes=5))
    sd["layer1.0.bn1.running_var"] = np.ones(3, np.float32)
    path = tmp_path / "resnet18.safetensors"
    formats.write_safetensors(path, sd)
    with pytest.raises(ValueError, match=rf"^{path}: batch_stats/stage1_block1/bn1/var has shape \[3\]"):
        weights.load(path)
    del sd["fc.bias"]
    formats.write_safetensors(path, sd)
    with pytest.raises(ValueError, match=rf"^{path}: no 'fc.bias', which torchvision's resnet18 has"):
        weights.load(path)
