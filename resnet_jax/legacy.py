"""What older versions of this package wrote into configs, checkpoints and exported files, read as today's fields.

Until the CPU speed work became a layer of the compiled step (`resnet_jax.xla_cpu`), the model carried it as
`conv_impl`: "auto" (the layer) or "xla" (XLA's own gradients). It never changed the parameters or the function,
so it is dropped from a network's options and becomes the run's `xla_cpu_layer` switch.
"""

import copy
from collections.abc import Mapping
from typing import Any

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
