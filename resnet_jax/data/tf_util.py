"""The one place that imports TensorFlow for the data pipelines, always lazily."""

from typing import Any


def tf() -> Any:
    """TensorFlow, with its accelerators hidden: it only reads and decodes, and must not take memory that
    JAX needs."""
    import tensorflow as tf_

    hide_accelerators(tf_)
    return tf_


def hide_accelerators(tf_: Any = None) -> None:
    if tf_ is None:
        import tensorflow as tf_
    try:
        tf_.config.set_visible_devices([], "GPU")
        tf_.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):  # already initialised, or no such device type: nothing to hide
        pass
