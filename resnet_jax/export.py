"""A network's variables in one portable file, and back: NumPy `.npz` or `.safetensors`.

Every array is named by its place in the network, e.g. `params/stage1_block1/conv1/kernel` (HWIO),
`batch_stats/stage1_block1/bn1/mean`, `params/head/kernel` ([features, classes]). Beside the arrays the file
holds JSON metadata: the network's name and options (enough to rebuild it) and, for a checkpoint, the run's
config and step. Reading never executes code from the file: `.npz` is opened with `allow_pickle=False`, and
safetensors is a JSON header followed by raw little-endian arrays, read here without extra dependencies.

    python -m resnet_jax.export runs/resnet56 resnet56.npz                  # newest checkpoint of a workdir
    python -m resnet_jax.export runs/resnet56/checkpoints/32000 r56.safetensors
    python -m resnet_jax.export --torchvision resnet50.safetensors resnet50.npz
"""

import argparse
import json
import os
import pathlib
import struct
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from resnet_jax import legacy, models

META_KEY = "__meta__"
Variables = dict[str, Any]


def flatten(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{"params/stage1_block1/conv1/kernel": array, ...} from nested dicts of arrays."""
    flat: dict[str, np.ndarray] = {}

    def walk(prefix: str, tree: Any) -> None:
        if isinstance(tree, Mapping):
            for key, value in tree.items():
                walk(f"{prefix}/{key}" if prefix else str(key), value)
        else:
            flat[prefix] = np.asarray(jax.device_get(tree))

    walk("", variables)
    return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> Variables:
    tree: Variables = {}
    for name, array in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = array
    return tree


def model_meta(name: str, create_options: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """What rebuilds the network: `models.create(name, **create_options)`, plus its full option record."""
    model = models.create(name, **create_options)
    options = json.loads(json.dumps(models.model_options(model), default=list))
    return {"model": name, "create_options": dict(create_options), "model_options": options, **extra}


def model_from_meta(meta: Mapping[str, Any]) -> models.ResNet:
    model = models.create(meta["model"], **legacy.architecture(meta.get("create_options", {})))
    if "model_options" in meta:
        wanted = json.loads(json.dumps(models.model_options(model), default=list))
        recorded = legacy.architecture(meta["model_options"])
        if wanted != recorded:
            # create()'s defaults changed since the file was written: rebuild from the exact record.
            options = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items()}
            model = models.ResNet(**options)
    return model


def save_variables(path: str | pathlib.Path, variables: Mapping[str, Any],
                   meta: Mapping[str, Any] | None = None) -> pathlib.Path:
    """Writes `variables` ({"params", "batch_stats"}) to a .npz or .safetensors file, atomically."""
    path = pathlib.Path(path)
    flat = flatten(variables)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            write_safetensors(tmp, flat, {META_KEY: json.dumps(dict(meta or {}))})
        elif path.suffix == ".npz":
            with open(tmp, "wb") as f:
                np.savez(f, **flat, **{META_KEY: np.asarray(json.dumps(dict(meta or {})))})
        else:
            raise ValueError(f"unknown export format {path.suffix!r} for {path}; use .npz or .safetensors")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_variables(path: str | pathlib.Path) -> tuple[Variables, dict[str, Any]]:
    """(variables, meta) from a file written by `save_variables`."""
    flat = read_arrays(path)
    meta = json.loads(str(flat.pop(META_KEY, "{}")))
    return unflatten(flat), meta


def read_arrays(path: str | pathlib.Path) -> dict[str, Any]:
    """Every array of a .npz or .safetensors file by name (metadata strings under META_KEY)."""
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        arrays, header_meta = read_safetensors(path)
        if META_KEY in header_meta:
            arrays[META_KEY] = header_meta[META_KEY]
        return arrays
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] if k != META_KEY else str(f[k]) for k in f.files}
    raise ValueError(f"unknown weights format {path.suffix!r} for {path}; use .npz or .safetensors")


# The safetensors format (https://github.com/huggingface/safetensors): an 8-byte little-endian header size,
# a JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then
# the arrays' bytes, little-endian, C order.
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
              "U8": "u1", "BOOL": "?"}


def write_safetensors(path: str | pathlib.Path, arrays: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset, blobs = 0, []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.newbyteorder("<") not in names:
            raise ValueError(f"{name}: dtype {array.dtype} has no safetensors name")
        blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": names[array.dtype.newbyteorder("<")], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for blob in blobs:
            f.write(blob)


def read_safetensors(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(arrays, string metadata) of a .safetensors file; BF16 arrays come back as float32."""
    data = pathlib.Path(path).read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + size])
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + size:]
    arrays = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if entry["dtype"] == "BF16":
            raw = np.frombuffer(body[begin:end], "<u2").astype(np.uint32) << 16
            array = raw.view(np.float32)
        elif entry["dtype"] in _ST_DTYPES:
            array = np.frombuffer(body[begin:end], _ST_DTYPES[entry["dtype"]])
        else:
            raise ValueError(f"{path}: {name} has unsupported dtype {entry['dtype']}")
        arrays[name] = array.reshape(entry["shape"]).copy()
    return arrays, metadata


def export_checkpoint(path: str | pathlib.Path, out: str | pathlib.Path, step: int | None = None, *,
                      best: bool = False) -> pathlib.Path:
    """Writes the variables of a checkpoint (a workdir's newest readable one by default) to `out`."""
    from resnet_jax import restore

    state, meta, step = restore.restore_state(path, step, best=best)
    config = restore.config_from_meta(meta)
    create_options = {k: v for k, v in config.model.to_dict().items() if k != "name"}
    file_meta = model_meta(config.model.name, create_options, config=meta["config"], step=int(step),
                           source=str(pathlib.Path(path).absolute()))
    return save_variables(out, jax.device_get(state.variables), file_meta)


def import_torchvision(path: str | pathlib.Path, out: str | pathlib.Path) -> pathlib.Path:
    """Converts a torchvision-format ResNet state dict file to our variables in `out`."""
    from resnet_jax import convert

    name, create_options, variables = convert.from_torchvision(convert.read_state_dict(path))
    return save_variables(out, variables, model_meta(name, create_options, source=str(path)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="workdir, checkpoint directory, or (with --torchvision) a state dict")
    parser.add_argument("out", help="output file, .npz or .safetensors")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest readable)")
    parser.add_argument("--best", action="store_true", help="the checkpoint of lowest validation error")
    parser.add_argument("--torchvision", action="store_true",
                        help="source is a torchvision ResNet state dict (.safetensors, .npz, or .pt/.pth)")
    args = parser.parse_args(argv)
    try:
        if args.torchvision:
            written = import_torchvision(args.source, args.out)
        else:
            written = export_checkpoint(args.source, args.out, args.step, best=args.best)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {written}")


if __name__ == "__main__":
    main()
