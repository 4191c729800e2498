"""Weights from other implementations, mapped onto our variable names.

Keras' `keras.applications.ResNet50/101/152` are the paper's v1 bottleneck networks (option B, stride on the
first 1x1). Their convolutions carry biases, which we fold into the following BN, and their BN epsilon is
1.001e-5, which we absorb into the running variance so that the result fits our default epsilon exactly.
Nothing here imports Keras: the Keras model is only read through `get_layer(...).get_weights()`.
"""

import re
from typing import Any

import numpy as np

from resnet_jax.models import IMAGENET_STAGES, ResNet, create

Variables = dict[str, dict[str, Any]]

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


def keras_network(keras_model: Any, bn_epsilon: float = 1e-5) -> ResNet:
    """Our network that matches a keras.applications ResNet-50/101/152 (v1, not the V2 variants)."""
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
    return create(f"resnet{depth}", shortcut="B", stride_on="1x1", num_classes=num_classes, bn_epsilon=bn_epsilon)


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


def from_keras(keras_model: Any, bn_epsilon: float = 1e-5) -> Variables:
    """`{"params", "batch_stats"}` for `keras_network(keras_model, bn_epsilon)` from a Keras model's weights."""
    model = keras_network(keras_model, bn_epsilon)
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
    return {"params": to_f32(params), "batch_stats": to_f32(stats)}


# torchvision's ResNet (torchvision.models.resnet18 ... resnet152) in its state-dict layout: convolutions
# OIHW, BN weight/bias/running_mean/running_var (epsilon 1e-5, as ours), fc.weight [classes, features].
# Its bottlenecks downsample in the 3x3 ("v1.5"): our stride_on="3x3". Its projection shortcuts sit where the
# shape changes (option B), as layerN.0.downsample.0 (conv) and .1 (BN).
_TV_CONV = re.compile(r"layer(\d)\.(\d+)\.conv(\d)\.weight")
_TV_IGNORED = ("num_batches_tracked",)  # BN's update counter; our BN uses a fixed momentum


def torchvision_network(state_dict: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, create options) of our network matching a torchvision ResNet state dict."""
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
        raise ValueError(f"not a torchvision ResNet-18/34/50/101/152 state dict: stage sizes {sizes}, "
                         f"bottleneck {bottleneck}, fc.weight {'present' if 'fc.weight' in state_dict else 'missing'}")
    num_classes = int(np.shape(state_dict["fc.weight"])[0])
    return f"resnet{depth}", dict(shortcut="B", stride_on="3x3", num_classes=num_classes)


def from_torchvision(state_dict: dict[str, Any]) -> tuple[str, dict[str, Any], Variables]:
    """(name, create options, `{"params", "batch_stats"}`) from a torchvision ResNet state dict of arrays.

    Every key must be used (apart from BN's num_batches_tracked), and every variable of our network filled
    with the shape it declares; otherwise ValueError names the first key or variable left over."""
    name, options = torchvision_network(state_dict)
    model = create(name, **options)
    unused = {k for k in state_dict if not k.endswith(_TV_IGNORED)}

    def take(key: str) -> np.ndarray:
        if key not in state_dict:
            raise ValueError(f"torchvision state dict has no {key!r}, which {name} needs")
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
        raise ValueError(f"torchvision state dict keys not mapped onto {name}: {', '.join(sorted(unused)[:5])}")
    variables = {"params": params, "batch_stats": stats}
    _check_filled(model, variables, name)
    return name, options, variables


def _check_filled(model: ResNet, variables: Variables, name: str) -> None:
    import jax

    from resnet_jax.models import abstract_variables

    expected = {jax.tree_util.keystr(p): x.shape
                for p, x in jax.tree_util.tree_flatten_with_path(abstract_variables(model))[0]}
    got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
    for key in sorted(set(expected) | set(got)):
        if expected.get(key) != got.get(key):
            raise ValueError(f"{name} variable {key}: the network declares {expected.get(key)}, the weights "
                             f"give {got.get(key)}")


def read_state_dict(path: str | Any) -> dict[str, np.ndarray]:
    """A state dict (name -> array) from .safetensors or .npz, or from a PyTorch .pt/.pth file when torch is
    installed. Nothing in the file is executed: torch.load runs with weights_only=True."""
    import pathlib

    path = pathlib.Path(path)
    if path.suffix in (".pt", ".pth", ".bin"):
        try:
            import torch
        except ImportError:
            raise ValueError(f"{path} is a PyTorch file and torch is not installed; convert it to .safetensors "
                             "(safetensors.torch.save_file(state_dict, ...)) or install torch") from None
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        for key in ("state_dict", "model"):  # training checkpoints often wrap the weights
            if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
                loaded = loaded[key]
        return {k.removeprefix("module."): v.float().numpy() for k, v in loaded.items()}
    from resnet_jax.export import META_KEY, read_arrays

    arrays = read_arrays(path)
    arrays.pop(META_KEY, None)
    return arrays
