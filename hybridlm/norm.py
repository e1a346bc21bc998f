"""RMSNorm as Jamba computes it: statistics in fp32, cast back to the input dtype, then times weight."""
import torch
from torch import nn

from .kernels import fused_rmsnorm, rmsnorm_cpu


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_rmsnorm(x, self.weight):
            return rmsnorm_cpu(self, x)               # inference on CPU: one C++ pass (kernels/elementwise_cpu.py)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
