"""Arrays by name in one file, `.npz` or `.safetensors`, with a JSON string of metadata beside them.

A tree of variables becomes names with `names` (flax's `flatten_dict`, "/"-separated: the one way a pytree is
named anywhere in this package) and back with `tree`. Reading never executes code from a file: `.npz` is opened
with `allow_pickle=False`, and safetensors is a JSON header followed by raw little-endian arrays, parsed here.
"""

import json
import os
import pathlib
import struct
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import serialization, traverse_util

META_KEY = "__meta__"
SUFFIXES = (".npz", ".safetensors")


def names(tree: Any) -> dict[str, Any]:
    """{"params/stage1_block1/conv1/kernel": leaf, ...} for nested dicts, flax structs and optax states."""
    return traverse_util.flatten_dict(serialization.to_state_dict(tree), sep="/")


def tree(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dicts from "/"-separated names (the inverse of `names` for nested dicts)."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def check_suffix(path: pathlib.Path) -> None:
    """Raises one line unless `path` names a format this module reads and writes."""
    if path.suffix not in SUFFIXES:
        raise ValueError(f"unknown weights format {path.suffix!r} for {path}; use {' or '.join(SUFFIXES)}")


def write(path: str | pathlib.Path, arrays: Mapping[str, Any], metadata: str) -> pathlib.Path:
    """Writes `arrays` (name -> array) and the `metadata` string to `path`, atomically (a temporary file renamed)."""
    path = pathlib.Path(path)
    check_suffix(path)
    arrays = {k: np.asarray(jax.device_get(v)) for k, v in arrays.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            write_safetensors(tmp, arrays, {META_KEY: metadata})
        else:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays, **{META_KEY: np.asarray(metadata)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read(path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], str | None]:
    """(arrays by name, the metadata string or None) of a `.npz` or `.safetensors` file."""
    path = pathlib.Path(path)
    check_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        arrays, metadata = read_safetensors(path)
        return arrays, metadata.get(META_KEY)
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # noqa: BLE001 - zipfile and numpy raise many types for a damaged file
        raise ValueError(f"{path} is not a readable .npz file ({type(e).__name__}: {_short(e)})") from None
    meta = arrays.pop(META_KEY, None)
    return arrays, None if meta is None else str(meta)


def _short(error: Exception) -> str:
    return " ".join(str(error).split())[:200]


# The safetensors format (https://github.com/huggingface/safetensors): an 8-byte little-endian header size,
# a JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then
# the arrays' bytes, little-endian, C order.
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
              "U8": "u1", "BOOL": "?"}


def write_safetensors(path: str | pathlib.Path, arrays: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    dtype_names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset, blobs = 0, []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        little = array.dtype.newbyteorder("<")
        if little not in dtype_names:
            raise ValueError(f"{name}: dtype {array.dtype} has no safetensors name")
        blob = array.astype(little, copy=False).tobytes()
        header[name] = {"dtype": dtype_names[little], "shape": list(array.shape),
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
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors file: {len(data)} bytes")
    (size,) = struct.unpack("<Q", data[:8])
    if 8 + size > len(data):
        raise ValueError(f"{path} is not a safetensors file, or is truncated: its header claims {size} bytes of "
                         f"{len(data) - 8}")
    try:
        header = json.loads(data[8:8 + size])
        metadata = header.pop("__metadata__", None) or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object") from None
    body = memoryview(data)[8 + size:]
    arrays = {}
    for name, entry in header.items():
        try:
            begin, end = entry["data_offsets"]
            dtype, shape = entry["dtype"], tuple(entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: {name} has a malformed header entry {entry!r}") from None
        if dtype not in (*_ST_DTYPES, "BF16"):
            raise ValueError(f"{path}: {name} has unsupported dtype {dtype}")
        itemsize = 2 if dtype == "BF16" else np.dtype(_ST_DTYPES[dtype]).itemsize
        if not 0 <= begin <= end <= len(body) or end - begin != itemsize * int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{path}: {name} ({dtype} {list(shape)}) lies at bytes {begin}..{end} of "
                             f"{len(body)}: the file is truncated or damaged")
        if dtype == "BF16":
            array = (np.frombuffer(body[begin:end], "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(body[begin:end], _ST_DTYPES[dtype])
        arrays[name] = array.reshape(shape).copy()
    return arrays, metadata
