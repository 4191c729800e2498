"""Test-wide setup: eight virtual CPU devices (for sharding tests) and the real CIFAR-10 beside the checkout.

Both must be in the environment before JAX or TFDS is imported, hence module level.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "tensorflow_datasets"
if _SHARED.is_dir():
    os.environ.setdefault("TFDS_DATA_DIR", str(_SHARED))
