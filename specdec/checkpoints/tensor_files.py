"""Tensor files read lazily and shape-first, without torch: `.safetensors` and torch `.bin` / `.pt`.

`read_tensors(path)` returns a `Tensors`: every tensor's shape from the file's header, and `get(name)` to read
one tensor's data as numpy on demand, so a caller checks names and shapes before any data is read.
Safetensors files are memory-mapped. Torch's zip format (torch >= 1.6) is parsed with a restricted
unpickler that accepts only tensors, dicts and plain values: any other global in the pickle is refused,
so nothing in the file runs. Only the pre-1.6 legacy torch format needs torch (`torch.load` with
`weights_only=True`). Unreadable files raise a `DrafterCheckpointError` naming the file and the fix.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import pickle
import zipfile

import ml_dtypes
import numpy as np

from specdec.checkpoints.common import DrafterCheckpointError

__all__ = ["Tensors", "read_tensors"]


class Tensors:
    """Named tensors of one file: `shapes` from the header, `get(name)` reads the data (numpy)."""

    def __init__(self, path: pathlib.Path, shapes: dict[str, tuple[int, ...]], getter):
        self.path, self.shapes, self._get = path, shapes, getter

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def get(self, name: str) -> np.ndarray:
        return self._get(name)

    def renamed(self, mapping: dict[str, str]) -> Tensors:
        """A view with keys renamed (new name -> old name)."""
        return Tensors(
            self.path, {k: self.shapes[v] for k, v in mapping.items()}, lambda k: self._get(mapping[k])
        )


_ST_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _read_safetensors(path: pathlib.Path) -> Tensors:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:  # validates the header and the data extent
            f.keys()
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
    except Exception as e:  # SafetensorError is a bare Exception subclass
        raise DrafterCheckpointError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
            "it is truncated or corrupt: re-download it"
        ) from None
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if header else None

    def get(name):
        info = header[name]
        if info["dtype"] not in _ST_DTYPES:
            raise DrafterCheckpointError(
                f"{path}: tensor {name!r} has dtype {info['dtype']}, which specdec "
                f"does not read ({sorted(_ST_DTYPES)})"
            )
        lo, hi = info["data_offsets"]
        return np.array(data[lo:hi].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"]))

    return Tensors(path, {k: tuple(v["shape"]) for k, v in header.items()}, get)


_TORCH_STORAGES = {
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


class _TensorRef:
    def __init__(self, storage, offset, size, stride, *_):
        self.key, self.dtype = storage
        self.offset, self.shape, self.stride = int(offset), tuple(size), tuple(stride)


def _rebuild_parameter(data, *_):
    return data


class _Unpickler(pickle.Unpickler):
    """Tensors, dicts and plain values only: any other global in the pickle is refused."""

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _TensorRef
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_STORAGES:
            return _StorageType(_TORCH_STORAGES[name])
        raise pickle.UnpicklingError(f"unsupported object {module}.{name} (a state dict holds only tensors)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        return (str(pid[2]), pid[1].dtype)


def _read_torch(path: pathlib.Path) -> Tensors:
    if not zipfile.is_zipfile(path):
        return _read_torch_legacy(path)
    try:
        zf = zipfile.ZipFile(path)
        pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise ValueError("no data.pkl in the archive")
        prefix = pkl[0][: -len("data.pkl")]
        order = zf.read(prefix + "byteorder").decode() if prefix + "byteorder" in zf.namelist() else "little"
        if order != "little":
            raise ValueError(f"byte order {order!r}")
        import io

        obj = _Unpickler(io.BytesIO(zf.read(pkl[0]))).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, KeyError, EOFError, TypeError) as e:
        raise DrafterCheckpointError(
            f"{path}: not a readable torch state dict ({type(e).__name__}: {e}); "
            "re-download it or save it as .safetensors"
        ) from None
    if isinstance(obj, dict) and not any(isinstance(v, _TensorRef) for v in obj.values()):
        obj = obj.get("state_dict", obj.get("model", obj))  # a wrapped state dict
    if not isinstance(obj, dict):
        raise DrafterCheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    refs = {str(k): v for k, v in obj.items() if isinstance(v, _TensorRef)}
    storages: dict[str, np.ndarray] = {}

    def get(name):
        r = refs[name]
        if r.key not in storages:
            storages[r.key] = np.frombuffer(zf.read(f"{prefix}data/{r.key}"), r.dtype)
        buf = storages[r.key]
        if not r.shape:
            return np.array(buf[r.offset])
        item = buf.itemsize
        view = np.lib.stride_tricks.as_strided(buf[r.offset :], r.shape, [s * item for s in r.stride])
        return np.array(view)

    return Tensors(path, {k: v.shape for k, v in refs.items()}, get)


def _read_torch_legacy(path: pathlib.Path) -> Tensors:
    try:
        import torch
    except ImportError:
        raise DrafterCheckpointError(
            f"{path} is in torch's legacy (pre-1.6) format, which needs torch to read: "
            "install torch, or convert the file to .safetensors"
        ) from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DrafterCheckpointError(
            f"{path}: not a readable torch state dict ({type(e).__name__}: {e})"
        ) from None
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    to_np = lambda t: t.float().numpy().astype(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()
    return Tensors(path, {k: tuple(v.shape) for k, v in sd.items()}, lambda k: to_np(sd[k]))


def read_tensors(path: os.PathLike) -> Tensors:
    """Lazy tensors of a `.safetensors` file or a torch `.bin` / `.pt` state dict."""
    path = pathlib.Path(path)
    return _read_safetensors(path) if path.suffix == ".safetensors" else _read_torch(path)
