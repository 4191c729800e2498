"""Converts variables between the unrolled (`stage<i>_block<j>`) and the scanned (`stage<i>_repeated`) layout
of a ResNet (`scan_blocks`); both compute the same function, so weights move freely between them."""

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from resnet_jax.models.resnet import ResNet


def _convert(model: ResNet, variables: Mapping[str, Any], scan: bool) -> dict[str, Any]:
    converted = {}
    for collection, tree in variables.items():
        tree = dict(tree)
        for i, blocks in enumerate(model.stage_sizes, start=1):
            names = [f"stage{i}_block{j}" for j in range(2, blocks + 1)]
            stacked = f"stage{i}_repeated"
            if scan and names and names[0] in tree:
                tree[stacked] = {"block": jax.tree.map(lambda *a: jnp.stack(a), *(tree.pop(n) for n in names))}
            elif not scan and stacked in tree:
                block = tree.pop(stacked)["block"]
                tree.update({n: jax.tree.map(lambda a, k=k: a[k], block) for k, n in enumerate(names)})
        converted[collection] = tree
    return converted


def scanned(model: ResNet, variables: Mapping[str, Any]) -> tuple[ResNet, dict[str, Any]]:
    """(model with scan_blocks=True, its variables) from either layout."""
    return model.clone(scan_blocks=True), _convert(model, variables, scan=True)


def unrolled(model: ResNet, variables: Mapping[str, Any]) -> tuple[ResNet, dict[str, Any]]:
    """(model with scan_blocks=False, its variables) from either layout: the layout of the published names
    (`stage1_block2/conv1/kernel`) that converters, exports and Figure 7's layer names use."""
    return model.clone(scan_blocks=False), _convert(model, variables, scan=False)
