"""Agreement with an implementation nobody here wrote: Keras' ResNet-50/101/152 (paper's v1 networks)."""

import os

import jax
import numpy as np
import pytest

# Machines without TensorFlow (the GPU hosts) skip this file; CI has it and must not skip.
keras = __import__("keras") if os.environ.get("CI") else pytest.importorskip("keras")

from resnet_jax import convert, models  # noqa: E402


def randomized_keras(name: str, seed: int = 0):
    """A keras.applications ResNet with random weights, and random BN statistics and conv biases, so that the
    bias folding and the epsilon conversion are exercised (Keras initialises both to trivial values)."""
    model = getattr(keras.applications, name)(weights=None, classifier_activation=None)
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            c = weights[0].shape
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c), rng.normal(0, 0.1, c),
                               rng.uniform(0.5, 2.0, c)])
        elif isinstance(layer, keras.layers.Conv2D):
            layer.set_weights([weights[0], rng.normal(0, 0.1, weights[1].shape)])
    return model


@pytest.mark.parametrize("name, depth", [("ResNet50", 50), ("ResNet101", 101), ("ResNet152", 152)])
def test_logits_equal_keras(name, depth):
    keras_model = randomized_keras(name)
    images = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)
    expected = np.asarray(keras_model(images, training=False))

    model = convert.keras_network(keras_model)
    assert (model.stage_sizes, model.shortcut, model.stride_on) == (models.IMAGENET_STAGES[depth][0], "B", "1x1")
    variables = convert.from_keras(keras_model)
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
        convert.from_keras(tiny)
