"""Reading PyTorch weight files without torch and without running their pickles.

A `.pth` state dict is a pickle that, loaded with `torch.load`, may import and call anything.
Here the pickle runs under an unpickler that resolves only the handful of names a state dict
needs (OrderedDict, the tensor rebuild functions, the storage types) and refuses every other
import, so a hostile file fails with an error instead of executing code. Both of torch's
formats are read: the zip archive (torch >= 1.6) and the older single-stream format that
torchvision's and pytorch-fid's published weights use. Safetensors files are read too.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from t2i_jax.errors import CheckpointError

_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    """A storage class named by the pickle; immutable, so a BUILD opcode cannot retype it."""

    __slots__ = ("dtype",)

    def __init__(self, name: str):
        object.__setattr__(self, "dtype", _STORAGE_DTYPES[name])

    def __setattr__(self, name, value):
        raise CheckpointError("weight file tries to modify a storage type")

    def __setstate__(self, state):
        raise CheckpointError("weight file tries to modify a storage type")


def _rebuild_tensor(storage, offset, size, stride, *_unused) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2 for numpy: a strided view of the storage, copied.

    The view is checked to lie inside the storage first: as_strided trusts its arguments,
    and a crafted file could otherwise make it read memory outside the buffer.
    """
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise CheckpointError("tensor without a storage")
    if storage.dtype not in _STORAGE_DTYPES.values():
        raise CheckpointError(f"tensor of unsupported dtype {storage.dtype}")
    ints = (offset, *size, *stride)
    if not all(isinstance(v, int) and v >= 0 for v in ints) or len(size) != len(stride):
        raise CheckpointError(f"malformed tensor: offset {offset}, size {size}, stride {stride}")
    if 0 in size:
        return np.zeros(tuple(size), storage.dtype)
    last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
    if last >= storage.size:
        raise CheckpointError(f"tensor of size {tuple(size)} runs past its storage")
    if not size:
        return np.array(storage[offset])  # 0-d array, not a numpy scalar
    strides = tuple(s * storage.itemsize for s in stride)
    return np.lib.stride_tricks.as_strided(storage[offset:], tuple(size), strides).copy()


def _rebuild_parameter(data, *_unused) -> np.ndarray:
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves the names a state dict needs; any other import is refused."""

    def __init__(self, file, path: str, load_storage):
        super().__init__(file)
        self._path = path
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise CheckpointError(
            f"{self._path}: refusing to load {module}.{name} (only plain tensor state dicts "
            "are read; convert the file to safetensors)"
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise CheckpointError(f"{self._path}: unsupported persistent id {pid!r}")
        return self._load_storage(pid)


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: not a torch zip archive (no single data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if f"{prefix}byteorder" in names:
            byteorder = archive.read(f"{prefix}byteorder").decode().strip()

        def load_storage(pid):
            _, storage_type, key, _location, numel = pid[:5]
            if not isinstance(storage_type, _StorageType):
                raise CheckpointError(f"{path}: storage of unknown type")
            dtype = storage_type.dtype.newbyteorder("<" if byteorder == "little" else ">")
            raw = archive.read(f"{prefix}data/{key}")
            return np.frombuffer(raw, dtype=dtype, count=numel).astype(dtype.newbyteorder("="))

        return _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), path, load_storage).load()


def _load_legacy(path: str) -> Any:
    """torch's pre-1.6 format: magic, protocol, sys info, object, storage keys, raw storages."""
    with open(path, "rb") as f:
        header = _RestrictedUnpickler(f, path, None)
        if header.load() != _LEGACY_MAGIC:
            raise CheckpointError(f"{path}: not a PyTorch weight file")
        header.load()  # protocol version
        sys_info = header.load()
        if not sys_info.get("little_endian", True):
            raise CheckpointError(f"{path}: big-endian legacy files are not supported")
        storages: dict[str, np.ndarray] = {}
        views: list[tuple] = []

        file_size = os.path.getsize(path)

        def load_storage(pid):
            _, storage_type, key, _location, numel, view = pid[:6]
            if not isinstance(storage_type, _StorageType):
                raise CheckpointError(f"{path}: storage of unknown type")
            size = numel * storage_type.dtype.itemsize if isinstance(numel, int) else -1
            if not 0 <= size <= file_size:
                raise CheckpointError(f"{path}: storage {key} larger than the file")
            if key not in storages:
                storages[key] = np.zeros(numel, storage_type.dtype)  # filled in below
            if view is None:
                return storages[key]
            view_key, offset, view_size = view
            out = np.zeros(view_size, storage_type.dtype)
            views.append((out, key, offset, view_size))
            return out

        # Tensors are rebuilt as copies while the object unpickles, before the raw bytes
        # that follow it are read: collect the rebuild calls, then replay them.
        deferred: list[tuple] = []

        def deferred_rebuild(storage, offset, size, stride, *_unused):
            holder = {}
            deferred.append((holder, storage, offset, size, stride))
            return holder

        unpickler = _RestrictedUnpickler(f, path, load_storage)
        original_find = unpickler.find_class

        def find_class(module, name):
            if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
                return deferred_rebuild
            return original_find(module, name)

        unpickler.find_class = find_class
        obj = unpickler.load()
        keys = _RestrictedUnpickler(f, path, None).load()
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(storages):
            raise CheckpointError(f"{path}: storage list does not match the tensors")
        for key in keys:
            storage = storages[key]
            (numel,) = struct.unpack("<q", f.read(8))
            raw = f.read(numel * storage.itemsize)
            if numel != storage.size or len(raw) != numel * storage.itemsize:
                raise CheckpointError(f"{path}: truncated storage {key}")
            storage[:] = np.frombuffer(raw, storage.dtype)
        for out, key, offset, view_size in views:
            out[:] = storages[key][offset : offset + view_size]
        tensors = {id(h): _rebuild_tensor(s, o, size, st) for h, s, o, size, st in deferred}
    return _replace_holders(obj, tensors)


def _replace_holders(obj: Any, tensors: dict[int, np.ndarray]) -> Any:
    if isinstance(obj, dict) and id(obj) in tensors:
        return tensors[id(obj)]
    if isinstance(obj, dict):
        return type(obj)((k, _replace_holders(v, tensors)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_replace_holders(v, tensors) for v in obj)
    return obj


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """{name: array} from a `.pth`/`.pt` state dict (either torch format) or `.safetensors`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"weight file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            return dict(load_file(path))
        if zipfile.is_zipfile(path):
            obj = _load_zip(path)
        else:
            with open(path, "rb") as f:
                if f.read(4) == b"PK\x03\x04":  # a zip whose directory (at the end) is cut off
                    raise CheckpointError(f"{path}: truncated or damaged zip archive")
            obj = _load_legacy(path)
    except CheckpointError:
        raise
    except Exception as e:  # A damaged file fails in many ways; all are the file's fault.
        raise CheckpointError(f"{path}: unreadable weight file ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return dict(obj)


def require(state_dict: dict[str, np.ndarray], name: str, shape: tuple, where: str) -> np.ndarray:
    """The named tensor with the expected shape, or a clear error naming the file."""
    if name not in state_dict:
        raise CheckpointError(f"{where}: missing tensor {name}")
    value = state_dict[name]
    if tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"{where}: {name} has shape {value.shape}, expected {shape}")
    return value
