"""The network of Table 1 (ImageNet) and section 4.2 (CIFAR): a stem, stages of residual blocks, a head."""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from resnet_jax.models.blocks import ModuleDef, ResidualBlock, symmetric_padding

Array = Any

# He et al. 2015b ("Delving Deep into Rectifiers"), eq. 10: zero-mean Gaussian, std sqrt(2 / (k^2 c_in)).
he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
STEMS = ("imagenet", "cifar")


# Variable collections that nn.scan stacks per block (intermediates: what capture_intermediates records).
SCANNED_COLLECTIONS = ("params", "batch_stats", "intermediates")


class RepeatedBlock(nn.Module):
    """One residual block as the body of nn.scan (carry in, carry out)."""

    block: Any  # a ResidualBlock constructor with every field but the name bound

    @nn.compact
    def __call__(self, x: Array, _: None) -> tuple[Array, None]:
        return self.block(name="block")(x), None


class ResNet(nn.Module):
    """A residual (or plain) network; every named network is this module with a row of the stage table.

    Parameters stay float32; `dtype` is the compute dtype. Logits are returned in float32. `conv` and `pool`
    are the convolution module and the max pooling, fields so that a caller can inject its own, as the flax
    ImageNet example does; they are not part of the architecture and checkpoints do not record them.

    `scan_blocks` runs blocks 2..n of each stage, which all have the same shapes, as one `nn.scan`: XLA
    compiles one block per stage instead of n, which is what makes ResNet-1202 compile in seconds rather than
    hours. Same function; the parameters of those blocks are stacked along a leading axis under
    `stage<i>_repeated/block` instead of `stage<i>_block2 .. _block<n>` (`resnet_jax.models.layout` converts).
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
    scan_blocks: bool = False
    conv: ModuleDef = nn.Conv
    pool: Callable[..., Array] = nn.max_pool

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        dtype = DTYPES[self.dtype]
        conv = functools.partial(self.conv, use_bias=False, dtype=dtype, kernel_init=he_normal)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum,
                                 epsilon=self.bn_epsilon, dtype=dtype)

        x = x.astype(dtype)
        if self.stem == "imagenet":
            x = conv(self.stage_widths[0], (7, 7), (2, 2), padding=symmetric_padding(7), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))
            # Padding with -inf or 0 is the same after a ReLU; -inf is what max_pool pads with.
            x = self.pool(x, (3, 3), (2, 2), padding=symmetric_padding(3))
        else:
            x = conv(self.stage_widths[0], (3, 3), padding=symmetric_padding(3), name="stem_conv")(x)
            x = nn.relu(norm(name="stem_bn")(x))

        for i, (blocks, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
            block = functools.partial(ResidualBlock, width=width, bottleneck=self.bottleneck,
                                      shortcut=self.shortcut, conv=conv, norm=norm, stride_on=self.stride_on,
                                      zero_init_last_bn=self.zero_init_last_bn)
            # Table 1: "downsampling is performed by conv3_1, conv4_1, and conv5_1 with a stride of 2".
            x = block(strides=2 if i > 0 else 1, name=f"stage{i + 1}_block1")(x)
            if self.scan_blocks and blocks > 1:
                repeated = nn.scan(RepeatedBlock, variable_axes={c: 0 for c in SCANNED_COLLECTIONS},
                                   split_rngs={"params": True}, length=blocks - 1)
                x, _ = repeated(functools.partial(block, strides=1), name=f"stage{i + 1}_repeated")(x, None)
            else:
                for j in range(1, blocks):
                    x = block(strides=1, name=f"stage{i + 1}_block{j + 1}")(x)

        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=dtype, name="head")(x)
        return x.astype(jnp.float32)
