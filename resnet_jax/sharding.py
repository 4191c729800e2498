"""Data parallelism, declared: a 1-D mesh over every device of every process, the batch split along it, the
train state replicated. The same code serves 1 CPU, 8 GPUs and a TPU pod slice."""

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with one axis, `data`, over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def mesh_platform(mesh: Mesh) -> str:
    """The platform the mesh's devices are ("cpu", "gpu", "tpu"): what a step is compiled for."""
    return mesh.devices.flat[0].platform


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis; every other axis whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """The part of a global batch that this process loads; one clear line if it does not divide evenly."""
    devices = mesh.devices.size
    if global_batch_size <= 0 or global_batch_size % devices:
        raise ValueError(f"batch size {global_batch_size} does not divide over {devices} devices; "
                         f"use a positive multiple of {devices}")
    return global_batch_size // jax.process_count()


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This process' rows of a batch (numpy) as one globally sharded jax.Array per field.

    Process p holds rows [p * local, (p + 1) * local) of the global batch, which is how every process'
    loader splits its data (see resnet_jax.data).
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
