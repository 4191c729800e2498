"""One process of a multi-process CPU run (tests/test_launch.py): trains a few steps of a tiny config on real
CIFAR-10 and writes its final parameters. Usage: distributed_worker.py PORT NUM_PROCESSES PROCESS_ID WORKDIR"""

import os
import sys

port, num_processes, process_id, workdir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={4 // num_processes}"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

if num_processes > 1:
    jax.distributed.initialize(f"localhost:{port}", num_processes, process_id)

from resnet_jax import config as config_lib  # noqa: E402
from resnet_jax import trainer  # noqa: E402

config = config_lib.load("experiments/configs/cifar10/quick.py", {
    "model.name": "resnet8", "batch_size": 16, "eval_batch_size": 1000, "num_train_steps": 3,
    "log_every_steps": 1, "eval_every_steps": 1000, "checkpoint_every_steps": 2, "eval_splits": ()})
assert len(jax.devices()) == 4, jax.devices()
result = trainer.train_and_evaluate(config, workdir)
if jax.process_index() == 0:
    np.save(os.path.join(workdir, "params.npy"), trainer.flat_params(result["state"]))
