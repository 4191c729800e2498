"""Preemption: on SIGTERM (what TPU VMs, GCE and SLURM send before taking a machine) or Ctrl-C (SIGINT) finish
the current step, save a checkpoint and exit cleanly; the next launch with the same workdir resumes from it. A
second Ctrl-C aborts at once, as usual.

With several processes every one must save at the same step, or the checkpoint would mix steps. JAX's
coordination service already solves this: after `jax.distributed.initialize` it catches SIGTERM on any
process and agrees on a step (the largest step any process has reached, plus one) at which
`multihost_utils.reached_preemption_sync_point` turns True everywhere. On one process a signal handler
setting a flag is all that is needed, and checking it costs nothing. Where the service is off
(`jax_enable_preemption_service=False`), processes share their flags every `sync_every` steps instead.
"""

import signal
import threading
import types
from typing import Any

import jax


class PreemptionWatcher:
    """Use as a context manager around the training loop; ask `reached(step)` after every step.

    `reached` must be called with every step number, in order, by every process (the multi-process protocol
    requires it)."""

    def __init__(self, signum: int = signal.SIGTERM, sync_every: int = 10):
        self.signum, self.sync_every = signum, sync_every
        self.requested = self.interrupted = False
        self._previous: dict[int, Any] = {}
        self._service = jax.process_count() > 1 and _sync_service_available()

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        if signum == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            print("interrupted: finishing the step and saving (Ctrl-C again to abort)", flush=True)
        self.requested = True

    def __enter__(self) -> "PreemptionWatcher":
        # Python handlers can only be installed from the main thread; elsewhere (a notebook's worker thread)
        # the process keeps its default behaviour. With JAX's preemption service (several processes) the service
        # catches SIGTERM and agrees on the step; Ctrl-C keeps its default there, since one process cannot stop
        # alone.
        if not self._service and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (self.signum, signal.SIGINT)}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def reached(self, step: int) -> bool:
        """True at the step where this process (and every other) should save and stop."""
        from jax.experimental import multihost_utils

        if self._service:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        if jax.process_count() == 1:
            return self.requested
        if step % self.sync_every:
            return False
        return bool(multihost_utils.process_allgather(jax.numpy.asarray(self.requested)).any())


def _sync_service_available() -> bool:
    from jax._src import distributed  # the only place that says whether the service was started

    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None
