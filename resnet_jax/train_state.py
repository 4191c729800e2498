"""Everything that changes during training, in one immutable record; the train step maps it to the next."""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from resnet_jax.models import ResNet, input_shape


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: Any
    batch_stats: Any
    opt_state: optax.OptState

    @property
    def variables(self) -> dict[str, Any]:
        """What `model.apply` takes."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def init_train_state(model: ResNet, tx: optax.GradientTransformation, seed: int,
                     image_shape: tuple[int, int, int] | None = None) -> TrainState:
    """A fresh state: He-initialised parameters, zero-mean unit-variance BN statistics, empty momentum."""
    # The same split as when the state also kept a run key, so a seed initialises the same weights as before.
    init_key, _ = jax.random.split(jax.random.key(seed))
    image = jnp.zeros((1, *(image_shape or input_shape(model))), jnp.float32)
    variables = model.init(init_key, image, train=False)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))
