"""Test-wide setup: eight virtual CPU devices (for sharding tests), the real CIFAR-10 beside the checkout,
and a compilation cache for the session.

Both must be in the environment before JAX or TFDS is imported, hence module level.
"""

import os
import pathlib
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "tensorflow_datasets"
if _SHARED.is_dir():
    os.environ.setdefault("TFDS_DATA_DIR", str(_SHARED))

# Many tests (and the launch.py and worker subprocesses, which inherit the environment) compile the same small
# networks: a compilation cache shared by this test session compiles each of them once.
_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="resnet_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


def pytest_sessionfinish(session, exitstatus):
    if _CACHE:
        shutil.rmtree(_CACHE, ignore_errors=True)
