"""Keras for the cross-checks: imported only where TensorFlow is installed (CI must have it)."""

import os

import numpy as np
import pytest


def import_keras():
    """Keras, or a skip on machines without TensorFlow (the GPU hosts); under CI a missing Keras fails."""
    return __import__("keras") if os.environ.get("CI") else pytest.importorskip("keras")


def randomize(model, seed: int = 0):
    """Random BN statistics and conv biases in a keras.applications ResNet (Keras initialises both to trivial
    values, which would hide a wrong bias folding or epsilon conversion); returns the model."""
    keras = import_keras()
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
