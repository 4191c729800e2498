"""SGD with momentum and the paper's learning-rate schedules (sections 3.4 and 4.2), all from plain values."""

from collections.abc import Sequence

import jax
import optax

SCHEDULES = ("step", "cosine", "constant")
WEIGHT_DECAY_ON = ("all", "kernels")


def learning_rate_schedule(*, name: str, base_learning_rate: float, num_train_steps: int,
                           boundaries: Sequence[float] = (0.5, 0.75), decay_factor: float = 0.1,
                           warmup_steps: int = 0, warmup: str = "linear",
                           warmup_learning_rate: float = 0.0) -> optax.Schedule:
    """The learning rate at each step.

    step: `base` divided by 1/decay_factor at each boundary, given as fractions of `num_train_steps` so that
      the schedule keeps its shape when the run is shortened (CIFAR: 32k and 48k of 64k = 0.5, 0.75).
    cosine: cosine decay from `base` to 0 after the warm-up.
    warmup "constant": hold `warmup_learning_rate` for `warmup_steps`, then jump to `base` (the paper's
      ResNet-110 recipe: 0.01 for about 400 iterations); "linear": ramp from `warmup_learning_rate` to `base`
      (Goyal et al. 2017, for large batches).
    """
    if name == "step":
        steps = {int(round(f * num_train_steps)): decay_factor for f in boundaries}
        main = optax.piecewise_constant_schedule(base_learning_rate, steps)
    elif name == "cosine":
        main = optax.cosine_decay_schedule(base_learning_rate, max(num_train_steps - warmup_steps, 1))
    elif name == "constant":
        main = optax.constant_schedule(base_learning_rate)
    else:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    if warmup_steps <= 0:
        return main
    if warmup == "constant":
        ramp = optax.constant_schedule(warmup_learning_rate)
    elif warmup == "linear":
        ramp = optax.linear_schedule(warmup_learning_rate, base_learning_rate, warmup_steps)
    else:
        raise ValueError(f"unknown warmup {warmup!r}; allowed: constant, linear")
    # The step schedule's boundaries are absolute; the cosine restarts its clock after the warm-up.
    if name == "step":
        return optax.join_schedules([ramp, lambda s: main(s + warmup_steps)], [warmup_steps])
    return optax.join_schedules([ramp, main], [warmup_steps])


def weight_decay_mask(params: optax.Params, on: str) -> optax.Params:
    """Which parameters weight decay applies to.

    "all": every parameter, BN scales and biases included, as in the paper's Caffe solver and the
    fb.resnet.torch reproduction. "kernels": convolution and dense kernels only; BN's scale and shift and the
    dense bias are left free (common in later recipes: decaying them does not regularise the function a
    BN-normalised network computes).
    """
    return jax.tree_util.tree_map_with_path(lambda path, _: on == "all" or path[-1].key == "kernel", params)


def sgd(schedule: optax.Schedule, *, momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 1e-4,
        weight_decay_on: str = "all") -> optax.GradientTransformation:
    """SGD with momentum; weight decay is added to the gradient before the momentum, i.e. an L2 penalty of
    weight_decay/2 * ||w||^2 on the loss, as Caffe and PyTorch's SGD apply it."""
    if weight_decay_on not in WEIGHT_DECAY_ON:
        raise ValueError(f"unknown weight_decay_on {weight_decay_on!r}; allowed: {', '.join(WEIGHT_DECAY_ON)}")
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=lambda p: weight_decay_mask(p, weight_decay_on)),
        optax.sgd(schedule, momentum=momentum, nesterov=nesterov),
    )
