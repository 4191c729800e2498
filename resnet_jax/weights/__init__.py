"""Network weights in and out of files, and from other implementations, never applied to the wrong network.

One direction of imports: `formats` (arrays by name in .npz/.safetensors) <- `record` (which network weights
belong to) <- `convert` (Keras and torchvision weights) <- `files` (our files: save, load).
"""

from resnet_jax.weights.convert import from_keras, from_torchvision, read_state_dict
from resnet_jax.weights.files import load, save
from resnet_jax.weights.formats import names, tree
from resnet_jax.weights.record import Weights, build_model, check_model, model_record

__all__ = ["Weights", "build_model", "check_model", "from_keras", "from_torchvision", "load", "model_record", "names",
           "read_state_dict", "save", "tree"]
