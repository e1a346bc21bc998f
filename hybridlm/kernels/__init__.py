"""Kernel dispatch: one entry point per operation, a reference twin for each fast path.

    operation        CPU, l > 1 (prefill, training)       l == 1 (decode), any device     other devices, l > 1
    selective_scan   C++ kernel (scan_cpu.py)              fused torch ops (scan_cpu.py)   ref.py
    causal_conv1d    C++ kernel (conv_cpu.py)              fused torch ops (conv_cpu.py)   ref.py
    silu_mul         C++ kernel without gradients          torch ops                      torch ops
    RMSNorm          C++ kernel without gradients          C++ kernel without gradients   torch ops
    attention        C++ flash kernel without gradients,   decode kernels (below)         torch SDPA
                     bf16, AVX512-BF16 (else torch SDPA)

and for decoding (a few rows of one token, no gradients, fp32/bf16 activations, CPU: ``decode_kernels``),
whole layers fused into one C++ call each (decode_cpu.py): the Mamba mixer step, the SwiGLU MLP, the MoE
with its router, attention of one query over the cache, and matrix-vector products (``linear``), reading
fp32, bf16 or quantized int8/int4 weights (quant.py); elsewhere the modules' own torch ops, which are
their reference. Quantized layers with more rows dequantize their weight once per call (``dequantize``:
a C++ pass on CPU, else ``QuantLinear.dequantize_ref``) and multiply with torch.

Without gradients (inference) on CPU the scan and conv kernels read and write bf16 in place (no fp32
copies), and the scan also applies delta's bias + softplus and the silu(z) gate: one pass instead of
five over [b, l, d_in].

The backend is 'auto' (the table) or 'ref' (ref.py everywhere), from ``HYBRIDLM_SCAN=ref|auto`` at
import or ``set_backend(...)``; ``report()`` says which path runs and why. Nothing falls back
silently: the C++ kernels are built on first use (kernels/build.py), and if that fails the reason is
logged once as a warning and shown by ``report()``, and CPU prefill/training runs the reference.
"""
from __future__ import annotations

import logging
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn

from .. import allocator
from . import decode_cpu
from .attn_cpu import HEAD_SIZES, flash_attn_available, flash_attn_cpu
from .conv_cpu import causal_conv1d_cpu, causal_conv1d_infer, causal_conv1d_step
from .decode_cpu import attn_step, dequantize_cpu, linear_step, mamba2_step, mamba_step, mlp_step, moe_step
from .elementwise_cpu import rmsnorm_cpu, silu_mul_cpu
from .ref import causal_conv1d_ref, selective_scan_ref
from .scan_cpu import selective_scan_cpu, selective_scan_infer, selective_scan_step

log = logging.getLogger("hybridlm")

BACKENDS = ("auto", "ref")
_backend = "auto"
_cpu_error: str | None = None   # why the C++ kernels are unavailable (None: fine, or not tried yet)
_cpu_tried = False


def set_backend(name: str):
    """'auto' (fastest available) or 'ref' (the sequential reference everywhere)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; use 'auto' or 'ref' "
                         f"(set_backend or the HYBRIDLM_SCAN environment variable)")
    _backend = name


def _cpu_kernels() -> bool:
    """Build/load the C++ kernels once; log once which path runs and why."""
    global _cpu_tried, _cpu_error
    if not _cpu_tried:
        _cpu_tried = True
        from . import build
        try:
            build.load()
            took = build.info["build_seconds"]
            log.info("kernels: C++ CPU scan and conv from %s%s", build.info["path"],
                     f" (built in {took:.1f} s)" if took else "")
        except build.KernelUnavailable as e:
            _cpu_error = str(e)
            log.warning("kernels: the C++ CPU kernels are unavailable, so selective_scan and causal_conv1d run "
                        "the sequential reference on CPU (slow for long prompts and for training). %s", e)
    return _cpu_error is None


def report(cfg=None) -> dict:
    """Which implementation each operation uses now, and why (builds the C++ kernels if not yet built).
    With a model's ``cfg``: also whether its decode steps can take the whole-step C++ call."""
    out = _report()
    if cfg is not None:
        why = decode_cpu.jamba_layers(cfg)
        out["whole-step decode (this model)"] = ("available" if why is None and out["backend"] == "auto" and
                                                 _cpu_error is None else
                                                 f"declined: {why or 'backend or C++ kernels unavailable'}; "
                                                 "the layers decode one by one")
    return out


def _report() -> dict:
    if _backend == "ref":
        why = "forced by HYBRIDLM_SCAN=ref or set_backend('ref')"
        return {"backend": "ref", "selective_scan": f"ref: sequential reference ({why})",
                "causal_conv1d": f"ref: concat + torch conv1d ({why})", "silu_mul, rmsnorm": f"torch ops ({why})",
                "attention (prefill)": f"torch SDPA ({why})",
                "decode": f"torch ops ({why})", "quantized weights": f"torch dequantization + GEMM ({why})",
                "bf16 GEMMs (prefill)": f"torch bf16 ({why})"}
    if _cpu_kernels():
        from . import build
        took = build.info["build_seconds"]
        cpu = "C++ kernel"
        library = f"{build.info['path']} ({build.info['isa']}, {f'built in {took:.1f} s' if took else 'cached'})"
    else:
        cpu = "sequential reference (C++ kernels unavailable)"
        library = f"unavailable: {_cpu_error}"
    return {"backend": "auto",
            "selective_scan": f"CPU l>1: {cpu} (without gradients: bf16 in/out, softplus and gate fused); "
                              "l==1: fused torch ops; other devices l>1: sequential reference",
            "causal_conv1d": f"CPU l>1: {cpu} (without gradients: bf16 in/out); l==1: fused torch ops; "
                             "other devices l>1: torch conv1d reference",
            "silu_mul, rmsnorm": f"CPU without gradients: {cpu if _cpu_error is None else 'torch ops'}; "
                                 "otherwise torch ops",
            "attention (prefill)": "CPU without gradients, bf16, head size 16/32/64/128, full attention: "
                                   + ("C++ flash kernel (AVX512-BF16)" if _cpu_error is None and flash_attn_available()
                                      else "torch SDPA (this CPU or build has no AVX512-BF16 kernel)")
                                   + "; otherwise torch SDPA",
            "decode": f"CPU, <= {decode_cpu.MAX_ROWS} rows"
                      + (f" ({decode_cpu.AMX_ROWS} in bf16 on AMX tiles, verify chunks of {decode_cpu.AMX_PLAN_ROWS} rows x tokens)"
                         if _cpu_error is None and decode_cpu.row_limits(torch.bfloat16)[0] > decode_cpu.MAX_ROWS else "")
                      + ", fp32/bf16, no grad: "
                      f"{'one C++ call per step through all layers for Jamba- and Granite-4.0-H-style layers (Mamba-1, Mamba-2, attention without RoPE/window, the Granite multipliers, shared experts), speculative verify chunks of up to 8 rows x tokens included (Mamba-1 models), else fused C++ steps per layer (Mamba-1 and Mamba-2 mixers, MLP, MoE, attention over the cache, RMSNorm, linear), as for layers with a mixer or a feed-forward alone (Nemotron-H), relu2 MLPs or RoPE; bf16 weights times 2+ rows (verify chunks, batches): ' + build.info['bf16_rows'] if _cpu_error is None else 'torch ops (C++ kernels unavailable)'}; "
                      "otherwise torch ops",
            "quantized weights": (f"int8/int4 (tiles of 8 rows) times int8 activations in the C++ kernels "
                                  f"({build.info['isa']}: {build.info['int_dot']}), "
                                  + ("for prompts too (no fast bf16 GEMM here)" if not _FAST_BF16 else
                                     f"for up to {decode_cpu.QUANT_ROWS_AMX if _AMX else decode_cpu.QUANT_ROWS} rows "
                                     f"(by bits), longer prompts dequantized by a C++ pass for bf16 GEMMs"
                                     + (" (AMX)" if _AMX else "")) if _cpu_error is None else
                                  "torch dequantization + GEMM (C++ kernels unavailable)"),
            "bf16 GEMMs (prefill)": ("torch bf16" if _FAST_BF16 else
                                     "upcast to fp32 (this CPU has no AVX512-BF16/AMX: torch's bf16 GEMM is ~5x "
                                     "slower than fp32 here)"),
            "cpu_kernels": library, "openmp waits": openmp_waits(),
            "large tensors": allocator.state}


def openmp_waits() -> str:
    """How OpenMP threads wait at barriers in this process (see hybridlm/__init__.py)."""
    import hybridlm
    if hybridlm.openmp_spincount_set:
        return f"spin {hybridlm.OPENMP_SPINCOUNT} times, then sleep (set by hybridlm: robust beside busy processes)"
    chosen = {k: os.environ[k] for k in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY") if k in os.environ}
    if chosen:
        return "as the environment sets: " + ", ".join(f"{k}={v}" for k, v in chosen.items())
    return ("libgomp's default (spin ~300,000 times: torch was imported before hybridlm); on a shared machine "
            "start Python with GOMP_SPINCOUNT=1000 (benchmarks/contention.py)")


_FUSED_DTYPES = (torch.float32, torch.bfloat16)


def _fused_cpu(x, *tensors) -> bool:
    """Whether the inference kernels take a call on x and these tensors: auto backend, CPU, no gradient."""
    return (_backend == "auto" and x.device.type == "cpu" and _cpu_kernels()
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors))))


def selective_scan(u, delta, A, B, C, D, h0=None, delta_bias=None, z=None, states=None):
    """See kernels/ref.py for shapes. Returns (y [b, l, d_in] fp32, h_last [b, d_in, n] fp32).

    Mamba's neighbours of the scan, optional: ``delta_bias`` [d_in]: delta <- softplus(delta +
    delta_bias) in fp32 first; ``z`` [b, l, d_in]: y <- y * silu(z), returned in z's dtype.
    ``states`` [b, l, d_in, n] fp32, optional, receives the state before each token (speculative
    decoding's rollback by copy, cache.Cache.rollback; no gradient)."""
    if u.shape[1] > 1 and _fused_cpu(u, delta, A, B, C, D, h0, delta_bias, z):
        return selective_scan_infer(u, delta, A, B, C, D, h0, delta_bias, z, states)
    if delta_bias is not None:
        delta = F.softplus(delta.float() + delta_bias.float())
    if states is not None:         # the reference records them (the training kernel keeps only every 64th)
        y, h = selective_scan_ref(u, delta, A, B, C, D, h0, states=states)
    elif _backend == "auto" and u.shape[1] == 1:
        y, h = selective_scan_step(u, delta, A, B, C, D, h0)
    elif _backend == "auto" and u.device.type == "cpu" and _cpu_kernels():
        y, h = selective_scan_cpu(u, delta, A, B, C, D, h0)
    else:
        y, h = selective_scan_ref(u, delta, A, B, C, D, h0)
    if z is not None:
        y = (y * F.silu(z.float())).to(z.dtype)
    return y, h


def fused_rmsnorm(x, weight) -> bool:
    """Whether RMSNorm's forward runs as one C++ pass (elementwise_cpu.rmsnorm_cpu): CPU, no gradient,
    fp32/bf16 with a weight of x's dtype (or an fp32 x), any number of rows."""
    return (x.dtype in _FUSED_DTYPES and weight.dtype in _FUSED_DTYPES
            and (weight.dtype == x.dtype or x.dtype == torch.float32) and _fused_cpu(x, weight))


def fused_attention(q, k, v) -> bool:
    """Whether prefill attention (full, causal, keys at slots 0 .. s-1) runs the C++ flash kernel
    (attn_cpu.py): CPU, no gradient, bf16, head size 16/32/64/128, a CPU with AVX512-BF16."""
    return (q.dtype == k.dtype == v.dtype == torch.bfloat16 and q.shape[-1] in HEAD_SIZES
            and _fused_cpu(q, k, v) and flash_attn_available())


def silu_mul(g, u):
    """silu(g) * u (the SwiGLU MLP's gate); without gradients on CPU, one fused pass written into g."""
    if _fused_cpu(g, u) and g.dtype in _FUSED_DTYPES and u.dtype == g.dtype \
            and g.shape == u.shape and g.is_contiguous() and u.is_contiguous():
        return silu_mul_cpu(g, u)
    return F.silu(g) * u


def decode_kernels(x, *weights, max_rows: int = decode_cpu.MAX_ROWS) -> bool:
    """Whether the fused decode kernels take a call on ``x`` [..., d] with these weights (tensors, linear
    layers or QuantLinear layers), of at most ``max_rows`` rows."""
    return _backend == "auto" and decode_cpu.applies(x, *weights, max_rows=max_rows) and _cpu_kernels()


_plan_refused: set[str] = set()


def decode_plan(model, cache, input_ids, mask):
    """HybridLM.forward for a decode step through one C++ call for all layers (decode_cpu.plan_step), or
    None when it does not apply (then the layers run one by one, with the per-layer kernels above). A
    model the plan cannot describe (mixed weight dtypes, non-contiguous buffers) is logged once, with why."""
    if _backend != "auto" or not decode_cpu.plan_applies(model, cache, input_ids, mask) or not _cpu_kernels():
        return None
    try:
        return decode_cpu.plan_step(model, cache, input_ids)
    except ValueError as e:
        if str(e) not in _plan_refused:
            _plan_refused.add(str(e))
            log.warning("kernels: whole-step decode unavailable for this model, decoding layer by layer: %s", e)
        return None


def _fast_bf16(flags: set[str]) -> bool:
    """Whether torch's bf16 GEMM runs at full speed here: x86 CPUs with AVX512-BF16 or AMX, or not x86.
    Without them (AVX2-only CPUs such as AMD Zen 2/3) it emulates bf16 at ~1/5 of the fp32 rate (10 vs 46
    GFLOP/s measured on a 2-core Zen 3 for a 512 x 2560 x 10240 product, the upcast included)."""
    return "avx2" not in flags or "avx512_bf16" in flags or "amx_bf16" in flags


def _cpu_flags() -> set[str]:
    from .build import _cpu_id
    return set(_cpu_id().split())


_FLAGS = _cpu_flags()
_FAST_BF16 = _fast_bf16(_FLAGS)
_AMX = "amx_bf16" in _FLAGS        # torch's bf16 GEMMs run on AMX tiles (decode_cpu.quant_rows)


def gemm_dtype(x) -> torch.dtype:
    """The dtype inference GEMMs on ``x`` run in: x's, except bf16 on a CPU without fast bf16 GEMMs (fp32)."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not _FAST_BF16 and _backend == "auto":
        return torch.float32
    return x.dtype


def linear(x, weight, bias=None):
    """F.linear, computed by the decode kernel when ``decode_kernels`` says it takes the call; without
    gradients, bf16 on a CPU without fast bf16 GEMMs multiplies in fp32 (``gemm_dtype``: the products of
    bf16 values are exact in fp32, so only the summation order differs from torch's bf16 GEMM)."""
    if decode_kernels(x, weight):
        return linear_step(x, weight, bias)
    dtype = gemm_dtype(x)
    if dtype != x.dtype and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same product) whose forward goes through ``linear``, so a few rows take
    the decode kernel. ``bias=False`` in the call leaves the bias out (Mamba adds dt_proj's inside its
    softplus). quant.QuantLinear replaces it when a model is quantized."""

    def forward(self, x, bias: bool = True):
        return linear(x, self.weight, self.bias if bias else None)


_scratch = threading.local()


def dequantize(layer, dtype: torch.dtype, scratch: bool = False):
    """A quant.QuantLinear's weight [out, in] in ``dtype``: one C++ pass on CPU (fp32/bf16), else the
    layer's plain-torch reference.

    ``scratch=True`` (a prefill GEMM that uses the weight at once) writes into a buffer this thread reuses,
    valid until its next scratch call: a fresh 3B model's worth of bf16 weights per prompt chunk costs a
    page fault per 4 KiB (measured 1.8G weights/s dequantized into new tensors on 2 cores)."""
    w = layer.weight
    if _backend == "auto" and w.device.type == "cpu" and dtype in _FUSED_DTYPES and _cpu_kernels():
        out = None
        if scratch:
            n = layer.out_features * layer.in_features
            buf = getattr(_scratch, "buf", None)
            if buf is None or buf.dtype != dtype or buf.numel() < n:
                _scratch.buf = buf = torch.empty(n, dtype=dtype)
            out = buf[:n].view(layer.out_features, layer.in_features)
        return dequantize_cpu(layer, dtype, out)
    return layer.dequantize_ref().to(dtype)


def quantize_activations(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """quant.quantize_activations(x) in ``dtype``: one C++ pass on CPU (fp32/bf16), else the plain-torch reference."""
    if (_backend == "auto" and x.device.type == "cpu" and x.dtype in _FUSED_DTYPES and dtype in _FUSED_DTYPES
            and not (torch.is_grad_enabled() and x.requires_grad) and _cpu_kernels()):
        return decode_cpu.quantize_act_cpu(x, dtype)
    from ..quant import quantize_activations as ref
    return ref(x).to(dtype)


def causal_conv1d(x, weight, bias=None, state=None):
    """See kernels/ref.py: SiLU(depthwise causal conv) [b, l, d_in]; ``state`` is updated in place."""
    if x.shape[1] > 1 and _fused_cpu(x, weight, bias):
        return causal_conv1d_infer(x, weight, bias, state)
    if _backend == "auto":
        if x.shape[1] == 1:
            return causal_conv1d_step(x, weight, bias, state)
        if x.device.type == "cpu" and _cpu_kernels():
            return causal_conv1d_cpu(x, weight, bias, state)
    return causal_conv1d_ref(x, weight, bias, state)


set_backend(os.environ.get("HYBRIDLM_SCAN", "auto"))
