"""Reading a run's config at the edge: validation before anything compiles, and the objects it describes."""

from typing import Any

import optax
from jax.sharding import Mesh

from resnet_jax import models, optim
from resnet_jax.sharding import local_batch_size

SYNTHETIC = "synthetic"  # random images on the device, for benchmarks


def validate(config: Any, mesh: Mesh, check_data: bool = True) -> None:
    """Raises ValueError with one line naming the bad value and what is allowed.

    `check_data=False` skips the dataset checks (which look for the files), e.g. to build an ImageNet config's
    model on a machine without ImageNet."""
    models.from_config(config.model)
    if not isinstance(config.get("xla_cpu_layer", True), bool):
        raise ValueError(f"xla_cpu_layer {config.xla_cpu_layer!r}; allowed: True, False")
    devices = mesh.devices.size
    for field in ("batch_size", "eval_batch_size"):
        try:
            local_batch_size(config[field], mesh)
        except ValueError as e:
            raise ValueError(f"config.{field}: {e}") from None
    ghost = config.ghost_batch_size
    per_device = config.batch_size // devices
    if ghost < 0 or (ghost and per_device % ghost):
        raise ValueError(f"ghost_batch_size {ghost} does not divide the per-device batch {per_device} "
                         f"({config.batch_size} over {devices} devices); use 0 (global BN) or a divisor of it")
    if config.num_train_steps <= 0:
        raise ValueError(f"num_train_steps must be positive; got {config.num_train_steps}")
    make_schedule(config)
    make_optimizer(config, optax.constant_schedule(0.0))
    if check_data and config.dataset != SYNTHETIC:
        from resnet_jax import data  # lazy: TensorFlow only where real data is read

        data.validate(config.dataset, data_dir=config.data_dir, train_split=config.train_split,
                      eval_split=config.eval_splits[0] if config.eval_splits else config.train_split,
                      global_batch_size=config.batch_size, mesh=mesh, options=config.data.to_dict())
        for split in config.eval_splits[1:]:
            data.validate(config.dataset, data_dir=config.data_dir, train_split=config.train_split,
                          eval_split=split, global_batch_size=config.eval_batch_size, mesh=mesh,
                          options=config.data.to_dict())


def base_learning_rate(config: Any) -> float:
    """The peak learning rate; with reference_batch_size > 0 scaled linearly with the batch (Goyal et al.)."""
    lr, reference = config.optimizer.learning_rate, config.optimizer.reference_batch_size
    return lr * config.batch_size / reference if reference else lr


def make_schedule(config: Any) -> optax.Schedule:
    s = config.schedule
    return optim.learning_rate_schedule(
        name=s.name, base_learning_rate=base_learning_rate(config), num_train_steps=config.num_train_steps,
        boundaries=tuple(s.boundaries), decay_factor=s.decay_factor, warmup_steps=s.warmup_steps,
        warmup=s.warmup, warmup_learning_rate=s.warmup_learning_rate)


def make_optimizer(config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    o = config.optimizer
    return optim.sgd(schedule, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
                     weight_decay_on=o.weight_decay_on)


def load(path: str, overrides: dict[str, Any] | None = None) -> Any:
    """The config that a config file's get_config() returns, with dotted-key overrides applied, as launch.py
    builds it (for notebooks and tests). The repository root must be importable (it is from its root)."""
    import importlib.util
    import pathlib

    path = str(pathlib.Path(path))
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    if spec is None or not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"no config file at {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in (overrides or {}).items():
        parent = config
        *head, last = key.split(".")
        for part in head:
            parent = parent[part]
        parent[last] = value
    return config
