"""The XLA:CPU speed layer: how a step is compiled for a CPU mesh, applied by one call and never part of a model.

`specialize(model, platform)` returns, for "cpu", the same network with its convolutions' weight gradient
computed as a product of patches (`conv`) and its max-pool gradient by strided pads (`pool`), plus the compiler
options that send its convolutions to Eigen (`compiler`); `malloc` keeps freed host memory in the process. For
any other platform, or with `enabled=False`, it returns the model untouched and no options. Parameters, their
names and the function stay the same: a run saved with the layer on resumes with it off and the reverse.
The layer's gradients are `custom_vjp`s, so use the model itself (not the specialised one) for forward-mode
derivatives.
"""

import functools
from typing import TypeVar

import flax.linen as nn

from resnet_jax.xla_cpu import compiler, conv, pool

Model = TypeVar("Model", bound=nn.Module)


def specialize(model: Model, platform: str, enabled: bool = True) -> tuple[Model, dict[str, str] | None]:
    """(model to compile, XLA compiler options) for a step compiled for `platform` ("cpu", "gpu", "tpu").

    Only a model's default layers are swapped (`conv=nn.Conv`, `pool=nn.max_pool`): a convolution or pooling
    a caller injected is theirs to keep.
    """
    if not enabled or platform != "cpu":
        return model, None
    swaps = {}
    if model.conv is nn.Conv:
        swaps["conv"] = functools.partial(nn.Conv, conv_general_dilated=conv.conv_general_dilated)
    if model.pool is nn.max_pool:
        swaps["pool"] = pool.max_pool
    return model.clone(**swaps), compiler.compiler_options()


__all__ = ["compiler", "conv", "pool", "specialize"]
