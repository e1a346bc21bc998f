"""A small reader/writer for the safetensors format, so torch stays the one core dependency.

Format (huggingface/safetensors): 8-byte little-endian header size N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the raw
little-endian tensor bytes. Reading maps the file and views each tensor in place (no copy until the
caller converts it), so a checkpoint never needs twice its size in memory. Nothing is unpickled.

Checkpoints come from the internet, so the reader refuses every file the official reader
(safetensors/src/tensor.rs, ``SafeTensors::read_metadata`` and ``Metadata::validate``) refuses, with a
ValueError naming the file: a header over 100 MB or past the end of the file, a header that is not
UTF-8 JSON (serde_json's grammar: no NaN, no lone surrogates, at most 127 levels of nesting), a
header that is not an object, ``__metadata__`` that is not a map of strings, an entry without dtype,
shape or data_offsets or with values of the wrong type, an unknown dtype, a shape whose element count
overflows 64 bits, offsets that do not hold dtype x shape bytes, and byte ranges that do not tile the
data exactly (negative, overlapping, gaps, trailing or missing bytes). It is stricter than the
official reader in three places, each a form no writer produces: a name given twice in one object (a
tensor name or a metadata key; the official reader keeps the last, other parsers the first), an entry
written as a JSON list instead of an object (serde's sequence form of a struct), and the 4/6-bit float
dtypes (F4, F6_*), which hybridlm has no use for.
"""
from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import re
import struct
from pathlib import Path

import torch

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
           "C64": torch.complex64}
# the official names of torch's 8-bit floats (safetensors/torch.py), where this torch has them
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                     ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        _DTYPES[_name] = getattr(torch, _attr)
_NAMES = {v: k for k, v in _DTYPES.items()}
_UNSUPPORTED = {"F4", "F6_E2M3", "F6_E3M2"}     # valid in the format, refused here (see the module docstring)

MAX_HEADER_BYTES = 100_000_000    # MAX_HEADER_SIZE of the official reader
_USIZE_END = 1 << 64              # shapes and offsets are Rust usize there: checked arithmetic, no wrap
_MAX_DEPTH = 127                  # serde_json's recursion limit of 128, as the official reader meets it
_FIELDS = ("dtype", "shape", "data_offsets")
_SURROGATE = re.compile(r"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")   # a \uD800-\uDFFF escape, maybe unpaired


class SafeTensorsFile:
    """Lazy view of one .safetensors file: ``keys()``, ``shape(k)``, ``dtype(k)``, ``get(k)``, ``metadata``.
    Opening it validates the whole header (see the module docstring) and raises ValueError naming the file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise self._invalid(f"shorter than the 8-byte header size ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise self._invalid(f"its header size {n} exceeds the format's limit of {MAX_HEADER_BYTES} bytes")
            if n > size - 8:
                raise self._invalid(f"its header size {n} exceeds the file ({size} bytes)")
            header = self._parse(f.read(n))
            self.metadata, self._entries = self._check(header, data_bytes=size - 8 - n)
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        self._base = 8 + n

    def _invalid(self, why: str) -> ValueError:
        return ValueError(f"{self.path} is not a valid safetensors file: {why}")

    def _parse(self, raw: bytes):
        """The header as the official reader's serde_json would read it, else ValueError."""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._invalid(f"its header is not UTF-8 ({e})") from None
        try:
            # _int only where a -0 may be (it costs a call per number); the other integers it refuses are
            # beyond 64 bits: refused in shapes and offsets by _is_usize, in extra fields by _check_json
            header = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant,
                                parse_float=_finite_float, parse_int=_int if "-0" in text else None)
        except RecursionError:
            raise self._invalid("its header nests deeper than 127 levels") from None
        except _Duplicate as e:
            raise self._invalid(str(e)) from None
        except ValueError as e:
            raise self._invalid(f"its header is not valid JSON ({e})") from None
        if _SURROGATE.search(text):   # rare: walk every string only then
            _check_json(header, self._invalid)
        if not isinstance(header, dict):
            raise self._invalid(f"its header is a JSON {type(header).__name__}, not an object")
        return header

    def _check(self, header: dict, data_bytes: int) -> tuple[dict[str, str], dict[str, dict]]:
        """(metadata, entries) once every entry is well typed and the byte ranges tile the data exactly."""
        metadata = header.pop("__metadata__", None)
        if metadata is None:
            metadata = {}
        elif not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._invalid("__metadata__ must be an object whose values are strings")
        for name, e in header.items():
            if not isinstance(e, dict):
                raise self._invalid(f"tensor {_shown(name)}: its entry is a JSON {type(e).__name__}, not an object "
                                    f"with {', '.join(_FIELDS)}")
            missing = [k for k in _FIELDS if k not in e]
            if missing:
                raise self._invalid(f"tensor {_shown(name)} has no {', '.join(missing)}")
            for k in e.keys() - set(_FIELDS):      # ignored, as the official reader ignores them, if valid
                _check_json(e[k], self._invalid, depth=3)
            dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
            if isinstance(dtype, str) and dtype in _UNSUPPORTED:
                raise self._invalid(f"tensor {_shown(name)} has dtype {dtype}, which hybridlm does not read")
            if not isinstance(dtype, str) or dtype not in _DTYPES:
                raise self._invalid(f"tensor {_shown(name)} has unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}")
            if not (isinstance(shape, list) and all(_is_usize(s) for s in shape)):
                raise self._invalid(f"tensor {_shown(name)}: shape {_short(shape)} is not a list of non-negative "
                                    f"integers")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_usize(o) for o in offsets)):
                raise self._invalid(f"tensor {_shown(name)}: data_offsets {_short(offsets)} is not two non-negative "
                                    f"integers [begin, end]")
            numel = 1
            for s in shape:        # left to right with an overflow check at each step, as the official reader
                numel *= s
                if numel >= _USIZE_END:
                    raise self._invalid(f"tensor {_shown(name)}: shape {_short(shape)} overflows 64-bit element counts")
            nbytes = numel * _DTYPES[dtype].itemsize
            if nbytes * 8 >= _USIZE_END:
                raise self._invalid(f"tensor {_shown(name)}: shape {_short(shape)} overflows 64-bit byte counts")
            if any(s >= 1 << 63 for s in shape):
                raise self._invalid(f"tensor {_shown(name)}: a dimension of shape {_short(shape)} does not fit "
                                    f"torch's int64")
            b, end = offsets
            if end - b != nbytes:
                raise self._invalid(f"tensor {_shown(name)}: data_offsets [{b}, {end}] hold {end - b} bytes, but dtype "
                                    f"{dtype} x shape {_short(shape)} needs {nbytes}")
        covered = 0
        for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
            b, end = e["data_offsets"]
            if b != covered:
                what = "overlaps the tensor before it" if b < covered else f"leaves a gap of {b - covered} bytes"
                raise self._invalid(f"tensor {_shown(name)}: data_offsets [{b}, {end}] {what}; tensors must tile the "
                                    f"data exactly")
            covered = end
        if covered != data_bytes:
            what = "the file is truncated" if covered > data_bytes else "trailing bytes follow the last tensor"
            raise self._invalid(f"the tensors cover {covered} bytes of data but the file holds {data_bytes} after "
                                f"its header ({what})")
        return metadata, header

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, k: str) -> tuple[int, ...]:
        return tuple(self._entries[k]["shape"])

    def dtype(self, k: str) -> torch.dtype:
        return _DTYPES[self._entries[k]["dtype"]]

    def get(self, k: str) -> torch.Tensor:
        """A read-only view into the mapped file; ``.to(...)``/``.clone()`` it to own the memory. A tensor
        whose data is not aligned to its element size in the file is copied instead."""
        e = self._entries[k]
        b, end = e["data_offsets"]
        dtype = _DTYPES[e["dtype"]]
        if end == b:     # a view, as torch.empty(shape) overflows its strides for shapes like [0, 2**40, 2**40]
            return torch.empty(0, dtype=dtype).view(e["shape"])
        import warnings
        with warnings.catch_warnings():  # the mapping is read-only; we never write through the view
            warnings.simplefilter("ignore", UserWarning)
            if (self._base + b) % dtype.itemsize == 0:
                t = torch.frombuffer(self._mm, dtype=dtype, count=(end - b) // dtype.itemsize, offset=self._base + b)
            else:
                t = torch.frombuffer(self._mm, dtype=torch.uint8, count=end - b, offset=self._base + b).clone()
                t = t.view(dtype)
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


class _Duplicate(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Duplicate(f"its header gives {_shown(dup)} twice in one object")
    return d


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"number {text[:20]} out of range")
    return x


def _int(text: str):
    """serde_json reads ``-0`` as a float and an integer beyond 64 bits as a float (out of range past
    f64): so do we, which keeps both out of shapes and offsets and refuses what it refuses."""
    if text == "-0":
        return -0.0
    n = int(text)
    if abs(n) >= _USIZE_END:
        try:
            float(n)
        except OverflowError:
            raise ValueError(f"number {text[:20]}... out of range") from None
    return n


def _is_usize(v) -> bool:
    return type(v) is int and 0 <= v < _USIZE_END


def _short(v) -> str:
    """A JSON value for a message, cut to 60 characters (a header may hold megabytes in one value)."""
    s = json.dumps(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _shown(name: str) -> str:
    s = repr(name)
    return s if len(s) <= 60 else s[:57] + "..."


def _check_json(value, invalid, depth: int = 1):
    """What serde_json refuses and Python's json accepts: nesting deeper than 127 and lone surrogates
    (a ``\\ud800`` escape), in ``value`` found at nesting level ``depth``; walked without recursion. Only
    the extra fields of an entry can nest deeper than 3 and still be valid, so the walk is cheap."""
    stack = [(value, depth)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > _MAX_DEPTH:
                raise invalid("its header nests deeper than 127 levels")
            items = v.items() if isinstance(v, dict) else ((None, x) for x in v)
            for k, x in items:
                if k is not None:
                    stack.append((k, depth))
                stack.append((x, depth + 1))
        elif type(v) is int and abs(v) >= _USIZE_END:
            try:
                float(v)
            except OverflowError:
                raise invalid(f"its header holds a number out of range ({str(v)[:20]}...)") from None
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise invalid("its header holds a lone UTF-16 surrogate escape") from None


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
    if metadata and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"safetensors metadata maps strings to strings; got {metadata}")
    if "__metadata__" in specs:
        raise ValueError("a tensor cannot be named __metadata__ in safetensors")
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
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"{path}: a header of {len(raw)} bytes exceeds the safetensors limit of {MAX_HEADER_BYTES}")
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
