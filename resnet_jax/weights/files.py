"""A network's variables in one portable file (`.npz` or `.safetensors`) with the record of the network they
belong to; loading builds that network, or checks the one given and refuses it with one line.

Arrays are named by their place: `params/stage1_block1/conv1/kernel` (HWIO), `batch_stats/stem_bn/mean`,
`params/head/kernel` ([features, classes]). A torchvision ResNet state dict (`.safetensors`, `.npz`, or
`.pt`/`.pth` with torch installed) loads too, converted on the way.
"""

import json
import pathlib
from collections.abc import Mapping
from typing import Any

from resnet_jax import models
from resnet_jax.weights import convert, formats
from resnet_jax.weights.record import FORMAT, Weights, build_model, check_model, check_variables


def save(path: str | pathlib.Path, weights: Weights | tuple[Mapping[str, Any], Mapping[str, Any]]
         ) -> pathlib.Path:
    """Writes (variables, meta) or a `Weights` to `path`; meta must hold the network's record."""
    variables, meta = (weights.variables, weights.meta) if isinstance(weights, Weights) else weights
    if "model" not in meta or "model_options" not in meta:
        raise ValueError("weights need the record of their network (resnet_jax.weights.model_record) to be saved")
    return formats.write(path, formats.names(variables), json.dumps({**meta, "format": FORMAT}))


def load(path: str | pathlib.Path, model: models.ResNet | None = None) -> Weights:
    """The network, variables and record in a weights file. With `model`, refuses (one line) a network that is
    not the one the weights belong to, rather than computing something else with them."""
    path = pathlib.Path(path)
    if path.suffix in convert.TORCH_SUFFIXES:
        weights = convert.from_torchvision(convert.read_state_dict(path), source=str(path))
    else:
        arrays, metadata = formats.read(path)
        arrays = convert.strip_module_prefix(arrays)
        if metadata is not None:
            try:
                meta = json.loads(metadata)
                model_of_file = build_model(meta)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: its metadata does not name a network ({type(e).__name__}: {e})") from None
            weights = Weights(model_of_file, formats.tree(arrays), meta)
            check_variables(model_of_file, weights.variables, str(path))
        elif convert.is_torchvision(arrays):
            weights = convert.from_torchvision(arrays, source=str(path))
        else:
            raise ValueError(f"{path} holds neither resnet_jax weights (no metadata) nor a torchvision ResNet state "
                             f"dict (keys such as {', '.join(sorted(arrays)[:3]) or 'none'}); write ours with "
                             "resnet_jax.weights.save or `python -m resnet_jax.export`")
    if model is not None:
        check_model(model, weights.meta, str(path))
        weights = weights._replace(model=model)
    return weights
