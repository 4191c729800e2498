"""XLA:CPU compiler options for a network's steps: Eigen's convolutions instead of YNNPACK's.

XLA:CPU (jax 0.10) sends the forward and input-gradient convolutions to YNNPACK by default, which splits a
convolution's work over 64-channel tiles of its output, so every convolution with at most 64 output channels
runs on one thread. Eigen's kernels use every core. Only the fusion list changes, so the program computes the
same function (tests/test_xla_cpu.py). Measurements: docs/performance.md.
"""

import functools
import os

import jax
import jax.numpy as jnp

YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
# XLA's default YNN fusion list less INDIVIDUAL_CONVOLUTION. Keeping REDUCE matters: XLA's own reductions sum
# BN's statistics in another order, and the parameters would drift from the defaults' within a few steps.
CPU_OPTIONS = {YNN_FUSIONS: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def accepted(options: tuple[tuple[str, str], ...]) -> bool:
    """Whether this jaxlib's CPU compiler knows the options (their names change between XLA versions)."""
    x = jax.device_put(jnp.zeros((), jnp.float32), jax.devices("cpu")[0])
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(x).compile()
    except Exception:  # noqa: BLE001 - XLA reports unknown options as assorted runtime errors
        return False
    return True


def compiler_options() -> dict[str, str] | None:
    """`CPU_OPTIONS` where this jaxlib knows them and the user's XLA_FLAGS set no YNN fusion list of their own
    (theirs wins); else None, XLA's defaults."""
    if YNN_FUSIONS in os.environ.get("XLA_FLAGS", ""):
        return None
    return dict(CPU_OPTIONS) if accepted(tuple(CPU_OPTIONS.items())) else None
