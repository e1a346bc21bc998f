"""The fast CPU selective scan (csrc/selective_scan.cpp) as an autograd Function, and the decode step.

Shapes as in kernels/ref.py. u, B, C may be fp32 or bf16 (delta, A, D, h0 fp32); the kernel computes
in fp32 with an fp32 state, and gradients come back in each input's dtype.

The backward needs every h_{t-1}. Rather than keeping [b, l, d_in, n] states, the forward keeps one
state every CHECKPOINT_EVERY tokens and the backward recomputes a chunk at a time from them.
"""
from __future__ import annotations

import torch

from . import build
from .build import evenly_strided, f32, ptr

CHECKPOINT_EVERY = 64   # K; 32 and 128 measured slower
MAX_GROUP = 8           # channel blocks per backward work item (sums B/C gradients over 128 channels)
BLOCK = 16              # channels per block (W in csrc/simd.h)


class SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, h0):
        lib = build.load()
        b, l, d_in = u.shape
        n = A.shape[1]
        uf, df, Af, Bf, Cf, Df = (f32(t) for t in (u, delta, A, B, C, D))
        h0f = None if h0 is None else f32(h0)
        y = torch.empty(b, l, d_in, dtype=torch.float32)
        h_last = torch.empty(b, d_in, n, dtype=torch.float32)
        K = CHECKPOINT_EVERY
        ckpt = torch.empty(b, -(-l // K), d_in, n, dtype=torch.float32) if any(ctx.needs_input_grad) else None
        lib.hybridlm_scan_fwd(ptr(uf), ptr(df), ptr(Af), ptr(Bf), ptr(Cf), ptr(Df), ptr(h0f), None, None, 0,
                              ptr(y), ptr(h_last), ptr(ckpt), 0, b, l, d_in, n, K, build.threads_for(b * l * d_in * n))
        if ckpt is not None:
            ctx.save_for_backward(uf, df, Af, Bf, Cf, Df, ckpt)
            ctx.dtypes = tuple(None if t is None else t.dtype for t in (u, delta, A, B, C, D, h0))
        return y, h_last

    @staticmethod
    def backward(ctx, gy, gh_last):
        lib = build.load()
        uf, df, Af, Bf, Cf, Df, ckpt = ctx.saved_tensors
        b, l, d_in = uf.shape
        n = Af.shape[1]
        threads = build.threads_for(b * l * d_in * n)
        n_blocks = -(-d_in // BLOCK)
        group = max(1, min(MAX_GROUP, n_blocks // threads))   # at least one work item per thread
        # held in variables: the kernel gets raw pointers, and a temporary would be freed before the call
        gyf, ghf = f32(gy), None if gh_last is None else f32(gh_last)
        gu, gdelta = torch.empty_like(uf), torch.empty_like(uf)
        gA, gD = torch.empty_like(Af), torch.empty_like(Df)
        # the B and C gradients sum over channels, which several threads hold: one partial per thread
        gB_part = torch.zeros(threads, b, l, n, dtype=torch.float32)
        gC_part = torch.zeros(threads, b, l, n, dtype=torch.float32)
        gh0 = torch.empty(b, d_in, n, dtype=torch.float32) if ctx.dtypes[6] is not None else None
        lib.hybridlm_scan_bwd(ptr(uf), ptr(df), ptr(Af), ptr(Bf), ptr(Cf), ptr(Df), ptr(ckpt), ptr(gyf), ptr(ghf),
                              ptr(gu), ptr(gdelta), ptr(gA), ptr(gB_part), ptr(gC_part), ptr(gD), ptr(gh0),
                              b, l, d_in, n, CHECKPOINT_EVERY, group, threads)
        grads = (gu, gdelta, gA, gB_part.sum(0), gC_part.sum(0), gD, gh0)
        return tuple(None if g is None else g.to(dt) for g, dt in zip(grads, ctx.dtypes))


def selective_scan_cpu(u, delta, A, B, C, D, h0=None):
    """The C++ scan for CPU tensors. Returns (y [b, l, d_in] fp32, h_last [b, d_in, n] fp32)."""
    return SelectiveScanFn.apply(u, delta, A, B, C, D, h0)


def selective_scan_infer(u, delta, A, B, C, D, h0=None, delta_bias=None, z=None, states=None):
    """The C++ scan's forward alone (inference: no autograd), with Mamba's two neighbours fused in:
    ``delta_bias`` [d_in]: delta <- softplus(delta + delta_bias) first; ``z`` [b, l, d_in] (any row
    stride): y <- y * silu(z), returned in z's dtype. When u, delta, B, C and z are all bf16 the kernel
    reads and writes bf16 (fp32 arithmetic), so no fp32 copies are made. Returns (y, h_last fp32).
    ``states`` (optional, contiguous fp32 [b, l, d_in, n]) receives the state before every token: the
    kernel's backward checkpoints, taken at every step."""
    lib = build.load()
    b, l, d_in = u.shape
    n = A.shape[1]
    io = (u, delta, B, C) + ((z,) if z is not None else ())
    bf16 = z is not None and all(t.dtype == torch.bfloat16 for t in io)
    if bf16:
        u, delta, B, C = (t.contiguous() for t in (u, delta, B, C))
    else:
        u, delta, B, C = (f32(t) for t in (u, delta, B, C))
    zk = None if z is None else evenly_strided(z if bf16 else f32(z))
    Af, Df = f32(A), f32(D)
    bias = None if delta_bias is None else f32(delta_bias)
    h0f = None if h0 is None else f32(h0)
    y = torch.empty(b, l, d_in, dtype=u.dtype)
    h_last = torch.empty(b, d_in, n, dtype=torch.float32)
    lib.hybridlm_scan_fwd(ptr(u), ptr(delta), ptr(Af), ptr(B), ptr(C), ptr(Df), ptr(h0f), ptr(bias), ptr(zk),
                          0 if zk is None else zk.stride(1), ptr(y), ptr(h_last), ptr(states), int(bf16), b, l, d_in,
                          n, CHECKPOINT_EVERY if states is None else 1, build.threads_for(b * l * d_in * n))
    return (y if z is None else y.to(z.dtype)), h_last


def selective_scan_step(u, delta, A, B, C, D, h0=None):
    """One token (l == 1), any device: the decode path, a handful of fused tensor ops in fp32.

    The same recurrence as kernels/ref.py for a single step, without the per-token loop's overhead.
    """
    u0, d0 = u[:, 0].float(), delta[:, 0].float()                       # [b, d_in]
    dA = torch.exp(d0[:, :, None] * A)                                   # [b, d_in, n]
    dBu = (d0 * u0)[:, :, None] * B[:, 0, None, :].float()               # [b, d_in, n]
    h = dBu if h0 is None else torch.addcmul(dBu, dA, h0.float())
    y = torch.bmm(h, C[:, 0, :, None].float())[:, None, :, 0]            # [b, 1, d_in]
    return torch.addcmul(y, u0[:, None], D), h
