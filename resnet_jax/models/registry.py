"""Named networks: a table from depth to stage sizes and block type, and `create` to build one by name."""

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from resnet_jax.models.blocks import SHORTCUTS, STRIDE_ON
from resnet_jax.models.resnet import DTYPES, ResNet

# Table 1 of the paper: blocks per stage (conv2_x .. conv5_x) and whether the block is a bottleneck.
IMAGENET_STAGES: dict[int, tuple[tuple[int, ...], bool]] = {
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
    101: ((3, 4, 23, 3), True),
    152: ((3, 8, 36, 3), True),
}
IMAGENET_WIDTHS = (64, 128, 256, 512)
# Section 4.2: 6n layers on maps of 32, 16 and 8 pixels with 16, 32 and 64 filters, plus stem and head.
CIFAR_WIDTHS = (16, 32, 64)
CIFAR_PAPER_DEPTHS = (20, 32, 44, 56, 110, 1202)
FAMILIES = ("imagenet", "cifar")
IMAGE_SIZE = {"imagenet": 224, "cifar": 32}

# The paper's defaults per family: option B on ImageNet (Table 3's choice), A on CIFAR (section 4.2).
_DEFAULTS = {
    "imagenet": dict(num_classes=1000, shortcut="B"),
    "cifar": dict(num_classes=10, shortcut="A"),
}
CREATE_OPTIONS = ("shortcut", "num_classes", "stride_on", "zero_init_last_bn", "bn_momentum", "bn_epsilon", "dtype",
            "scan_blocks")
# Fields of ResNet that say how it is computed, not what: injected layers, never recorded in checkpoints.
_INJECTED = ("conv", "pool")
_NAME = re.compile(r"(resnet|plain)(\d+)")


def _family_of(depth: int, family: str | None) -> str:
    cifar_ok = depth >= 8 and (depth - 2) % 6 == 0
    if family is None:
        # 50 and 152 are also 6n+2: the ImageNet reading wins unless the caller says family="cifar".
        family = "imagenet" if depth in IMAGENET_STAGES else "cifar" if cifar_ok else None
    if family is None:
        raise ValueError(f"depth {depth} is neither an ImageNet depth {tuple(IMAGENET_STAGES)} "
                         f"nor a CIFAR depth 6n+2 such as {CIFAR_PAPER_DEPTHS}")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; allowed: {', '.join(FAMILIES)}")
    if family == "imagenet" and depth not in IMAGENET_STAGES:
        raise ValueError(f"ImageNet depth {depth} has no stage table; allowed: {tuple(IMAGENET_STAGES)}")
    if family == "cifar" and not cifar_ok:
        raise ValueError(f"CIFAR depth must be 6n+2 with n >= 1 (e.g. {CIFAR_PAPER_DEPTHS}); got {depth}")
    return family


def _validate(options: Mapping[str, Any]) -> None:
    checks = {
        "shortcut": (lambda v: v in SHORTCUTS, "A, B, C, plain"),
        "stride_on": (lambda v: v in STRIDE_ON, "1x1, 3x3"),
        "dtype": (lambda v: v in DTYPES, ", ".join(DTYPES)),
        "num_classes": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
        "scan_blocks": (lambda v: isinstance(v, bool), "True, False"),
        "bn_momentum": (lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
        "bn_epsilon": (lambda v: v > 0, "a positive number"),
    }
    for key, (ok, allowed) in checks.items():
        if key in options and not ok(options[key]):
            raise ValueError(f"unknown {key} {options[key]!r}; allowed: {allowed}")
    if options.get("zero_init_last_bn") and options.get("shortcut") == "plain":
        raise ValueError("zero_init_last_bn needs a shortcut: a plain net with zeroed branches outputs constants")


def create(name: str, *, family: str | None = None, **options: Any) -> ResNet:
    """Builds a named network, e.g. `create("resnet50", shortcut="C")`, `create("plain56")`.

    `name` is resnet<depth> or plain<depth>; `family` ("imagenet" or "cifar") is inferred from the depth
    unless given. `options` override the paper's defaults: shortcut, num_classes, stride_on,
    zero_init_last_bn, bn_momentum, bn_epsilon, dtype, scan_blocks.
    """
    match = _NAME.fullmatch(str(name))
    if not match:
        raise ValueError(f"unknown model {name!r}; allowed: resnet<depth> or plain<depth>, e.g. "
                         f"{', '.join(list_models()[:6])}, ... (see resnet_jax.models.list_models())")
    kind, depth = match.group(1), int(match.group(2))
    unknown = sorted(set(options) - set(CREATE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown model option {unknown[0]!r}; allowed: {', '.join(CREATE_OPTIONS)}")
    family = _family_of(depth, family)
    if kind == "plain":
        if options.get("shortcut", "plain") != "plain":
            raise ValueError(f"{name} has no shortcuts; got shortcut={options['shortcut']!r}")
        options = {**options, "shortcut": "plain"}
    options = {**_DEFAULTS[family], **options}
    _validate(options)

    if family == "imagenet":
        stage_sizes, bottleneck = IMAGENET_STAGES[depth]
        widths = IMAGENET_WIDTHS
    else:
        stage_sizes, bottleneck = ((depth - 2) // 6,) * 3, False
        widths = CIFAR_WIDTHS
    return ResNet(stage_sizes=stage_sizes, stage_widths=widths, bottleneck=bottleneck, stem=family, **options)


def from_config(model_config: Mapping[str, Any]) -> ResNet:
    """Builds the network that a config's `model` section describes (`name` plus any `create` option)."""
    fields = dict(model_config.items())
    if "name" not in fields:
        raise ValueError("the model config has no 'name'; e.g. config.model.name = 'resnet20'")
    name = fields.pop("name")
    return create(name, **fields)


def list_models() -> list[str]:
    """Every named network: the ImageNet depths of Table 1 and the CIFAR depths of Table 6, residual and plain."""
    depths = list(IMAGENET_STAGES) + list(CIFAR_PAPER_DEPTHS)
    return [f"{kind}{d}" for kind in ("resnet", "plain") for d in depths]


def input_shape(model: ResNet) -> tuple[int, int, int]:
    """The (height, width, channels) of one image the network was designed for."""
    size = IMAGE_SIZE[model.stem]
    return (size, size, 3)


def model_options(model: ResNet) -> dict[str, Any]:
    """The architecture: the fields that rebuild `model` with `ResNet(**fields)`, less injected layers. What a
    checkpoint records and compares on resume."""
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ("parent", "name", *_INJECTED)}
