"""Joining the other processes of a multi-host run (a TPU pod slice, a SLURM job) before any JAX work."""

import os


def spans_processes() -> bool:
    """Whether this process is one of several that JAX can discover by itself."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize(mode: str = "auto", coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Calls jax.distributed.initialize(): with an explicit coordinator, when `mode` is "on", or ("auto")
    when the environment says this is one of several processes. "off" (or a single process) does nothing."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"unknown distributed mode {mode!r}; allowed: auto, on, off")
    import jax

    if coordinator_address:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif mode == "on" or (mode == "auto" and spans_processes()):
        jax.distributed.initialize()
