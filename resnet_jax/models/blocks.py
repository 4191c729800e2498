"""The residual unit of He et al. (2015): one implementation for basic and bottleneck blocks and for every
shortcut option (section 4.1, "Identity vs. Projection Shortcuts") including the plain nets' none."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Callable[..., nn.Module]
Array = Any

SHORTCUTS = ("A", "B", "C", "plain")
STRIDE_ON = ("1x1", "3x3")


def symmetric_padding(kernel: int) -> list[tuple[int, int]]:
    """k//2 on every side, as Caffe, PyTorch and Keras' ZeroPadding do.

    XLA's "SAME" pads a stride-2 convolution of an even-sized map asymmetrically (0 before, 1 after), which
    would shift every downsampling layer by a pixel relative to the published models and their weights.
    """
    return [(kernel // 2, kernel // 2)] * 2


def shortcut(x: Array, features: int, strides: int, kind: str, conv: ModuleDef, norm: ModuleDef) -> Array | None:
    """The identity path of a block; None for the plain nets.

    A: identity, subsampled by the stride and zero-padded to the new width (no parameters).
    B: identity, but a 1x1 projection (with the stride) and BN where the shape changes.
    C: the projection on every block.
    """
    if kind == "plain":
        return None
    reshapes = strides != 1 or x.shape[-1] != features
    if kind == "C" or (kind == "B" and reshapes):
        x = conv(features, (1, 1), (strides, strides), padding="VALID", name="proj_conv")(x)
        return norm(name="proj_bn")(x)
    if strides != 1:
        x = x[:, ::strides, ::strides, :]
    extra = features - x.shape[-1]
    if extra < 0:
        raise ValueError(f"shortcut 'A' cannot narrow {x.shape[-1]} channels to {features}; use 'B' or 'C'")
    if extra:
        # Split the zero channels between both sides, as the authors' CIFAR code and its ports do.
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return x


BOTTLENECK_EXPANSION = 4  # a bottleneck block's output is 4x its width (Table 1: 64 -> 256)


class ResidualBlock(nn.Module):
    """conv-BN-ReLU ... conv-BN, plus the shortcut, then ReLU (Fig. 2 and Fig. 5 of the paper).

    `bottleneck` picks 1x1-3x3-1x1 with a 4x wider output over 3x3-3x3. `stride_on` says which layer of a
    bottleneck downsamples: the first 1x1 (the authors' released models) or the 3x3 ("ResNet v1.5").
    """

    width: int
    strides: int
    bottleneck: bool
    shortcut: str
    conv: ModuleDef
    norm: ModuleDef
    stride_on: str = "1x1"
    zero_init_last_bn: bool = False

    @property
    def features(self) -> int:
        return BOTTLENECK_EXPANSION * self.width if self.bottleneck else self.width

    def branch(self) -> tuple[tuple[int, int, int], ...]:
        """(kernel, features, stride) of each convolution of the residual branch."""
        s = self.strides
        if not self.bottleneck:
            return ((3, self.width, s), (3, self.width, 1))
        s1, s3 = (s, 1) if self.stride_on == "1x1" else (1, s)
        return ((1, self.width, s1), (3, self.width, s3), (1, BOTTLENECK_EXPANSION * self.width, 1))

    @nn.compact
    def __call__(self, x: Array) -> Array:
        layers = self.branch()
        y = x
        for i, (kernel, features, strides) in enumerate(layers, start=1):
            y = self.conv(features, (kernel, kernel), (strides, strides), padding=symmetric_padding(kernel),
                          name=f"conv{i}")(y)
            last = i == len(layers)
            # Zero-init makes each residual block start as the identity (Goyal et al. 2017); off by default.
            scale_init = nn.initializers.zeros if last and self.zero_init_last_bn else nn.initializers.ones
            y = self.norm(scale_init=scale_init, name=f"bn{i}")(y)
            if not last:
                y = nn.relu(y)
        residual = shortcut(x, self.features, self.strides, self.shortcut, self.conv, self.norm)
        if residual is not None:
            y = y + residual
        return nn.relu(y)
