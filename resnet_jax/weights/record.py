"""What network a set of weights belongs to: the one metadata record of checkpoints and weight files.

    {"model": "resnet50", "create_options": {"shortcut": "B", "stride_on": "3x3", "num_classes": 1000},
     "model_options": {"stage_sizes": [3, 4, 6, 3], ..., "stride_on": "3x3", ...}}

`create_options` rebuild the network with `models.create(model, **create_options)`; `model_options` is every
architecture field of the network built (`models.model_options`), compared before weights are used, so that
weights are never applied to a network that computes something else (e.g. torchvision's ResNet-50, which
downsamples in its 3x3 convolutions, on `models.create("resnet50")`, which downsamples in the first 1x1).
"""

import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from resnet_jax import legacy, models
from resnet_jax.weights import formats

FORMAT = 2  # 1: checkpoints before the record had create_options


class Weights(NamedTuple):
    model: models.ResNet  # the network these variables belong to
    variables: dict[str, Any]  # {"params", "batch_stats"}: what model.apply takes
    meta: dict[str, Any]  # the record, and where the weights came from


def jsonable(value: Any) -> Any:
    """`value` as JSON would give it back (tuples as lists): how records are compared."""
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def model_record(name: str, create_options: Mapping[str, Any]) -> dict[str, Any]:
    """The record of `models.create(name, **create_options)`; raises ValueError (one line) for a bad option."""
    model = models.create(name, **create_options)
    return {"model": name, "create_options": jsonable(dict(create_options)),
            "model_options": jsonable(models.model_options(model))}


def recorded_options(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The architecture a record (or an older checkpoint's meta) says its weights belong to."""
    return legacy.architecture(meta.get("model_options", {}))


def build_model(meta: Mapping[str, Any]) -> models.ResNet:
    """The network of a record: `create(model, **create_options)`, or, where create()'s defaults have changed
    since the record was written, the exact network it names."""
    model = models.create(meta["model"], **legacy.architecture(meta.get("create_options", {})))
    recorded = recorded_options(meta)
    if recorded and jsonable(models.model_options(model)) != recorded:
        model = models.ResNet(**{k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()})
    return model


def named(name: str, options: Mapping[str, Any], keys: list[str]) -> str:
    """"resnet8 with shortcut='B'": a network named by the options in `keys`."""
    return f"{name} with " + ", ".join(f"{k}={options.get(k)!r}" for k in keys) if keys else name


def differing(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_model(model: models.ResNet, meta: Mapping[str, Any], where: str) -> None:
    """Raises one line when `model` is not the network the weights in `where` belong to."""
    recorded, given = recorded_options(meta), jsonable(models.model_options(model))
    keys = differing(recorded, given)
    if keys:
        build = ", ".join([repr(meta["model"])] + [f"{k}={v!r}" for k, v in meta.get("create_options", {}).items()])
        raise ValueError(f"the weights in {where} are {named(meta['model'], recorded, keys)}; the model given has "
                         f"{', '.join(f'{k}={given.get(k)!r}' for k in keys)}: build it with "
                         f"models.create({build}), or load without a model")


def check_variables(model: models.ResNet, variables: Mapping[str, Any], where: str) -> None:
    """Raises one line naming the first variable that `model` declares and the weights lack, or that they hold
    in another shape, or hold beyond what the network declares."""
    expected = {k: tuple(x.shape) for k, x in formats.names(models.abstract_variables(model)).items()}
    got = {k: tuple(np.shape(x)) for k, x in formats.names(variables).items()}
    for key in sorted(set(expected) | set(got)):
        if key not in got:
            raise ValueError(f"{where}: {key} is missing; the network ({model_name(model)}) needs it, shape "
                             f"{list(expected[key])}")
        if key not in expected:
            raise ValueError(f"{where}: {key} is not a variable of the network ({model_name(model)})")
        if expected[key] != got[key]:
            raise ValueError(f"{where}: {key} has shape {list(got[key])}; the network ({model_name(model)}) "
                             f"needs {list(expected[key])}")


def model_name(model: models.ResNet) -> str:
    kind = "bottleneck" if model.bottleneck else "basic"
    return f"{model.stem} {kind} blocks {tuple(model.stage_sizes)}, shortcut {model.shortcut}"
