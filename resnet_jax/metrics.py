"""Where a run's numbers go: `metrics.jsonl` (one JSON object per event) and TensorBoard event files.

Only process 0 writes; the others get a writer that drops everything.
"""

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np


class MetricWriter:
    """Appends `{"step", "split", ...}` lines to workdir/metrics.jsonl and scalars to workdir/tensorboard."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            from tensorboardX import SummaryWriter  # imported here: only the writing process needs it

            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

    def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, (int, float)):
                self._tb.add_scalar(f"{split}/{key}", value, int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _plain(value: Any) -> Any:
    value = np.asarray(value)
    if value.ndim:
        return value.tolist()
    value = value.item()
    # JSON has no NaN: a figure that could not be measured is null.
    return None if isinstance(value, float) and not np.isfinite(value) else value


def read(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """Every event of a run, in order; a torn last line (a killed writer) is skipped."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    events = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def mean_of(step_metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Averages a list of per-step metric dicts (fetched from the device in one transfer)."""
    fetched = jax.device_get(list(step_metrics))
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
