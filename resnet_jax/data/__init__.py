"""Input pipelines for CIFAR-10 (paper section 4.2) and ImageNet 2012 (sections 3.4, 4.1).

Plain values in, globally sharded batches out: `train_batches`, `eval_batches`, `num_examples`, `validate`.
`options` is the config's `data` section; `DEFAULT_OPTIONS[dataset]` lists every field with its default.
Importing this package does not import TensorFlow; only reading a dataset does.
"""

import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
from jax.sharding import Mesh

from resnet_jax import sharding
from resnet_jax.data import cifar, imagenet
from resnet_jax.data.eval import average_view_scores, image_keys

DATASETS = ("cifar10", "imagenet2012")
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {"cifar10": cifar.DEFAULT_OPTIONS,
                                              "imagenet2012": imagenet.DEFAULT_OPTIONS}

__all__ = ["DATASETS", "DEFAULT_OPTIONS", "average_view_scores", "eval_batches", "image_keys", "num_examples",
           "resolve_data_dir", "train_batches", "validate"]


def resolve_data_dir(data_dir: str | None) -> str | None:
    """The argument, else $TFDS_DATA_DIR, else None (TFDS' own default, ~/tensorflow_datasets, where it
    downloads what is missing)."""
    return data_dir or os.environ.get("TFDS_DATA_DIR") or None


def _options(dataset: str, options: Mapping[str, Any] | None) -> dict[str, Any]:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    merged = dict(DEFAULT_OPTIONS[dataset])
    unknown = sorted(set(options or {}) - set(merged))
    if unknown:
        raise ValueError(f"unknown data option(s) {', '.join(unknown)} for {dataset}; known: {', '.join(merged)}")
    merged.update(options or {})
    return merged


def _split_names(dataset: str, data_dir: str | None, options: Mapping[str, Any]) -> tuple[str, ...]:
    if dataset == "cifar10":
        return tuple(cifar.splits(options))
    return imagenet.split_names(data_dir)


def num_examples(dataset: str, split: str, data_dir: str | None, options: Mapping[str, Any]) -> int:
    """Examples in `split` (CIFAR-10 with validation_split: "train" 45,000, "validation" 5,000)."""
    options, data_dir = _options(dataset, options), resolve_data_dir(data_dir)
    _check_split(dataset, split, data_dir, options)
    if dataset == "cifar10":
        return cifar.num_examples(split, options)
    return imagenet.num_examples(data_dir, split)


def _check_split(dataset: str, split: str, data_dir: str | None, options: Mapping[str, Any]) -> None:
    names = _split_names(dataset, data_dir, options)
    if split not in names:
        hint = " (\"validation\" needs data.validation_split=True)" if dataset == "cifar10" else ""
        raise ValueError(f"{dataset} has no split {split!r}; available: {', '.join(names)}{hint}")


def validate(dataset: str, *, data_dir: str | None, train_split: str, eval_split: str, global_batch_size: int,
             mesh: Mesh, options: Mapping[str, Any]) -> None:
    """Check a data configuration before anything compiles; raise a one-line ValueError on the first problem.

    Order: dataset name and options, batch over devices, the dataset's presence, its splits, batch <= split.
    """
    options, data_dir = _options(dataset, options), resolve_data_dir(data_dir)
    if dataset == "cifar10":
        if options["normalization"] not in cifar.NORMALIZATIONS:
            raise ValueError(f"unknown normalization {options['normalization']!r}; choose one of "
                             f"{', '.join(cifar.NORMALIZATIONS)}")
        if not isinstance(options["train_examples"], int) or options["train_examples"] < 0:
            raise ValueError(f"data.train_examples must be 0 (all) or a positive number of images; got "
                             f"{options['train_examples']!r}")
        if not isinstance(options["pad"], int) or options["pad"] < 0:
            raise ValueError(f"data.pad is {options['pad']!r}; allowed: 0 or a positive number of pixels")
    else:
        imagenet.check_options(options)
    sharding.local_batch_size(global_batch_size, mesh)
    if dataset == "cifar10":
        cifar.builder(data_dir, bool(options["download"]))
    else:
        imagenet.builder(data_dir)
    for split in (train_split, eval_split):
        _check_split(dataset, split, data_dir, options)
    n = num_examples(dataset, train_split, data_dir, options)
    if global_batch_size > n:
        raise ValueError(f"batch size {global_batch_size} exceeds the {n} examples of {dataset} {train_split!r}")
    if dataset == "imagenet2012":
        imagenet.check_shards(data_dir, train_split)


def train_batches(dataset: str, *, data_dir: str | None, split: str, global_batch_size: int, seed: int,
                  start_step: int, mesh: Mesh, options: Mapping[str, Any]) -> Iterator[dict[str, jax.Array]]:
    """Training batches from step `start_step` on, forever: {"image": float32 [B, H, W, 3] normalised,
    "label": int32 [B]}, sharded over `mesh`. Batch k depends only on (seed, k) (for ImageNet also on the
    number of processes, which fixes who reads which files), so a resumed run continues the same sequence
    without decoding the first k batches."""
    options, data_dir = _options(dataset, options), resolve_data_dir(data_dir)
    _check_split(dataset, split, data_dir, options)
    kwargs = dict(data_dir=data_dir, split=split, global_batch_size=global_batch_size, seed=seed,
                  start_step=start_step, mesh=mesh, options=options)
    if dataset == "cifar10":
        return cifar.train_batches(**kwargs)
    return imagenet.train_batches(**kwargs)


def eval_batches(dataset: str, *, data_dir: str | None, split: str, global_batch_size: int, mesh: Mesh,
                 options: Mapping[str, Any]) -> Iterator[dict[str, jax.Array]]:
    """One pass over `split`: {"image", "label", "mask", "index"}; mask is 1.0 for real examples and 0.0 for
    padding, index the example's position in the split (-1 for padding). Every example appears exactly once
    across all batches, devices and processes. ImageNet's 10-crop and multi-scale modes add a view axis
    ("image": [B, 10, 224, 224, 3]; "image_224", "image_256", ...: [B, 2, S, S, 3]); score them with
    `average_view_scores`."""
    options, data_dir = _options(dataset, options), resolve_data_dir(data_dir)
    _check_split(dataset, split, data_dir, options)
    kwargs = dict(data_dir=data_dir, split=split, global_batch_size=global_batch_size, mesh=mesh, options=options)
    if dataset == "cifar10":
        return cifar.eval_batches(**kwargs)
    return imagenet.eval_batches(**kwargs)
