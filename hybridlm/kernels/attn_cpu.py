"""Causal attention of a prefill chunk over its keys (csrc/flash_attn.cpp): flash attention with both
products on AVX512-BF16 dot products, for bf16 tensors without gradients.

Shapes as Attention._sdpa uses them: q [b, h, l, d_h] (queries of slots start .. start+l-1), k, v
[b, h_kv, s, d_h] (keys of slots 0 .. s-1), valid [b, s] bool or None. A query sees key j when j is at
or before its slot and valid; one that sees none attends to itself (as the torch path does).
"""
from __future__ import annotations

import torch

from . import build
from .build import ptr

HEAD_SIZES = (16, 32, 64, 128)


def flash_attn_available() -> bool:
    """Whether this build has the kernel (the CPU has AVX512-BF16)."""
    return bool(build.load().hybridlm_has_flash_attn())


def flash_attn_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                   start: int) -> torch.Tensor:
    """[b, h, l, d_h] bf16, scaled by 1/sqrt(d_h) like SDPA."""
    b, h, l, dh = q.shape
    h_kv, s = k.shape[1], k.shape[2]
    if k.stride() != v.stride():
        v = v.contiguous()
        k = k.contiguous()
    for t in (q, k):
        if t.stride(-1) != 1:
            raise ValueError("flash_attn_cpu needs the head dimension contiguous")
    if valid is not None:
        valid = valid.to(torch.bool)
        if valid.stride(-1) != 1:
            valid = valid.contiguous()
    out = torch.empty(b, h, l, dh, dtype=q.dtype)
    rc = build.load().hybridlm_flash_attn(
        ptr(q), q.stride(0), q.stride(1), q.stride(2), ptr(k), ptr(v), k.stride(0), k.stride(1), k.stride(2),
        ptr(out), ptr(valid), 0 if valid is None else valid.stride(0), b, h, h_kv, l, s, dh, start,
        dh ** -0.5, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"flash_attn_cpu: kernel refused the call (code {rc}); check flash_attn_available() "
                           f"and HEAD_SIZES before calling")
    return out
