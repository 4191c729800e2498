"""Reading a run's config at the edge: validation before anything compiles, and the objects it describes."""

import difflib
import math
import re
from typing import Any

import optax
from jax.sharding import Mesh

from resnet_jax import models, optim
from resnet_jax.sharding import local_batch_size

SYNTHETIC = "synthetic"  # random images on the device, for benchmarks
DATASET_CLASSES = {"cifar10": 10, "imagenet2012": 1000}

# Every field a config may hold (experiments/configs/*/base.py set them all); anything else is a typo.
FIELDS = ("model", "dataset", "data_dir", "data", "train_split", "eval_splits", "seed", "batch_size",
          "eval_batch_size", "num_train_steps", "ghost_batch_size", "xla_cpu_layer", "optimizer", "schedule",
          "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
          "keep_best_checkpoint", "max_loss", "max_param_norm")
SECTIONS = {
    "model": ("name", *models.CREATE_OPTIONS),
    "optimizer": ("learning_rate", "reference_batch_size", "momentum", "nesterov", "weight_decay", "weight_decay_on"),
    "schedule": ("name", "boundaries", "decay_factor", "warmup_steps", "warmup", "warmup_learning_rate"),
}


def _unknown(field: str, allowed: tuple[str, ...]) -> ValueError:
    close = difflib.get_close_matches(field.rpartition(".")[2], allowed, n=1)
    hint = f"did you mean {field.rpartition('.')[0] + '.' if '.' in field else ''}{close[0]}?" if close \
        else f"allowed: {', '.join(allowed)}"
    return ValueError(f"unknown config field {field!r}; {hint}")


def check_fields(config: Any) -> None:
    """Raises one line for a field no config defines, naming the closest one that exists."""
    for key in config:
        if key not in FIELDS:
            raise _unknown(key, FIELDS)
    for section, allowed in SECTIONS.items():
        for key in config.get(section, {}):
            if key not in allowed:
                raise _unknown(f"{section}.{key}", allowed)


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"config.{field} is {value!r}; allowed: {allowed}")


def check_values(config: Any) -> None:
    """The numbers a model option or the data pipeline does not check themselves."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    for field in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "num_train_steps"):
        _check(is_int(config[field]) and config[field] > 0, field, config[field], "a positive integer")
    _check(is_int(config.keep_checkpoints) and config.keep_checkpoints >= 1, "keep_checkpoints",
           config.keep_checkpoints, "an integer of at least 1 (the last checkpoint is always kept)")
    _check(is_int(config.seed), "seed", config.seed, "an integer")
    _check(isinstance(config.get("xla_cpu_layer", True), bool), "xla_cpu_layer", config.get("xla_cpu_layer"),
           "True, False")
    o = config.optimizer
    _check(0.0 <= o.momentum < 1.0, "optimizer.momentum", o.momentum, "a number in [0, 1)")
    _check(0 < o.learning_rate < math.inf, "optimizer.learning_rate", o.learning_rate, "a finite positive number")
    _check(0 <= o.weight_decay < math.inf, "optimizer.weight_decay", o.weight_decay, "0 or a finite positive number")
    s = config.schedule
    _check(all(0 < b < 1 for b in s.boundaries) and list(s.boundaries) == sorted(s.boundaries),
           "schedule.boundaries", tuple(s.boundaries), "increasing fractions of the run, each in (0, 1)")
    _check(0 < s.decay_factor <= 1, "schedule.decay_factor", s.decay_factor, "a number in (0, 1]")
    _check(is_int(s.warmup_steps) and 0 <= s.warmup_steps < config.num_train_steps, "schedule.warmup_steps",
           s.warmup_steps, f"an integer in [0, num_train_steps = {config.num_train_steps})")
    for field in ("max_loss", "max_param_norm"):
        if field in config:
            _check(config[field] > 0, field, config[field], "a positive number")
    classes = DATASET_CLASSES.get(config.dataset)
    if classes is not None and config.model.get("num_classes", classes) < classes:
        raise ValueError(f"config.model.num_classes is {config.model.num_classes}, but {config.dataset}'s labels "
                         f"run to {classes - 1}; allowed: at least {classes}")


def validate(config: Any, mesh: Mesh, check_data: bool = True) -> None:
    """Raises ValueError with one line naming the bad value and what is allowed.

    `check_data=False` skips the dataset checks (which look for the files), e.g. to build an ImageNet config's
    model on a machine without ImageNet."""
    check_fields(config)
    models.from_config(config.model)
    check_values(config)
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


def load_error(error: Exception, path: str) -> str:
    """One line for what ml_collections raised while loading a config file and applying `--config.*` overrides:
    a missing file or get_config(), or an unknown field (with ml_collections' suggestion)."""
    text = " ".join(str(error).replace("\\n", " ").split())
    named = isinstance(error, (KeyError, AttributeError)) and "get_config" not in text
    unknown = re.search(r'Key "([^"]+)" does not exist', text) or (named and re.search(r"([A-Za-z_]\w*)", text))
    if unknown:
        hint = re.search(r'Did you mean "([^"]+)"', text)
        return f"unknown config field {unknown.group(1)!r} in --config.*" + (f"; did you mean {hint.group(1)!r}?"
                                                                             if hint else "")
    if isinstance(error, AttributeError) and "get_config" in text:
        return f"config file {path} has no get_config()"
    if isinstance(error, OSError):
        return f"no config file at {path}" if "No such file" in text else f"cannot load config {path}: {text[:300]}"
    return f"{type(error).__name__} while loading config {path}: {text[:300]}"


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
