"""Weights from other implementations, mapped onto our variable names; each converter returns `Weights`: the
network they belong to, its variables and their record.

Keras' `keras.applications.ResNet50/101/152` are the paper's v1 bottleneck networks (option B, stride on the
first 1x1). Their convolutions carry biases, which we fold into the following BN, and their BN epsilon is
1.001e-5, which we absorb into the running variance so that the result fits our default epsilon exactly.
Nothing here imports Keras: the Keras model is only read through `get_layer(...).get_weights()`.
torchvision's ResNets downsample in the bottleneck's 3x3 ("v1.5"): their network has `stride_on="3x3"`.
"""

import pathlib
import re
from typing import Any

import numpy as np

from resnet_jax.models import IMAGENET_STAGES
from resnet_jax.weights import formats
from resnet_jax.weights.record import Weights, build_model, check_variables, model_record

_KERAS_BLOCK = re.compile(r"conv(\d)_block(\d+)_1_conv")


def keras_stage_sizes(keras_model: Any) -> tuple[int, ...]:
    """Blocks per stage of a keras.applications ResNet, read from its layer names."""
    blocks: dict[int, int] = {}
    for layer in keras_model.layers:
        match = _KERAS_BLOCK.fullmatch(layer.name)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block)
    return tuple(blocks[s] for s in sorted(blocks))


def keras_record(keras_model: Any, bn_epsilon: float = 1e-5) -> dict[str, Any]:
    """The record of our network matching a keras.applications ResNet-50/101/152 (v1, not the V2 variants)."""
    sizes = keras_stage_sizes(keras_model)
    depth = next((d for d, (s, bottleneck) in IMAGENET_STAGES.items() if s == sizes and bottleneck), None)
    if depth is None:
        raise ValueError(f"Keras model {keras_model.name!r} has stage sizes {sizes}; expected a keras.applications "
                         f"ResNet50/101/152 with {[s for s, b in IMAGENET_STAGES.values() if b]}")
    try:
        num_classes = keras_model.get_layer("predictions").get_weights()[0].shape[1]
    except ValueError:
        raise ValueError(f"Keras model {keras_model.name!r} has no 'predictions' layer; build it with "
                         "include_top=True") from None
    return model_record(f"resnet{depth}", dict(shortcut="B", stride_on="1x1", num_classes=int(num_classes),
                                               bn_epsilon=bn_epsilon))


def _conv_bn(keras_model: Any, conv: str, bn: str, bn_epsilon: float) -> tuple[dict, dict, dict]:
    """One Keras conv (with bias) + BN as our bias-free conv, BN parameters and BN statistics."""
    conv_layer, bn_layer = keras_model.get_layer(conv), keras_model.get_layer(bn)
    kernel, *bias = conv_layer.get_weights()
    gamma, beta, mean, var = bn_layer.get_weights()
    if bias:
        # BN(conv(x) + b) normalises by (conv(x) + b - mean): the bias is a shift of the running mean.
        mean = mean - bias[0]
    # Same denominator sqrt(var + eps) under our epsilon.
    var = var + (bn_layer.epsilon - bn_epsilon)
    return {"kernel": kernel}, {"scale": gamma, "bias": beta}, {"mean": mean, "var": var}


def from_keras(keras_model: Any, bn_epsilon: float = 1e-5) -> Weights:
    """(network, `{"params", "batch_stats"}`, record) from a keras.applications ResNet's weights."""
    meta = keras_record(keras_model, bn_epsilon)
    model = build_model(meta)
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}

    params["stem_conv"], params["stem_bn"], stats["stem_bn"] = _conv_bn(keras_model, "conv1_conv", "conv1_bn",
                                                                         bn_epsilon)
    for s, blocks in enumerate(model.stage_sizes, start=1):
        for b in range(1, blocks + 1):
            ours, theirs = f"stage{s}_block{b}", f"conv{s + 1}_block{b}"
            block_params, block_stats = {}, {}
            # Keras numbers the projection 0 and the branch 1..3; we call them proj and conv1..conv3.
            names = [("proj", 0)] if b == 1 else []
            for mine, k in names + [(f"{i}", i) for i in (1, 2, 3)]:
                conv, bn, stat = _conv_bn(keras_model, f"{theirs}_{k}_conv", f"{theirs}_{k}_bn", bn_epsilon)
                conv_name, bn_name = (f"{mine}_conv", f"{mine}_bn") if mine == "proj" else (f"conv{mine}", f"bn{mine}")
                block_params[conv_name], block_params[bn_name], block_stats[bn_name] = conv, bn, stat
            params[ours], stats[ours] = block_params, block_stats
    kernel, bias = keras_model.get_layer("predictions").get_weights()
    params["head"] = {"kernel": kernel, "bias": bias}
    to_f32 = lambda tree: {k: to_f32(v) if isinstance(v, dict) else np.asarray(v, np.float32) for k, v in tree.items()}  # noqa: E731
    variables = {"params": to_f32(params), "batch_stats": to_f32(stats)}
    source = f"keras.applications {keras_model.name}"
    check_variables(model, variables, source)
    return Weights(model, variables, {**meta, "source": source})


# torchvision's ResNet (torchvision.models.resnet18 ... resnet152) in its state-dict layout: convolutions
# OIHW, BN weight/bias/running_mean/running_var (epsilon 1e-5, as ours), fc.weight [classes, features].
# Its bottlenecks downsample in the 3x3 ("v1.5"): our stride_on="3x3". Its projection shortcuts sit where the
# shape changes (option B), as layerN.0.downsample.0 (conv) and .1 (BN).
_TV_CONV = re.compile(r"layer(\d)\.(\d+)\.conv(\d)\.weight")
_TV_IGNORED = ("num_batches_tracked",)  # BN's update counter; our BN uses a fixed momentum


def is_torchvision(keys: Any) -> bool:
    """Whether names look like a torchvision ResNet state dict's."""
    return {"conv1.weight", "fc.weight"} <= set(keys) and any(k.startswith("layer1.") for k in keys)


def torchvision_record(state_dict: dict[str, Any], source: str = "a torchvision state dict") -> dict[str, Any]:
    """The record of our network matching a torchvision ResNet state dict."""
    blocks: dict[int, int] = {}
    bottleneck = False
    for key in state_dict:
        match = _TV_CONV.fullmatch(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
            bottleneck |= match.group(3) == "3"
    sizes = tuple(blocks.get(s, 0) for s in range(1, 5))
    depth = next((d for d, (s, b) in IMAGENET_STAGES.items() if s == sizes and b == bottleneck), None)
    if depth is None or "fc.weight" not in state_dict:
        raise ValueError(f"{source}: not a torchvision ResNet-18/34/50/101/152 state dict: stage sizes {sizes}, "
                         f"bottleneck {bottleneck}, fc.weight {'present' if 'fc.weight' in state_dict else 'missing'}")
    num_classes = int(np.shape(state_dict["fc.weight"])[0])
    return model_record(f"resnet{depth}", dict(shortcut="B", stride_on="3x3", num_classes=num_classes))


def from_torchvision(state_dict: dict[str, Any], source: str = "a torchvision state dict") -> Weights:
    """(network, `{"params", "batch_stats"}`, record) from a torchvision ResNet state dict of arrays (a
    `module.` prefix, as DataParallel writes, is dropped).

    Every key must be used (apart from BN's num_batches_tracked), and every variable of our network filled
    with the shape it declares; otherwise ValueError names the first key or variable left over."""
    state_dict = strip_module_prefix(state_dict)
    meta = torchvision_record(state_dict, source)
    name, model = meta["model"], build_model(meta)
    unused = {k for k in state_dict if not k.endswith(_TV_IGNORED)}

    def take(key: str) -> np.ndarray:
        if key not in state_dict:
            raise ValueError(f"{source}: no {key!r}, which torchvision's {name} has")
        unused.discard(key)
        return np.asarray(state_dict[key], np.float32)

    def conv(prefix: str) -> dict[str, np.ndarray]:
        return {"kernel": take(f"{prefix}.weight").transpose(2, 3, 1, 0)}  # OIHW -> HWIO

    def bn(prefix: str) -> tuple[dict, dict]:
        return ({"scale": take(f"{prefix}.weight"), "bias": take(f"{prefix}.bias")},
                {"mean": take(f"{prefix}.running_mean"), "var": take(f"{prefix}.running_var")})

    params: dict[str, Any] = {"stem_conv": conv("conv1")}
    stats: dict[str, Any] = {}
    params["stem_bn"], stats["stem_bn"] = bn("bn1")
    convs = 3 if model.bottleneck else 2
    for s, blocks in enumerate(model.stage_sizes, start=1):
        for b in range(blocks):
            theirs, ours = f"layer{s}.{b}", f"stage{s}_block{b + 1}"
            block_params, block_stats = {}, {}
            for i in range(1, convs + 1):
                block_params[f"conv{i}"] = conv(f"{theirs}.conv{i}")
                block_params[f"bn{i}"], block_stats[f"bn{i}"] = bn(f"{theirs}.bn{i}")
            if f"{theirs}.downsample.0.weight" in state_dict:
                block_params["proj_conv"] = conv(f"{theirs}.downsample.0")
                block_params["proj_bn"], block_stats["proj_bn"] = bn(f"{theirs}.downsample.1")
            params[ours], stats[ours] = block_params, block_stats
    params["head"] = {"kernel": take("fc.weight").T, "bias": take("fc.bias")}
    if unused:
        raise ValueError(f"{source}: keys not mapped onto {name}: {', '.join(sorted(unused)[:5])}")
    variables = {"params": params, "batch_stats": stats}
    check_variables(model, variables, source)
    return Weights(model, variables, {**meta, "source": source})


def strip_module_prefix(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Names without the `module.` that torch.nn.DataParallel and DistributedDataParallel put before each."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k.removeprefix("module."): v for k, v in state_dict.items()}
    return state_dict


TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def read_state_dict(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """A state dict (name -> array, `module.` prefixes dropped) from .safetensors or .npz, or from a PyTorch
    .pt/.pth file when torch is installed. Nothing in the file is executed: torch.load runs with
    weights_only=True."""
    path = pathlib.Path(path)
    if path.suffix in TORCH_SUFFIXES:
        try:
            import torch
        except ImportError:
            raise ValueError(f"{path} is a PyTorch file and torch is not installed; convert it to .safetensors "
                             "(safetensors.torch.save_file(state_dict, ...)) or install torch") from None
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged or foreign file
            raise ValueError(f"{path} is not a readable PyTorch file ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})") from None
        for key in ("state_dict", "model"):  # training checkpoints often wrap the weights
            if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
                loaded = loaded[key]
        if not isinstance(loaded, dict) or not all(hasattr(v, "numpy") for v in loaded.values()):
            raise ValueError(f"{path} holds no state dict of tensors")
        return strip_module_prefix({k: v.float().numpy() for k, v in loaded.items()})
    arrays, _ = formats.read(path)
    return strip_module_prefix(arrays)
