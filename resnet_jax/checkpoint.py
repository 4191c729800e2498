"""Orbax checkpoints of the train state, with what is needed to trust and resume them saved beside it.

Each checkpoint `workdir/checkpoints/<step>/` holds two items: `state` (the whole `TrainState`, replicated, so
it restores on any number of devices or processes) and `meta` (JSON: the config, the model's name, options and
parameter count, the shape of every state array, and the data position, which is the step: training batch k
depends only on (seed, k)).

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
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from resnet_jax import legacy
from resnet_jax.sharding import replicated

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
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {path_name(path): [list(x.shape), str(x.dtype)] for path, x in leaves}


def path_name(path: tuple) -> str:
    """A pytree path as slash-separated names: ("params", "stage1_block1", "conv1", "kernel")."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def make_meta(config: Any, model_name: str, model_options: Mapping[str, Any], num_params: int,
              shapes: Mapping[str, list], validation_split: str | None) -> dict[str, Any]:
    """What is saved beside every state, apart from the step (added by `save`)."""
    return {"config": config.to_json(), "model": model_name, "model_options": _jsonable(model_options),
            "num_params": int(num_params), "state_shapes": dict(shapes), "best_metric_split": validation_split,
            "format": 1}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any],
         metrics: dict[str, float] | None = None) -> None:
    """Starts saving `state` (asynchronously when the manager is async) with `meta` and the data position.

    `metrics` (e.g. {"top1_error": ...} of a validation split) rank checkpoints for keep_best; a manager that
    keeps the best needs a dict on every save, empty when nothing was evaluated at this step."""
    meta = {**meta, "step": int(step), "next_batch": int(step)}
    if mngr._options.best_fn is not None:  # noqa: SLF001 (Orbax has no public accessor)
        metrics = dict(metrics or {})
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              metrics=metrics, force=True)


def abstract_state(state_shapes: Any, mesh: Mesh) -> Any:
    """Shapes, dtypes and (replicated) shardings to restore into: any device count, any process count."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                                  state_shapes)


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
    """The state and meta saved at `step`, laid out as `target` (from `abstract_state`)."""
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                          meta=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["meta"])


def read_meta(directory: str | pathlib.Path, step: int) -> dict[str, Any]:
    """The `meta` item of checkpoint `step` in a workdir or checkpoints directory, read without Orbax."""
    path = checkpoints_dir(directory) / str(step) / "meta" / "metadata"
    return json.loads(path.read_text())


def describe(meta: Mapping[str, Any]) -> str:
    return f"{meta['model']} ({meta['num_params']:,} parameters)"


def check_compatible(meta: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    """Raises a one-line ValueError when a checkpoint's network or state layout is not the config's.

    Compared from the JSON meta before any array is read, so the message names the architectures rather than
    an array shape deep inside Orbax."""
    saved_options, wanted_options = legacy.architecture(meta.get("model_options", {})), expected["model_options"]
    if (meta["model"], meta["num_params"]) != (expected["model"], expected["num_params"]) or \
            saved_options != wanted_options:
        saved, wanted = describe(meta), describe(expected)
        if meta["model"] == expected["model"]:
            changed = [k for k in sorted(set(saved_options) | set(wanted_options))
                       if saved_options.get(k) != wanted_options.get(k)]
            saved = f"{meta['model']} with " + ", ".join(f"{k}={saved_options.get(k)!r}" for k in changed) + \
                f" ({meta['num_params']:,} parameters)"
            wanted = f"{expected['model']} with " + ", ".join(f"{k}={wanted_options.get(k)!r}" for k in changed) + \
                f" ({expected['num_params']:,} parameters)"
        raise ValueError(f"checkpoint holds {saved}; the config asks for {wanted} ({where})")
    saved_shapes, wanted_shapes = meta.get("state_shapes"), expected["state_shapes"]
    if saved_shapes is not None and saved_shapes != wanted_shapes:
        path = next(p for p in sorted(set(saved_shapes) | set(wanted_shapes))
                    if saved_shapes.get(p) != wanted_shapes.get(p))
        raise ValueError(f"checkpoint's train state differs from the config's at {path}: saved "
                         f"{saved_shapes.get(path, 'nothing')}, expected {wanted_shapes.get(path, 'nothing')} "
                         f"(optimizer or model options changed?) ({where})")


def restore_newest(mngr: ocp.CheckpointManager, target: Any, expected: Mapping[str, Any] | None = None, *,
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
            state, _ = restore(mngr, s, target)
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
