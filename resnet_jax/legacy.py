"""What older versions of this package wrote into configs, checkpoints and exported files, read as today's fields.

Until the CPU speed work became a layer of the compiled step (`resnet_jax.xla_cpu`), the model carried it as
`conv_impl`: "auto" (the layer) or "xla" (XLA's own gradients). It never changed the parameters or the function,
so it is dropped from a network's options and becomes the run's `xla_cpu_layer` switch.
"""

import copy
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

CONV_IMPL = "conv_impl"


def architecture(options: Mapping[str, Any]) -> dict[str, Any]:
    """A network's recorded options without those that never defined its function."""
    return {k: v for k, v in options.items() if k != CONV_IMPL}


def upgrade_config(config: Any) -> Any:
    """`config` (an ml_collections.ConfigDict), or an upgraded copy where it has `model.conv_impl`."""
    if CONV_IMPL not in config.get("model", {}):
        return config
    config = copy.deepcopy(config)
    with config.unlocked():
        impl = config.model[CONV_IMPL]
        del config.model[CONV_IMPL]
        if "xla_cpu_layer" not in config:
            config.xla_cpu_layer = impl != "xla"
    return config


# Until format 2, TrainState carried `rng`, the run's root key, which nothing drew from.
LEGACY_STATE_KEY = "rng"


def state_shapes(shapes: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's recorded state shapes without the fields TrainState no longer has."""
    return {k: v for k, v in shapes.items() if k != LEGACY_STATE_KEY}


def has_key(meta: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's state holds the old `rng` field (its meta records the state's arrays by name)."""
    return LEGACY_STATE_KEY in meta.get("state_shapes", {})


@flax.struct.dataclass
class KeyedTrainState:
    """The TrainState of format-1 checkpoints, to restore them into."""

    step: Any
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: Any


def keyed_target(target: Any, sharding: Any) -> KeyedTrainState:
    """A restore target for a format-1 checkpoint from today's abstract TrainState."""
    return KeyedTrainState(step=target.step, params=target.params, batch_stats=target.batch_stats,
                           opt_state=target.opt_state,
                           rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding))


def unkeyed(state: KeyedTrainState, target: Any) -> Any:
    """Today's TrainState (of `target`'s type) from a restored format-1 state."""
    return type(target)(step=state.step, params=state.params, batch_stats=state.batch_stats,
                        opt_state=state.opt_state)
