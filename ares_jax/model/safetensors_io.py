"""A small, dependency-light reader for ``*.safetensors`` files.

Why not ``safetensors.safe_open(framework="numpy")``: it refuses bfloat16, the dtype most
published checkpoints use, and torch is only a test dependency. The format is simple (an
8-byte little-endian header length, a JSON header, then raw little-endian tensor bytes), so we
memory-map the file and view each tensor as a numpy array (bfloat16 and float8 via
``ml_dtypes``). Everything is validated up front so that a truncated download fails with the
file's name before any tensor is converted.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from ares_jax.model.errors import CorruptFileError

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_HEADER_LEN_BYTES = 8
# A header is a few hundred bytes per tensor; anything near this is a corrupt length field.
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsFile:
    """One memory-mapped ``.safetensors`` file; ``get(name)`` returns a read-only view."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"safetensors file not found: {self.path}")
        size = self.path.stat().st_size
        with self.path.open("rb") as f:
            raw_len = f.read(_HEADER_LEN_BYTES)
            if len(raw_len) < _HEADER_LEN_BYTES:
                raise self._corrupt(f"only {size} bytes, too short for a safetensors header")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(size - _HEADER_LEN_BYTES, _MAX_HEADER_BYTES):
                raise self._corrupt(f"header claims {header_len} bytes but the file has {size}")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise self._corrupt(f"header is not valid JSON ({err})") from err
        if not isinstance(header, dict):
            raise self._corrupt("header is not a JSON object")
        header.pop("__metadata__", None)
        self._data_start = _HEADER_LEN_BYTES + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            self._entries[name] = self._validate(name, entry, size - self._data_start)
        self._map: np.memmap | None = None

    def _corrupt(self, why: str) -> CorruptFileError:
        return CorruptFileError(f"{self.path}: truncated or corrupt safetensors file: {why}")

    def _validate(self, name: str, entry: object, data_bytes: int):
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
        except (TypeError, KeyError, ValueError) as err:
            raise self._corrupt(f"malformed header entry for tensor {name!r}") from err
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise self._corrupt(f"tensor {name!r} has unknown dtype {dtype_name!r}; "
                                f"known: {sorted(_DTYPES)}")
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise self._corrupt(f"tensor {name!r}: byte range [{begin}, {end}) does not fit "
                                f"shape {shape} of {dtype_name}")
        if end > data_bytes:
            raise self._corrupt(f"tensor {name!r} needs {end} data bytes but only {data_bytes} "
                                "are present")
        return dtype, shape, begin, end

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def get(self, name: str) -> np.ndarray:
        dtype, shape, begin, end = self._entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        start = self._data_start + begin
        return self._map[start:self._data_start + end].view(dtype).reshape(shape)

    def close(self) -> None:
        # Views handed out keep the mapping alive until they are dropped; this only lets go of
        # our own reference.
        self._map = None
