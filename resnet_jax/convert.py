"""The converters' older import path: they live in `resnet_jax.weights.convert` and return `Weights`."""

from resnet_jax.weights.convert import from_keras, from_torchvision, read_state_dict

__all__ = ["from_keras", "from_torchvision", "read_state_dict"]
