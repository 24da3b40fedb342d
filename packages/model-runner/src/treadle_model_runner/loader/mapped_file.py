"""A safetensors file mapped into memory: tensors that are views of the page cache, not copies.

Theory: a safetensors file is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
[begin, end) byte offsets into the data section) and the raw little-endian data. ``safe_open.get_tensor``
copies each tensor into fresh memory; the model then copies it again into its parameter. Mapping the file
copy-on-write (``MAP_PRIVATE``) and wrapping each byte range with ``torch.frombuffer`` makes the first copy
disappear: loading is one pass from the page cache into the parameters, and peak memory drops by a tensor.

Invariants: the header has already been validated by ``safe_open`` (offsets cover the file exactly);
the views are writable without touching the file (a write copies the page privately); a tensor whose
offset is not aligned to its element size, or whose dtype this table lacks, returns None so the caller
falls back to ``safe_open`` for it. The mapping lives as long as any view of it.
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from pathlib import Path
from typing import Any

import torch

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class MappedSafetensors:
    """Zero-copy tensor views into one safetensors file."""

    def __init__(self, file: Path) -> None:
        with open(file, "rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        (header_len,) = struct.unpack("<Q", self._map[:8])
        self._header: dict[str, Any] = json.loads(self._map[8 : 8 + header_len])
        self._base = 8 + header_len

    def get(self, name: str) -> torch.Tensor | None:
        """A view of tensor ``name``; None when it cannot be viewed in place (use safe_open then)."""
        info = self._header[name]
        dtype = _DTYPES.get(info["dtype"])
        begin, end = info["data_offsets"]
        if dtype is None or (self._base + begin) % dtype.itemsize or end == begin:
            return None
        with warnings.catch_warnings():  # the ACCESS_COPY map is writable; torch's check misreads it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(
                self._map, dtype=dtype, count=(end - begin) // dtype.itemsize, offset=self._base + begin
            )
        return flat.view(info["shape"])
