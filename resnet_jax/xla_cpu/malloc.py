"""Keeping freed host memory in the process, so that XLA:CPU's steps stop faulting their buffers in anew.

XLA:CPU mallocs each step's buffers and frees them when the step ends. glibc serves a block over 32 MiB, or any
block a worker thread's own arena cannot hold, with a fresh mmap and unmaps it on free, so every step would fault
in and zero its whole working set again. One arena that grows with brk and never gives memory back lets each
step reuse the last step's pages, at the price of resident memory (freed blocks stay mapped). Measurements:
docs/performance.md.

`retain_freed_memory()` is what `launch.py`, `experiments/reproduce.py` and `resnet_jax.benchmark` call first
when the CPU layer is on. It only acts where it pays: glibc, a process that will compute on the CPU, and before
JAX starts its CPU backend (a thread keeps the arena it first allocated from). RESNET_JAX_HOST_MALLOC=default
keeps glibc's behaviour.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
from collections.abc import Mapping

OPT_OUT_ENV = "RESNET_JAX_HOST_MALLOC"
# mallopt(3) parameters: one arena for every thread, no mmap'd blocks, never trim the heap's top.
_SETTINGS = ((-8, 1), (-4, 0), (-1, -1))  # M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD


def _glibc() -> ctypes.CDLL | None:
    return ctypes.CDLL("libc.so.6") if platform.libc_ver()[0] == "glibc" else None


def accelerator_plugin_installed() -> bool:
    """Whether JAX would find a TPU or GPU backend here: libtpu, or a PJRT plugin (jax_cuda*_plugin, ...)."""
    if importlib.util.find_spec("libtpu") is not None:
        return True
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    try:
        import jax_plugins  # namespace package of the pip-installed PJRT plugins
    except ImportError:
        return False
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


def computes_on_cpu(environ: Mapping[str, str] | None = None) -> bool:
    """Whether JAX will pick its CPU backend: JAX_PLATFORMS says so, or no accelerator plugin is installed."""
    platforms = (os.environ if environ is None else environ).get("JAX_PLATFORMS", "")
    if platforms.strip():
        return platforms.split(",")[0].strip() == "cpu"
    return not accelerator_plugin_installed()


def retain_freed_memory(environ: Mapping[str, str] | None = None) -> bool:
    """Sets glibc's malloc to keep freed memory when this process will run XLA:CPU; whether it did.

    Call it before the first JAX computation (and before TensorFlow starts its threads).
    """
    environ = os.environ if environ is None else environ
    setting = environ.get(OPT_OUT_ENV, "retain")
    if setting not in ("retain", "default"):
        raise ValueError(f"{OPT_OUT_ENV}={setting!r}; allowed: retain, default")
    libc = _glibc()
    if setting == "default" or libc is None or not computes_on_cpu(environ):
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)


def release_freed_memory() -> bool:
    """Hands the heap's free pages back to the kernel (glibc's malloc_trim); whether any were.

    The benchmark calls it before the PyTorch peer runs: memory this process keeps but does not use would
    otherwise leave the peer less free memory to fault its own buffers into.
    """
    libc = _glibc()
    return libc is not None and bool(libc.malloc_trim(0))
