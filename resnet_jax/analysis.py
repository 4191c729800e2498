"""Analyses of trained networks: the layer responses of the paper's Figure 7."""

from collections.abc import Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.models import ResNet
from resnet_jax.models.layout import unrolled


def _is_3x3_bn(module: nn.Module, method_name: str) -> bool:
    """The BN after a 3x3 convolution inside a block: bn1/bn2 of a basic block, bn2 of a bottleneck."""
    if not isinstance(module, nn.BatchNorm) or method_name != "__call__":
        return False
    if module.name == "stem_bn":  # the CIFAR stem is a 3x3 layer too; ImageNet's is 7x7
        return getattr(module.parent, "stem", None) == "cifar"
    block = module.parent
    if not hasattr(block, "branch"):
        return False
    kernels = [kernel for kernel, _, _ in block.branch()]
    index = int(module.name[2:]) - 1 if module.name.startswith("bn") and module.name[2:].isdigit() else -1
    return 0 <= index < len(kernels) and kernels[index] == 3


def layer_response_moments(model: ResNet, variables: Mapping[str, Any], images: jax.Array) -> dict[str, jax.Array]:
    """Per 3x3 layer, [count, sum, sum of squares] of its response on `images`: the output of the BN that
    follows the convolution, before the ReLU and the addition (Figure 7)."""
    model, variables = unrolled(model, variables)  # one name per layer, whatever the layout
    _, state = model.apply(variables, images, train=False, capture_intermediates=_is_3x3_bn,
                           mutable=["intermediates"])
    moments = {}
    for path, y in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
        names = [p.key for p in path if hasattr(p, "key") and p.key != "__call__"]
        y = y.astype(jnp.float32)
        moments["/".join(names)] = jnp.stack([jnp.asarray(y.size, jnp.float32), y.sum(), (y * y).sum()])
    return moments


def layer_response_std(model: ResNet, variables: Mapping[str, Any],
                       batches: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """The standard deviation of each 3x3 layer's response over every image of `batches` (e.g. the test set),
    in network order. Padding rows (mask 0) are excluded."""
    moments_fn = jax.jit(lambda v, x: layer_response_moments(model, v, x))
    totals: dict[str, np.ndarray] = {}
    for batch in batches:
        images = np.asarray(batch["image"])
        if "mask" in batch:
            images = images[np.asarray(batch["mask"]) > 0]
        if not len(images):
            continue
        for name, m in jax.device_get(moments_fn(variables, images)).items():
            totals[name] = totals.get(name, 0) + np.asarray(m, np.float64)
    def order(name: str) -> tuple[int, ...]:  # stem, then stage, block, layer
        if name.startswith("stem"):
            return (0,)
        return tuple(int(p) for p in name.replace("stage", "").replace("_block", " ").replace("/bn", " ").split())

    result = {}
    for name in sorted(totals, key=order):
        count, total, squares = totals[name]
        mean = total / count
        result[name] = float(np.sqrt(max(squares / count - mean * mean, 0.0)))
    return result
