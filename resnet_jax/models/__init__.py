"""Residual and plain networks of He et al. (2015) as flax.linen modules."""

from resnet_jax.models.blocks import SHORTCUTS, STRIDE_ON, ResidualBlock
from resnet_jax.models.registry import (
    CIFAR_PAPER_DEPTHS,
    CREATE_OPTIONS,
    IMAGENET_STAGES,
    create,
    from_config,
    input_shape,
    list_models,
    model_options,
)
from resnet_jax.models.resnet import ResNet
from resnet_jax.models.summary import (
    abstract_variables,
    analytic_macs,
    count_params,
    describe,
    forward_macs,
)

__all__ = [
    "CIFAR_PAPER_DEPTHS", "CREATE_OPTIONS", "IMAGENET_STAGES", "SHORTCUTS", "STRIDE_ON", "ResNet", "ResidualBlock",
    "abstract_variables", "analytic_macs", "count_params", "create", "describe", "forward_macs", "from_config",
    "input_shape", "list_models", "model_options",
]
