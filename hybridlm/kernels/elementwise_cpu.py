"""Fused elementwise ops of inference (csrc/elementwise.cpp): one pass each, fp32 arithmetic."""
from __future__ import annotations

import torch

from . import build
from .build import ptr


def silu_mul_cpu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for same-shape contiguous fp32 or bf16 tensors, written into g (which is returned)."""
    build.load().hybridlm_silu_mul(ptr(g), ptr(u), int(g.dtype == torch.bfloat16), g.numel(),
                                   build.threads_for(g.numel()))
    return g


def rmsnorm_cpu(norm, x: torch.Tensor) -> torch.Tensor:
    """norm.RMSNorm's forward in one pass per row, rounded where its torch ops round. x fp32 or bf16; the
    weight fp32 or bf16, bf16 only with a bf16 x or an fp32 one (output in x's dtype)."""
    x = x.contiguous()
    w = norm.weight
    out = torch.empty_like(x)
    d = x.shape[-1]
    build.load().hybridlm_rmsnorm(ptr(x), ptr(out), int(x.dtype == torch.bfloat16), ptr(w),
                                  int(w.dtype == torch.bfloat16), norm.eps, x.numel() // d, d,
                                  build.threads_for(x.numel()))
    return out
