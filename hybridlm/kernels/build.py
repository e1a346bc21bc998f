"""Build and load the CPU kernels in csrc/ (the selective scan, the causal conv, the decode step).

They are plain C++ behind an ``extern "C"`` interface, compiled on first use with the system C++
compiler (``$CXX``, else ``c++``/``g++``) into one shared library and loaded with ctypes: no torch
headers, no ninja, 2-4 s to build on 2 busy cores, where the scan's forward alone as an ATen
extension (``torch.utils.cpp_extension``) took 80 s. The library is cached under
``$TORCH_EXTENSIONS_DIR/hybridlm_kernels`` (default ``~/.cache/torch_extensions``), keyed by the
sources, the flags, the compiler and the CPU, so an edited source or another machine rebuilds.

``load()`` raises ``KernelUnavailable`` with the compiler's own message when the build or the load
fails; kernels/__init__.py logs it once and says so in ``report()``.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("selective_scan.cpp", "causal_conv1d.cpp", "decode.cpp", "elementwise.cpp", "flash_attn.cpp", "quant.cpp")
# -march=native: the vectors in csrc/simd.h become AVX-512 or AVX2 as the CPU allows. HYBRIDLM_KERNEL_MARCH
# builds for another target instead (e.g. x86-64-v2: no AVX, the portable paths an ARM or older CPU runs;
# tests/test_quant.py builds it to test those paths here)
MARCH = os.environ.get("HYBRIDLM_KERNEL_MARCH", "native")
FLAGS = ("-O3", f"-march={MARCH}", "-fopenmp", "-std=c++17", "-shared", "-fPIC")

_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
SIGNATURES = {  # argument types of each exported function (pointers, then sizes, then threads)
    "hybridlm_scan_fwd": [_P] * 9 + [_I64] + [_P] * 3 + [_INT] + [_I64] * 5 + [_INT],
    "hybridlm_scan_bwd": [_P] * 16 + [_I64] * 6 + [_INT],
    "hybridlm_conv_fwd": [_P, _I64] + [_P] * 4 + [_INT] + [_I64] * 4 + [_INT],
    "hybridlm_silu_mul": [_P, _P, _INT, _I64, _INT],
    "hybridlm_conv_bwd": [_P] * 8 + [_I64] * 4 + [_INT],
    "hybridlm_linear_step": [_P, _INT, _P, _P, _P] + [_I64] * 3 + [_INT],
    "hybridlm_mlp_step": [_P, _P, _INT, _P, _P, _P] + [_I64] * 3 + [_INT],
    "hybridlm_mamba_step": [_P, _P, _INT] + [_P] * 4 + [_P] * 7 + [ctypes.c_float] + [_P] * 3
                           + [_P, _INT, _P] + [_I64] * 6 + [_INT],
    "hybridlm_moe_step": [_P, _P, _INT, _P, _P, _P, _P, _P] + [_I64] * 5 + [_INT, _INT],
    "hybridlm_dequantize": [_P, _P, _INT, _I64, _I64, _INT],
    "hybridlm_quantize_act": [_P, _INT, _P, _INT, _I64, _I64, _INT],
    "hybridlm_rmsnorm": [_P, _P, _INT, _P, _INT, ctypes.c_float, _I64, _I64, _INT],
    "hybridlm_decode_rec_len": [],
    "hybridlm_has_flash_attn": [],
    "hybridlm_int_dot_path": [],
    "hybridlm_amx_tiles": [_INT],
    "hybridlm_flash_attn": [_P, _I64, _I64, _I64, _P, _P, _I64, _I64, _I64, _P, _P] + [_I64] * 8
                           + [ctypes.c_float, _INT],
    "hybridlm_mamba2_step": [_P, _P, _INT, _P, _P, _P, _P, _P, _P, _P, ctypes.c_float, ctypes.c_float, _P, _P, _P,
                             _I64, ctypes.c_float, _P, _INT, _P, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _INT],
    "hybridlm_decode_layers": [_P, _I64, _P, _P, _I64, _I64, _I64, _I64, _P, _I64, ctypes.c_float, _INT],
    "hybridlm_attn_step": [_P, _P, _INT, _P, _P, _INT, _P] + [_I64] * 7 + [ctypes.c_float, _INT],
}
RESTYPES = {"hybridlm_decode_rec_len": _I64, "hybridlm_has_flash_attn": _INT, "hybridlm_int_dot_path": _INT,
            "hybridlm_amx_tiles": _INT, "hybridlm_flash_attn": _INT}  # else void

_lib: ctypes.CDLL | None = None
info: dict = {}   # path, build_seconds (0: cached), compiler, isa: filled by load()


class KernelUnavailable(RuntimeError):
    """The C++ kernels could not be built or loaded; the message says why."""


def ptr(t) -> int | None:
    """A tensor's data pointer for a kernel argument (None: a null pointer). The caller keeps the
    tensor alive in a variable until the call returns."""
    return None if t is None else t.data_ptr()


def f32(t):
    """A contiguous fp32 copy of t, or t itself when it already is one (detached either way)."""
    return t.detach().to(torch.float32).contiguous()


def evenly_strided(t):
    """t [b, l, d] as the forward kernels take it: the last dimension contiguous and row r of batch entry i
    at (i * l + r) * t.stride(1) (e.g. a column slice of a wider [b, l, D]); else a contiguous copy."""
    return t if t.stride(2) == 1 and t.stride(0) == t.shape[1] * t.stride(1) else t.contiguous()


def threads_for(work: int) -> int:
    """OpenMP threads for a call doing ``work`` element updates: below ~64K a fork/join costs more
    than it saves; above, torch's intra-op thread count (``torch.set_num_threads``)."""
    return max(1, min(torch.get_num_threads(), work // 65536))


def _cpu_id() -> str:
    """What -march=native depends on: a library built for another CPU must not be reused."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_dir() -> Path:
    # torch.utils.cpp_extension's default root, without importing it (it pulls in setuptools)
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions")
    return Path(root) / "hybridlm_kernels"


def _compile(cxx: str, out: Path) -> float:
    out.parent.mkdir(parents=True, exist_ok=True)
    # compile to a private name, then rename: concurrent first uses never load a partial file
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    t0 = time.perf_counter()
    try:
        res = subprocess.run([cxx, *FLAGS, *(str(CSRC / s) for s in SOURCES), "-o", tmp],
                             capture_output=True, text=True)
    except OSError as e:
        os.unlink(tmp)
        raise KernelUnavailable(f"could not run the C++ compiler {cxx!r}: {e}") from e
    if res.returncode != 0:
        os.unlink(tmp)
        raise KernelUnavailable(f"compiling csrc/ with {cxx} failed:\n{res.stderr.strip()[-2000:]}")
    os.replace(tmp, out)
    return time.perf_counter() - t0


def load() -> ctypes.CDLL:
    """Build (once per sources/flags/compiler/CPU) and load the kernel library."""
    global _lib
    if _lib is not None:
        return _lib
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        raise KernelUnavailable("no C++ compiler found (install g++, or point CXX at one)")
    h = hashlib.sha256(" ".join([cxx, *FLAGS, _cpu_id()]).encode())
    for f in sorted(CSRC.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    out = build_dir() / f"kernels_{h.hexdigest()[:16]}.so"
    seconds = 0.0 if out.exists() else _compile(cxx, out)
    try:
        lib = ctypes.CDLL(str(out))
        for name, argtypes in SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, RESTYPES.get(name)
    except (OSError, AttributeError) as e:
        raise KernelUnavailable(f"loading {out} failed: {e}") from e
    flags = _cpu_id().split()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()
    if MARCH != "native":
        isa = f"-march={MARCH}"
    int_dot = ("portable C++", "AVX2 integer dot products (maddubs)", "AVX-VNNI integer dot products (vpdpbusd)",
               "AVX512-VNNI integer dot products (vpdpbusd; int4 times one row on 512-bit registers)"
               )[lib.hybridlm_int_dot_path()]
    bf16_rows = ("AMX tiles" if lib.hybridlm_amx_tiles(-1) else
                 "AVX512-BF16 dot products" if "avx512_bf16" in flags and MARCH == "native" else "widened to fp32")
    info.update(path=str(out), build_seconds=seconds, compiler=cxx, isa=isa, int_dot=int_dot, bf16_rows=bf16_rows)
    _lib = lib
    return lib
