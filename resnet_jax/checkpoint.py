"""Orbax checkpoints of the train state, with what is needed to trust and resume them saved beside it.

Each checkpoint `workdir/checkpoints/<step>/` holds two items: `state` (the whole `TrainState`, replicated, so
it restores on any number of devices or processes) and `meta` (JSON: the network's record, as weight files carry
it (`resnet_jax.weights.record`), the config, the parameter count, the shape of every state array, and the data
position, which is the step: training batch k depends only on (seed, k)).

Crash safety comes from Orbax: a checkpoint is written into `<step>.orbax-checkpoint-tmp-*` and renamed when
complete, so a kill at any moment leaves the previous checkpoint as the newest committed one; leftover
temporary directories are removed when the next manager opens the directory. A committed checkpoint that
still cannot be read (truncated files, a disk error) is skipped with a warning and moved to
`workdir/checkpoints_corrupt/`, and the previous one is used.
"""

import json
import math
import pathlib
import shutil
import warnings
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from resnet_jax import legacy
from resnet_jax.sharding import replicated
from resnet_jax.weights import formats, record

BEST_METRIC = "top1_error"  # of the validation split; the smaller the better
CORRUPT_DIR = "checkpoints_corrupt"


def _best_metric(metrics: Mapping[str, Any]) -> float:
    # Checkpoints saved between evaluations carry {}: never the best.
    return float(metrics.get(BEST_METRIC, math.inf))


def manager(workdir: str | pathlib.Path, *, max_to_keep: int | None = 3, keep_best: bool = False,
            async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
    """The CheckpointManager of a workdir's `checkpoints/` subdirectory (or of a `checkpoints` directory).

    Keeps the newest `max_to_keep` checkpoints and, with `keep_best`, also the one with the lowest validation
    top-1 error among those saved with metrics (see `save`)."""
    directory = checkpoints_dir(workdir)
    kwargs: dict[str, Any] = dict(enable_async_checkpointing=async_save, create=not read_only,
                                  read_only=read_only, cleanup_tmp_directories=not read_only)
    if keep_best:
        latest = ocp.checkpoint_managers.LatestN(n=max_to_keep)
        # reverse=True sorts descending, and BestN keeps the tail: the smallest error.
        best = ocp.checkpoint_managers.BestN(get_metric_fn=_best_metric, reverse=True, n=1,
                                             keep_checkpoints_without_metrics=False)
        kwargs.update(best_fn=_best_metric, best_mode="min",
                      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy([latest, best]))
    elif not read_only:
        kwargs.update(max_to_keep=max_to_keep)
    if read_only:
        kwargs.update(save_interval_steps=0)
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(**kwargs),
                                 item_names=("state", "meta"))


def checkpoints_dir(path: str | pathlib.Path) -> pathlib.Path:
    """`path/checkpoints` for a workdir; `path` itself when it already is a checkpoints directory."""
    path = pathlib.Path(path).absolute()
    if path.name == "checkpoints" or (not (path / "checkpoints").is_dir() and any(_step_dirs(path))):
        return path
    return path / "checkpoints"


def _step_dirs(directory: pathlib.Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


def state_shapes(state: Any) -> dict[str, list]:
    """`{"params/stage1_block1/conv1/kernel": [[3, 3, 16, 16], "float32"], ...}` for every array of a state."""
    return {name: [list(x.shape), str(x.dtype)] for name, x in formats.names(state).items()}


def make_meta(config: Any, model_record: Mapping[str, Any], num_params: int, shapes: Mapping[str, list],
              validation_split: str | None) -> dict[str, Any]:
    """What is saved beside every state, apart from the step (added by `save`): the network's record
    (`resnet_jax.weights.model_record`), the config and the state's layout."""
    return {**model_record, "config": config.to_json(), "num_params": int(num_params), "state_shapes": dict(shapes),
            "best_metric_split": validation_split, "format": record.FORMAT}


def digests(state: Any) -> dict[str, int]:
    """A CRC-32 of every array's bytes, by name: what `read` checks, so that bytes altered on disk after the
    save (a flipped bit) are found rather than trained on. Each process hashes its own replica."""
    def local(x: Any) -> np.ndarray:
        return np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)

    return {name: zlib.crc32(np.ascontiguousarray(local(x)).tobytes()) for name, x in formats.names(state).items()}


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any],
         metrics: dict[str, float] | None = None) -> None:
    """Starts saving `state` (asynchronously when the manager is async) with `meta`, the data position and the
    arrays' digests.

    `metrics` (e.g. {"top1_error": ...} of a validation split) rank checkpoints for keep_best; a manager that
    keeps the best needs a dict on every save, empty when nothing was evaluated at this step."""
    meta = {**meta, "step": int(step), "next_batch": int(step), "digests": digests(state)}
    if mngr._options.best_fn is not None:  # noqa: SLF001 (Orbax has no public accessor)
        metrics = dict(metrics or {})
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              metrics=metrics, force=True)


def abstract_state(state_shapes: Any, mesh: Mesh) -> Any:
    """Shapes, dtypes and (replicated) shardings to restore into: any device count, any process count."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                  state_shapes)


def read(mngr: ocp.CheckpointManager, step: int, target: Any, meta: Mapping[str, Any]) -> Any:
    """The state saved at `step`, laid out as `target` (from `abstract_state`); `meta` is the step's."""
    keyed = legacy.has_key(meta)
    item = legacy.keyed_target(target, jax.tree_util.tree_leaves(target)[0].sharding) if keyed else target
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(item)))["state"]
    if "digests" in meta:
        got = digests(restored)
        damaged = next((name for name, digest in meta["digests"].items() if got.get(name) != digest), None)
        if damaged is not None:
            raise ValueError(f"{damaged} does not match the digest recorded when it was saved (damaged on disk)")
    return legacy.unkeyed(restored, target) if keyed else restored


def save_failed(error: BaseException, step: int, mngr: ocp.CheckpointManager) -> str:
    """One line for a save that failed (a full disk, a read-only or vanished workdir): the cause and what is
    kept, since a save is written aside and renamed only when complete."""
    committed = _step_dirs(pathlib.Path(str(mngr.directory)))
    kept = f"the previous checkpoint (step {committed[-1]}) is kept" if committed else "no checkpoint was saved"
    return f"saving the checkpoint of step {step} in {mngr.directory} failed: {_short(error)}; {kept}"


def read_meta(directory: str | pathlib.Path, step: int) -> dict[str, Any]:
    """The `meta` item of checkpoint `step` in a workdir or checkpoints directory, read without Orbax."""
    path = checkpoints_dir(directory) / str(step) / "meta" / "metadata"
    return json.loads(path.read_text())


def check_compatible(meta: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    """Raises a one-line ValueError when a checkpoint's network or state layout is not the config's.

    Compared from the JSON meta before any array is read, so the message names the architectures rather than
    an array shape deep inside Orbax."""
    saved_options, wanted_options = record.recorded_options(meta), record.recorded_options(expected)
    changed = record.differing(saved_options, wanted_options)
    if meta["model"] != expected["model"] or meta["num_params"] != expected["num_params"] or changed:
        keys = changed if meta["model"] == expected["model"] else []
        saved = f"{record.named(meta['model'], saved_options, keys)} ({meta['num_params']:,} parameters)"
        wanted = f"{record.named(expected['model'], wanted_options, keys)} ({expected['num_params']:,} parameters)"
        raise ValueError(f"checkpoint holds {saved}; the config asks for {wanted} ({where})")
    saved_shapes, wanted_shapes = meta.get("state_shapes"), expected["state_shapes"]
    if saved_shapes is not None:
        saved_shapes = legacy.state_shapes(saved_shapes)
    if saved_shapes is not None and saved_shapes != wanted_shapes:
        path = next(p for p in sorted(set(saved_shapes) | set(wanted_shapes))
                    if saved_shapes.get(p) != wanted_shapes.get(p))
        raise ValueError(f"checkpoint's train state differs from the config's at {path}: saved "
                         f"{saved_shapes.get(path, 'nothing')}, expected {wanted_shapes.get(path, 'nothing')} "
                         f"(optimizer or model options changed?) ({where})")


def read_newest(mngr: ocp.CheckpointManager, target: Any, expected: Mapping[str, Any] | None = None, *,
                step: int | None = None, quarantine: bool = False,
                warn: Callable[[str], None] | None = None) -> tuple[Any, dict[str, Any], int] | None:
    """(state, meta, step) of the newest readable checkpoint (or of `step`), None when there is none.

    A checkpoint whose meta or arrays cannot be read is skipped with a warning naming it and the one used
    instead; with `quarantine` (training, process 0 moves it) it is moved to `checkpoints_corrupt/` so that
    the resumed run can save that step again. A readable checkpoint of another network raises ValueError
    (one line): falling back past it would silently train something else."""
    warn = warn or (lambda message: warnings.warn(message, stacklevel=3))
    directory = pathlib.Path(str(mngr.directory))
    steps = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
    skipped: list[str] = []
    for s in steps:
        where = str(directory / str(s))
        try:
            meta = read_meta(directory, s)
        except (OSError, ValueError) as e:
            skipped.append(f"step {s} ({_short(e)})")
            continue
        if expected is not None:
            check_compatible(meta, expected, where)
        try:
            state = read(mngr, s, target, meta)
        except Exception as e:  # noqa: BLE001 (Orbax and TensorStore raise many types for damaged files)
            skipped.append(f"step {s} ({_short(e)})")
            continue
        if skipped:
            warn(f"unreadable checkpoint(s) {', '.join(skipped)} in {directory}; restored step {s} instead")
            if quarantine:
                _quarantine(mngr, directory, [int(x.split()[1]) for x in skipped])
        return state, meta, s
    if skipped:
        raise ValueError(f"no readable checkpoint in {directory}: {'; '.join(skipped)}")
    return None


def _short(error: Exception) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:160] + ("..." if len(text) > 160 else "")


def _quarantine(mngr: ocp.CheckpointManager, directory: pathlib.Path, steps: list[int]) -> None:
    if jax.process_index() == 0:
        aside = directory.parent / CORRUPT_DIR
        aside.mkdir(exist_ok=True)
        for s in steps:
            target = aside / str(s)
            if target.exists():
                shutil.rmtree(target)
            (directory / str(s)).rename(target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("resnet_jax checkpoint quarantine")
    mngr.reload()
