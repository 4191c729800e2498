"""No step waits on the host: steady-state training steps make no implicit host-device transfer
(metrics stay on the device until the loop fetches them explicitly, every log_every_steps)."""

import os
import tempfile

import jax
import pytest

from resnet_jax import config as config_lib
from resnet_jax import trainer
from resnet_jax.metrics import mean_of


def steady_state_steps(dataset: str, on_device: bool = True, steps: int = 3) -> float:
    c = config_lib.load("experiments/configs/cifar10/quick.py")
    c.model.name, c.dataset, c.data.on_device = "resnet8", dataset, on_device
    c.batch_size = c.eval_batch_size = 16
    run = trainer.Run(c, tempfile.mkdtemp(), mesh=trainer.make_mesh(jax.devices()[:1]))
    state = run.initial_state()
    batches = trainer.train_batches(c, run.model, run.mesh, 0)
    state, metrics = run.train_step(state, next(batches))  # compile, and the pipeline's one-time upload
    jax.block_until_ready(metrics)
    with jax.transfer_guard("disallow"):
        pending = []
        for _ in range(steps):
            state, metrics = run.train_step(state, next(batches))
            pending.append(metrics)
        return mean_of(pending)["loss"]  # the explicit fetch of a log line


def test_synthetic_steps_make_no_implicit_transfer():
    assert steady_state_steps("synthetic") > 0


@pytest.mark.skipif(not os.environ.get("TFDS_DATA_DIR"), reason="real CIFAR-10 not found")
@pytest.mark.parametrize("on_device", [True, False], ids=["device-pipeline", "host-pipeline"])
def test_cifar_steps_make_no_implicit_transfer(on_device):
    assert steady_state_steps("cifar10", on_device) > 0
