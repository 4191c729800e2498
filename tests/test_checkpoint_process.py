"""Checkpoints against the operating system: launch.py killed with SIGKILL at random moments (some during a
save) always leaves a restorable checkpoint and the resumed run finishes; SIGTERM saves and exits 0."""

import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

import pytest

from resnet_jax import checkpoint, restore

ROOT = pathlib.Path(__file__).resolve().parents[1]
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def args(workdir, steps, checkpoint_every, *extra):
    # resnet20 rather than resnet8: a bigger state makes each save last long enough to be killed inside.
    return [sys.executable, "launch.py", "--config", "experiments/configs/cifar10/quick.py", "--workdir",
            str(workdir), "--config.dataset=synthetic", "--config.model.name=resnet20", "--config.batch_size=8",
            "--config.eval_batch_size=8", f"--config.num_train_steps={steps}", "--config.log_every_steps=1",
            "--config.eval_every_steps=100000", f"--config.checkpoint_every_steps={checkpoint_every}",
            "--config.eval_splits=()", *extra]


def start(command, log):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, process, timeout=300.0, poll=0.002):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, "the run ended before the moment to kill it"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


def tmp_dirs(workdir):
    directory = workdir / "checkpoints"
    return [p for p in directory.iterdir() if TMP_SUFFIX in p.name] if directory.is_dir() else []


def logged(log, line_start):
    return lambda: re.search(rf"^{re.escape(line_start)}", log.read_text(), re.M) is not None


@pytest.mark.parametrize("moments", [
    ("during a save", "random", "during a save"),
    pytest.param(("during a save", "random") * 4, marks=pytest.mark.slow),
])
def test_sigkill_at_random_moments_always_leaves_a_restorable_checkpoint(tmp_path, moments):
    rng = random.Random(len(moments))
    workdir, steps, newest, killed_mid_save = tmp_path / "run", 12 * len(moments), 0, 0
    for trial, moment in enumerate(moments):
        log = tmp_path / f"trial{trial}.log"
        process = start(args(workdir, steps, 1), log)
        # A few steps (and saves) into this launch, so that every trial moves the newest checkpoint on.
        wait_for(logged(log, f"step {newest + 3}/"), process, poll=0.01)
        if moment == "during a save":
            # A save in flight with an older one committed: the kill must leave the older one readable.
            wait_for(lambda: tmp_dirs(workdir) and any(p.name.isdigit() for p in (workdir / "checkpoints").iterdir()),
                     process)
        else:
            time.sleep(rng.uniform(0.0, 0.5))
        process.send_signal(signal.SIGKILL)
        process.wait()
        killed_mid_save += bool(tmp_dirs(workdir))
        if trial:
            assert re.search(rf"resumed from .* at step {newest}\b", log.read_text()), log.read_text()[-2000:]
        # The newest committed checkpoint is readable, and nothing was lost beyond it.
        steps_now = restore.steps(workdir)
        assert steps_now and steps_now[-1] >= newest
        newest = steps_now[-1]
        state, meta, step = restore.load_state(workdir, newest)
        assert step == newest == int(state.step) == meta["next_batch"]
    assert killed_mid_save >= 2, "no kill landed inside a save"
    assert newest >= 3, "the trials made progress"
    log = tmp_path / "final.log"
    final = start(args(workdir, steps, 1), log)
    assert final.wait(timeout=600) == 0, log.read_text()[-2000:]
    text = log.read_text()
    assert re.search(rf"resumed from .* at step {newest}\b", text) and f"step {steps}/{steps}" in text
    assert not tmp_dirs(workdir), "leftover temporary directories are cleaned up"
    assert checkpoint.manager(workdir, read_only=True).latest_step() == steps


def test_sigterm_finishes_the_step_saves_and_exits_0_and_the_next_launch_resumes(tmp_path):
    workdir, log = tmp_path / "run", tmp_path / "first.log"
    process = start(args(workdir, 100_000, 50_000), log)
    wait_for(logged(log, "step 3/"), process, poll=0.01)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 0, log.read_text()[-2000:]
    saved = int(re.search(r"preempted: saved step (\d+)", log.read_text()).group(1))
    assert saved >= 3 and restore.steps(workdir) == [saved]
    second = subprocess.run(args(workdir, 100_000, 50_000, "--max_steps=2"), cwd=ROOT, capture_output=True,
                            text=True, timeout=600,
                            env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert second.returncode == 0, second.stderr[-2000:]
    assert re.search(rf"resumed from .* at step {saved}\b", second.stdout)
    assert f"step {saved + 1}/" in second.stdout and f"step {saved + 2}/" in second.stdout
    assert restore.steps(workdir) == [saved, saved + 2]
