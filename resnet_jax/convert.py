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
