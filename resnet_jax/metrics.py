"""Where a run's numbers go: `metrics.jsonl` (one JSON object per event) and TensorBoard event files.

Only process 0 writes; the others get a writer that drops everything. A run that resumes at step k continues
the log from k: records of later steps (written before a crash, by steps that will run again) and a line torn
by a kill are dropped, so every step appears once.
"""

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np


class MetricWriter:
    """Appends `{"step", "split", ...}` lines to workdir/metrics.jsonl and scalars to workdir/tensorboard."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool | None = None, start_step: int | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if start_step is not None and self.path.exists():
                keep = [e for e in read(workdir) if e["step"] <= start_step]
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(json.dumps(e) + "\n" for e in keep))
                os.replace(tmp, self.path)
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
    """Every event of a run, ordered by step (in writing order within a step); a line torn by a killed writer,
    or one that is not an event, is skipped."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    events = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and isinstance(event.get("step"), int) and "split" in event:
                events.append(event)
    return sorted(events, key=lambda e: e["step"])


def mean_of(step_metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Averages a list of per-step metric dicts (fetched from the device in one transfer)."""
    fetched = jax.device_get(list(step_metrics))
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
