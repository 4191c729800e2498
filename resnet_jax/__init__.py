"""resnet_jax: the residual networks of He et al. (2015) in JAX/Flax, with their training recipes.

The model and training code never import TensorFlow; only `resnet_jax.data` and the Keras converter do,
and only when they are used.
"""

__version__ = "0.1.0"
