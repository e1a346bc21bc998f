"""The fast CPU causal conv1d + SiLU (csrc/causal_conv1d.cpp) as an autograd Function, and the decode step.

Shapes as in kernels/ref.py: x [b, l, d_in], weight [d_in, k], bias [d_in] or None, state
[b, d_in, k-1] (the last k-1 inputs, updated in place) or None. Computed in fp32, returned in x's
dtype. The state is a cache buffer: no gradient flows into it.

The kernel works on x's own [b, l, d_in] layout (channels contiguous), fused with the SiLU; the
reference transposes to [b, d_in, l], concatenates the state and calls F.conv1d, which measured
5-10x slower (see kernels/bench.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import build
from .build import evenly_strided, f32, ptr


class CausalConv1dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, prev):
        lib = build.load()
        b, l, d = x.shape
        k = weight.shape[1]
        xf, wT = f32(x), f32(weight.t())                                 # wT: [k, d]
        bf = None if bias is None else f32(bias)
        # a copy even when prev is already fp32 and contiguous: the caller then updates the state in place
        prevf = torch.zeros(b, k - 1, d, dtype=torch.float32) if prev is None else \
            prev.detach().to(torch.float32, memory_format=torch.contiguous_format, copy=True)  # [b, k-1, d]
        out = torch.empty(b, l, d, dtype=torch.float32)
        threads = build.threads_for(b * l * d * k)
        lib.hybridlm_conv_fwd(ptr(xf), d, ptr(prevf), ptr(wT), ptr(bf), ptr(out), 0, b, l, d, k, threads)
        ctx.save_for_backward(xf, prevf, wT, bf)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, gout):
        lib = build.load()
        xf, prevf, wT, bf = ctx.saved_tensors
        b, l, d = xf.shape
        k = wT.shape[0]
        threads = build.threads_for(b * l * d * k)
        gf = f32(gout)   # held in a variable: the kernel gets a raw pointer, not a reference
        gx = torch.empty_like(xf)
        gw_part = torch.zeros(threads, k, d, dtype=torch.float32)   # weight/bias gradients sum over rows:
        gb_part = torch.zeros(threads, d, dtype=torch.float32)      # one partial per thread
        lib.hybridlm_conv_bwd(ptr(xf), ptr(prevf), ptr(wT), ptr(bf), ptr(gf), ptr(gx), ptr(gw_part),
                              ptr(gb_part), b, l, d, k, threads)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        gb = None if b_dtype is None else gb_part.sum(0).to(b_dtype)
        return gx.to(x_dtype), gw_part.sum(0).t().to(w_dtype), gb, None


def _update_state(state: torch.Tensor, x: torch.Tensor):
    """state [b, d, k-1] <- the last k-1 inputs of (state, x)."""
    l, keep = x.shape[1], state.shape[2]
    if l >= keep:
        state.copy_(x[:, l - keep:].transpose(1, 2))
    else:
        state.copy_(torch.cat([state[:, :, l:], x.transpose(1, 2).to(state.dtype)], dim=-1))


def causal_conv1d_cpu(x, weight, bias=None, state=None):
    """The C++ conv for CPU tensors (prefill and training). Returns SiLU(conv) [b, l, d_in] in x's dtype."""
    prev = None if state is None else state.detach().transpose(1, 2)      # [b, k-1, d_in]
    out = CausalConv1dFn.apply(x, weight, bias, prev)
    if state is not None:
        _update_state(state, x.detach())
    return out


def causal_conv1d_infer(x, weight, bias=None, state=None):
    """The C++ conv's forward alone (inference: no autograd). bf16 x is read in place, any row stride
    (e.g. a column slice of in_proj's output), and the output written in bf16: no fp32 copies."""
    lib = build.load()
    b, l, d = x.shape
    k = weight.shape[1]
    bf16 = x.dtype == torch.bfloat16
    xk = evenly_strided(x.detach() if bf16 else f32(x))
    wT, bf = f32(weight.t()), None if bias is None else f32(bias)
    prevf = torch.zeros(b, k - 1, d, dtype=torch.float32) if state is None else f32(state.transpose(1, 2))
    out = torch.empty(b, l, d, dtype=xk.dtype)
    lib.hybridlm_conv_fwd(ptr(xk), xk.stride(1), ptr(prevf), ptr(wT), ptr(bf), ptr(out), int(bf16), b, l, d, k,
                          build.threads_for(b * l * d * k))
    if state is not None:
        _update_state(state, x.detach())
    return out.to(x.dtype)


def causal_conv1d_step(x, weight, bias=None, state=None):
    """One token (l == 1), any device: the decode path, in fp32 like the kernel.

    A multiply-sum of the window with the weight, then the window shifts left in place by column
    copies (no concatenation, no new state tensor).
    """
    w = weight.float()                                                    # [d_in, k]
    x0 = x[:, 0].float()                                                  # [b, d_in]
    acc = x0 * w[:, -1] if bias is None else torch.addcmul(bias.float(), x0, w[:, -1])
    if state is not None and state.shape[2] > 0:
        acc = acc + (state.float() * w[:, :-1]).sum(-1)
        for j in range(state.shape[2] - 1):
            state[:, :, j].copy_(state[:, :, j + 1])
        state[:, :, -1].copy_(x0)
    return F.silu(acc)[:, None].to(x.dtype)                              # [b, 1, d_in]
