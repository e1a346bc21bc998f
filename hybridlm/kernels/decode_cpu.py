"""The fused decode kernels (csrc/decode.cpp): a whole Mamba mixer step, a SwiGLU MLP, a mixture of
experts with its router, attention of one query over the cache, an RMSNorm and a matrix-vector linear,
one C++ call each, for a few rows of one token.

A bench-88m decode step done op by op is ~70 small matmuls and ~2,500 other torch calls; at one
token their dispatch costs as much as the arithmetic, and torch's bf16 matrix-vector product reads
the lm_head at a third of the memory bandwidth. These kernels read each weight once per call,
compute in fp32 (rounding only the output to the model dtype) and split rows/channels over torch's
thread count. The op-by-op modules stay the reference; tests/test_kernels.py compares the two.

They take a call when ``applies``: CPU, fp32 or bf16 activations and weights (one dtype for the
weights of a call), at most MAX_ROWS rows, and no gradient wanted.
"""
from __future__ import annotations

import ctypes

import torch

from . import build
from .build import ptr

MAX_ROWS = 4   # rows per call; more rows reuse each weight enough for torch's matmul to win
_DTYPES = (torch.float32, torch.bfloat16)


def applies(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the decode kernels can compute ``x`` [..., d] with these weights (see module doc)."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.numel() > MAX_ROWS * x.shape[-1]:
        return False
    dtype = weights[0].dtype
    if dtype not in _DTYPES:
        return False
    grad = torch.is_grad_enabled() and x.requires_grad
    for w in weights:
        if w.dtype != dtype or not w.is_contiguous():
            return False
        grad = grad or (torch.is_grad_enabled() and w.requires_grad)
    return not grad


def _is16(t: torch.Tensor) -> int:
    return int(t.dtype == torch.bfloat16)


def _small_params(module: torch.nn.Module, sources: tuple, make) -> tuple:
    """fp32 contiguous tensors ``make(*sources)`` derived from a module's small parameters ``sources``,
    kept on the module and rebuilt when any source is replaced or updated in place (``_version``)."""
    key = tuple(None if p is None else (id(p), p.data_ptr(), p._version) for p in sources)
    hit = module.__dict__.get("_decode_params")
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, tuple(None if t is None else t.detach().float().contiguous() for t in make(*sources)))
        module.__dict__["_decode_params"] = hit
    return hit[1]


def rmsnorm_step(norm, x: torch.Tensor) -> torch.Tensor:
    """norm.RMSNorm's forward for a few rows, one call."""
    x = x.contiguous()
    w = norm.weight
    out = torch.empty_like(x)
    d = x.shape[-1]
    build.load().hybridlm_rmsnorm_step(ptr(x), ptr(out), _is16(x), ptr(w), _is16(w), norm.eps, x.numel() // d, d)
    return out


def linear_step(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a few rows: x [..., k] -> [..., o] in x's dtype."""
    x = x.contiguous()
    o, k = weight.shape
    out = torch.empty(*x.shape[:-1], o, dtype=x.dtype)
    bf = None if bias is None else bias.detach().float().contiguous()
    build.load().hybridlm_linear_step(ptr(x), _is16(x), ptr(weight), _is16(weight), ptr(bf), ptr(out),
                                      x.numel() // k, k, o, torch.get_num_threads())
    return out


def mlp_step(mlp, x: torch.Tensor) -> torch.Tensor:
    """moe.MLP's forward for a few rows: down(silu(gate(x)) * up(x)), x [..., d]."""
    x = x.contiguous()
    f, d = mlp.gate_proj.weight.shape
    out = torch.empty_like(x)
    build.load().hybridlm_mlp_step(ptr(x), ptr(out), _is16(x), ptr(mlp.gate_proj.weight), ptr(mlp.up_proj.weight),
                                   ptr(mlp.down_proj.weight), _is16(mlp.gate_proj.weight), x.numel() // d, d, f,
                                   torch.get_num_threads())
    return out


def _mamba_small(in_b, out_b, conv_w, conv_b, dt_ln, b_ln, c_ln, dt_b, A_log, D) -> tuple:
    return in_b, out_b, conv_w[:, 0], conv_b, dt_ln, b_ln, c_ln, dt_b, -torch.exp(A_log.float()), D


def mamba_step(m, x: torch.Tensor, state) -> torch.Tensor:
    """mamba.MambaMixer's forward for one token per row: x [b, 1, d] -> [b, 1, d]; ``state``
    (a cache.MambaState, contiguous) is updated in place."""
    conv, ssm = state.conv, state.ssm
    if not (conv.is_contiguous() and ssm.is_contiguous() and ssm.dtype == torch.float32 and conv.dtype in _DTYPES):
        raise ValueError("the decode kernels need a contiguous Mamba state (conv fp32/bf16, ssm fp32) as "
                         "HybridLM.new_cache allocates it")
    x = x.contiguous()
    b, _, d = x.shape
    out = torch.empty_like(x)
    sources = (m.in_proj.bias, m.out_proj.bias, m.conv1d.weight, m.conv1d.bias, m.dt_layernorm.weight,
               m.b_layernorm.weight, m.c_layernorm.weight, m.dt_proj.bias, m.A_log, m.D)
    in_b, out_b, conv_w, conv_b, dt_ln, b_ln, c_ln, dt_b, A, D = _small_params(m, sources, _mamba_small)
    w = m.in_proj.weight
    build.load().hybridlm_mamba_step(
        ptr(x), ptr(out), _is16(x), ptr(w), ptr(m.x_proj.weight), ptr(m.dt_proj.weight), ptr(m.out_proj.weight),
        _is16(w), ptr(in_b), ptr(out_b), ptr(conv_w), ptr(conv_b), ptr(dt_ln), ptr(b_ln), ptr(c_ln),
        m.dt_layernorm.eps, ptr(dt_b), ptr(A), ptr(D), ptr(conv), _is16(conv), ptr(ssm),
        b, d, m.d_in, m.n, m.r, m.k, torch.get_num_threads())
    return out


def attn_step(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, valid: torch.Tensor | None,
              slots: int, heads: int) -> torch.Tensor:
    """Attention of one query token per row over cache slots [0, slots): q [b, 1, heads * d_h] (the q_proj
    output; any RoPE applied), k_cache/v_cache [b, h_kv, s_max, d_h], valid [b, s_max] bool or None.
    Returns [b, 1, heads * d_h] in q's dtype, scaled by 1/sqrt(d_h) like SDPA."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == v_cache.dtype in _DTYPES):
        raise ValueError("the decode attention kernel needs contiguous fp32/bf16 K/V buffers as "
                         "HybridLM.new_cache allocates them")
    q = q.contiguous()
    b, h_kv, s_max, d_h = k_cache.shape
    out = torch.empty_like(q)
    if valid is not None and valid.stride(-1) != 1:
        valid = valid.contiguous()
    build.load().hybridlm_attn_step(ptr(q), ptr(out), _is16(q), ptr(k_cache), ptr(v_cache), _is16(k_cache),
                                    ptr(valid), 0 if valid is None else valid.stride(0), b, heads, h_kv, s_max,
                                    slots, d_h, d_h ** -0.5, torch.get_num_threads())
    return out


def _pointer_array(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))


def moe_step(moe, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """moe.MoE's forward for a few rows, router included: x [..., d] -> (out like x, router logits
    [rows, e] fp32)."""
    x = x.contiguous()
    d = x.shape[-1]
    rows, e = x.numel() // d, len(moe.experts)
    f = moe.experts[0].gate_proj.weight.shape[0]
    out = torch.empty_like(x)
    logits = torch.empty(rows, e, dtype=torch.float32)
    gate = _pointer_array([ex.gate_proj.weight for ex in moe.experts])
    up = _pointer_array([ex.up_proj.weight for ex in moe.experts])
    down = _pointer_array([ex.down_proj.weight for ex in moe.experts])
    build.load().hybridlm_moe_step(ptr(x), ptr(out), _is16(x), ptr(moe.router.weight), gate, up, down,
                                   _is16(moe.router.weight), ptr(logits), rows, d, f, e, moe.top_k,
                                   int(moe.renormalize), torch.get_num_threads())
    return out, logits
