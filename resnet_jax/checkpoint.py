"""Orbax checkpoints of the train state, with the run's config beside it.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a crash mid-save
leaves the previous checkpoint as the newest readable one.
"""

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from resnet_jax.sharding import replicated


def manager(workdir: str | pathlib.Path, *, max_to_keep: int | None = 3,
            async_save: bool = True) -> ocp.CheckpointManager:
    """The CheckpointManager of a workdir (its `checkpoints/` subdirectory)."""
    directory = pathlib.Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts saving `state` (asynchronously when the manager is async) with JSON-able `meta` beside it."""
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)


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


def read_meta(workdir: str | pathlib.Path, step: int) -> dict[str, Any]:
    path = pathlib.Path(workdir) / "checkpoints" / str(step) / "meta" / "metadata"
    return json.loads(path.read_text())
