"""A small reader/writer for the safetensors format, so torch stays the one core dependency.

Format (huggingface/safetensors): 8-byte little-endian header size N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the raw
little-endian tensor bytes. Reading maps the file and views each tensor in place (no copy until the
caller converts it), so a checkpoint never needs twice its size in memory. Nothing is unpickled.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
from pathlib import Path

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafeTensorsFile:
    """Lazy view of one .safetensors file: ``keys()``, ``shape(k)``, ``dtype(k)``, ``get(k)``, ``metadata``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path} is not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8:
                raise ValueError(f"{self.path} is not a safetensors file (header size {n} > file size)")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from None
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._entries = header
        self._base = 8 + n
        for k, e in header.items():
            if e["dtype"] not in _DTYPES:
                raise ValueError(f"{self.path}: tensor {k} has unsupported dtype {e['dtype']}")
            b, end = e["data_offsets"]
            numel = 1
            for s in e["shape"]:
                numel *= s
            if end - b != numel * _DTYPES[e["dtype"]].itemsize or self._base + end > size:
                raise ValueError(f"{self.path}: tensor {k} has inconsistent offsets (truncated file?)")

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, k: str) -> tuple[int, ...]:
        return tuple(self._entries[k]["shape"])

    def dtype(self, k: str) -> torch.dtype:
        return _DTYPES[self._entries[k]["dtype"]]

    def get(self, k: str) -> torch.Tensor:
        """A read-only view into the mapped file; ``.to(...)``/``.clone()`` it to own the memory."""
        e = self._entries[k]
        b, end = e["data_offsets"]
        dtype = _DTYPES[e["dtype"]]
        if end == b:
            return torch.empty(e["shape"], dtype=dtype)
        import warnings
        with warnings.catch_warnings():  # the mapping is read-only; we never write through the view
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(self._mm, dtype=dtype, count=(end - b) // dtype.itemsize, offset=self._base + b)
        return t.view(e["shape"])

    def release(self, k: str):
        """Tell the kernel the mapped pages of tensor ``k`` are no longer needed (after copying it), so
        loading a checkpoint does not also keep the whole file resident in this process."""
        if self._mm is None or not hasattr(self._mm, "madvise"):
            return
        b, end = self._entries[k]["data_offsets"]
        start = (self._base + b) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = self._base + end
        if stop > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, stop - start)


def save_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None):
    """Write ``tensors`` (contiguous, CPU) as one safetensors file, in name order."""
    items = dict(sorted(tensors.items()))
    save_file_streaming({k: (tuple(t.shape), t.dtype) for k, t in items.items()}, lambda k: [items[k]], path,
                        metadata)


def save_file_streaming(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], make, path: str | Path,
                        metadata: dict[str, str] | None = None):
    """Write one safetensors file without holding its tensors: the header comes from ``specs``
    (name -> (shape, dtype), in file order), then ``make(name)`` yields each tensor's data as row-major
    blocks (CPU tensors), written as they come. Peak memory: one block."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for k, (shape, dtype) in specs.items():
        if dtype not in _NAMES:
            raise ValueError(f"cannot save tensor {k} of dtype {dtype} in safetensors")
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[k] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k, (shape, dtype) in specs.items():
            written = 0
            for t in make(k):
                if t.dtype != dtype:
                    raise ValueError(f"tensor {k}: made {t.dtype}, its header says {dtype}")
                t = t.detach().to("cpu").contiguous()
                nbytes = t.numel() * t.element_size()
                if nbytes:
                    f.write((ctypes.c_char * nbytes).from_address(t.data_ptr()))
                written += nbytes
            b, end = header[k]["data_offsets"]
            if written != end - b:
                raise ValueError(f"tensor {k}: made {written} bytes, its shape {list(shape)} needs {end - b}")
        f.flush()
        os.fsync(f.fileno())
