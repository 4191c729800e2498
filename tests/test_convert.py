"""Agreement with an implementation nobody here wrote: Keras' ResNet-50/101/152 (paper's v1 networks)."""

import jax
import numpy as np
import pytest

from resnet_jax import models, weights
from tests.keras_models import import_keras, randomize

keras = import_keras()


def randomized_keras(name: str, seed: int = 0):
    return randomize(getattr(keras.applications, name)(weights=None, classifier_activation=None), seed)


@pytest.mark.parametrize("name, depth", [("ResNet50", 50), ("ResNet101", 101), ("ResNet152", 152)])
def test_logits_equal_keras(name, depth):
    keras_model = randomized_keras(name)
    images = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)
    expected = np.asarray(keras_model(images, training=False))

    model, variables, _ = weights.from_keras(keras_model)
    assert (model.stage_sizes, model.shortcut, model.stride_on) == (models.IMAGENET_STAGES[depth][0], "B", "1x1")
    # Every variable of our network is filled, with the shape our network declares.
    abstract = models.abstract_variables(model)
    assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(variables)
    assert all(a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(abstract),
                                                  jax.tree_util.tree_leaves(variables)))

    logits = np.asarray(jax.jit(lambda v, x: model.apply(v, x))(variables, images))
    # Measured: about 5e-7 to 7e-7 for all three depths.
    assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-4


def test_non_resnet_keras_model_is_refused():
    inputs = keras.Input((8, 8, 3))
    tiny = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv1_conv")(inputs), name="tiny")
    with pytest.raises(ValueError, match="has stage sizes"):
        weights.from_keras(tiny)
