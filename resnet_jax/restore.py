"""Opening a run's results anywhere, e.g. in a notebook on a laptop:

    from resnet_jax import restore
    model, variables, config = restore.load("runs/resnet56")          # newest readable checkpoint
    logits = model.apply(variables, images)                           # images: [N, 32, 32, 3], normalised
    restore.evaluate("runs/resnet56", split="test")                   # {"top1_error": ..., ...}

`load` takes a workdir, its `checkpoints/` directory, one checkpoint (`.../checkpoints/6000`) or a weights file
(`resnet_jax.weights`: ours as .npz/.safetensors, or a torchvision state dict). Checkpoints hold a replicated
state, so one written by 8 devices or 2 processes restores on 1 device, and the reverse.
"""

import json
import pathlib
from typing import Any, NamedTuple

import jax
import ml_collections
from jax.sharding import Mesh

from resnet_jax import checkpoint, legacy, models, trainer, weights
from resnet_jax.config import make_optimizer, make_schedule
from resnet_jax.sharding import make_mesh
from resnet_jax.train_state import TrainState, init_train_state
from resnet_jax.train_step import compile_eval_step


class Loaded(NamedTuple):
    model: models.ResNet
    variables: dict[str, Any]  # {"params", "batch_stats"}: what model.apply takes
    config: ml_collections.ConfigDict  # the run's config (for a weights file without one: just `model`)


def config_from_meta(meta: dict[str, Any]) -> ml_collections.ConfigDict:
    """The run's config that a checkpoint's meta (or a weights file exported from one) records."""
    return legacy.upgrade_config(ml_collections.ConfigDict(json.loads(meta["config"])))


def _locate(path: str | pathlib.Path, step: int | None) -> tuple[pathlib.Path, int | None]:
    """(checkpoints directory, step or None for the newest) for any of the paths `load` accepts."""
    path = pathlib.Path(path).absolute()
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    directory = checkpoint.checkpoints_dir(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints at {path}")
    return directory, step


def load_state(path: str | pathlib.Path, step: int | None = None, *, best: bool = False,
               mesh: Mesh | None = None) -> tuple[TrainState, dict[str, Any], int]:
    """(train state, meta, step) of a checkpoint, replicated over `mesh` (default: this process' first
    device). `best=True` picks the checkpoint of lowest validation error instead of the newest."""
    directory, step = _locate(path, step)
    mngr = checkpoint.manager(directory, keep_best=best, read_only=True, async_save=False)
    if best:
        step = mngr.best_step()
        if step is None or checkpoint.BEST_METRIC not in (mngr.metrics(step) or {}):
            raise FileNotFoundError(f"no checkpoint in {directory} was saved with a validation error")
    steps = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {directory}")
    meta = _first_readable_meta(directory, steps)
    config = config_from_meta(meta)
    model = models.from_config(config.model)
    tx = make_optimizer(config, make_schedule(config))
    mesh = mesh or make_mesh(jax.local_devices()[:1])
    shapes = jax.eval_shape(lambda: init_train_state(model, tx, config.seed))
    found = checkpoint.read_newest(mngr, checkpoint.abstract_state(shapes, mesh), step=step)
    if found is None:
        raise FileNotFoundError(f"no checkpoints in {directory}")
    return found


def _first_readable_meta(directory: pathlib.Path, steps: list[int]) -> dict[str, Any]:
    # The network to build comes from the meta; a damaged newest checkpoint must not stop us reading an older.
    for s in steps:
        try:
            return checkpoint.read_meta(directory, s)
        except (OSError, ValueError):
            continue
    raise ValueError(f"no readable checkpoint meta in {directory} (steps {steps})")


def load(path: str | pathlib.Path, step: int | None = None, *, best: bool = False) -> Loaded:
    """(model, variables, config) from a workdir, a checkpoint or a weights file; see the module doc."""
    if pathlib.Path(path).suffix in (*weights.formats.SUFFIXES, *weights.convert.TORCH_SUFFIXES):
        model, variables, meta = weights.load(path)
        config = config_from_meta(meta) if meta.get("config") else ml_collections.ConfigDict(
            {"model": {"name": meta["model"], **meta.get("create_options", {})}})
        return Loaded(model, variables, config)
    state, meta, _ = load_state(path, step, best=best)
    config = config_from_meta(meta)
    return Loaded(models.from_config(config.model), jax.device_get(state.variables), config)


def evaluate(path: str | pathlib.Path, split: str = "test", *, step: int | None = None, best: bool = False,
             batch_size: int | None = None, data_dir: str | None = None, mesh: Mesh | None = None
             ) -> dict[str, float]:
    """Loss and top-1/top-5 error of a checkpoint on every example of `split` of the run's dataset."""
    mesh = mesh or make_mesh(jax.local_devices()[:1])
    state, meta, _ = load_state(path, step, best=best, mesh=mesh)
    config = config_from_meta(meta)
    if batch_size is not None:
        config.eval_batch_size = batch_size
    if data_dir is not None:
        config.data_dir = data_dir
    model = models.from_config(config.model)
    batches = trainer.eval_batches(config, model, mesh, split)
    return trainer.evaluate_split(state, compile_eval_step(mesh, *trainer.compiled_model(config, model, mesh)),
                                  batches)


def steps(path: str | pathlib.Path) -> list[int]:
    """The committed checkpoint steps of a workdir, oldest first."""
    directory, _ = _locate(path, None)
    return list(checkpoint.manager(directory, read_only=True, async_save=False).all_steps())
