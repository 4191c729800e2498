"""The network of Table 1 (ImageNet) and section 4.2 (CIFAR): a stem, stages of residual blocks, a head."""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from resnet_jax.models.blocks import ResidualBlock, symmetric_padding
from resnet_jax.models.conv import conv_function

Array = Any

# He et al. 2015b ("Delving Deep into Rectifiers"), eq. 10: zero-mean Gaussian, std sqrt(2 / (k^2 c_in)).
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
STEMS = ("imagenet", "cifar")


class ResNet(nn.Module):
    """A residual (or plain) network; every named network is this module with a row of the stage table.

    Parameters stay float32; `dtype` is the compute dtype. Logits are returned in float32. `conv_impl`:
    "auto" computes the convolutions' weight gradients as matrix products on CPUs (faster there, same
    result within float32 rounding), "xla" leaves every gradient to XLA (resnet_jax/models/conv.py).
    """

    stage_sizes: Sequence[int]
    stage_widths: Sequence[int]
    bottleneck: bool
    stem: str
    num_classes: int
    shortcut: str = "B"
    stride_on: str = "1x1"
    zero_init_last_bn: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: str = "float32"
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        dtype = DTYPES[self.dtype]
        # conv_impl changes how the CPU computes the weight gradient, never the parameters or the function.
        conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype, kernel_init=he_normal,
                                 conv_general_dilated=conv_function(self.conv_impl))
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                                 epsilon=self.bn_epsilon, dtype=dtype)

        x = x.astype(dtype)
        if self.stem == "imagenet":
            x = conv(self.stage_widths[0], (7, 7), (2, 2), padding=symmetric_padding(7), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))
            # Padding with -inf or 0 is the same after a ReLU; -inf is what max_pool pads with.
            x = nn.max_pool(x, (3, 3), (2, 2), padding=symmetric_padding(3))
        else:
            x = conv(self.stage_widths[0], (3, 3), padding=symmetric_padding(3), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))

        for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            for j in range(blocks):
                # Table 1: "downsampling is performed by conv3_1, conv4_1, and conv5_1 with a stride of 2".
                strides = 2 if i > 0 and j == 0 else 1
                x = ResidualBlock(width, strides, self.bottleneck, self.shortcut, conv, norm,
                                  stride_on=self.stride_on, zero_init_last_bn=self.zero_init_last_bn,
                                  name=f"stage{i + 1}_block{j + 1}")(x)

        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=dtype, name="head")(x)
        return x.astype(jnp.float32)
