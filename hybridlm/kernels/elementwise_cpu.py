"""Fused elementwise ops of inference (csrc/elementwise.cpp): fp32 arithmetic, one rounding at the end."""
from __future__ import annotations

import torch

from . import build
from .build import ptr


def silu_mul_cpu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """silu(g) * u for same-shape contiguous fp32 or bf16 tensors, written into g (which is returned)."""
    build.load().hybridlm_silu_mul(ptr(g), ptr(u), int(g.dtype == torch.bfloat16), g.numel(),
                                   build.threads_for(g.numel()))
    return g
