"""Plain reference kernels: the oracle every faster kernel is tested against.

Shapes (see hybridlm/mamba.py for the glossary):
    u, delta   [b, l, d_in]   scan input and step size (delta already softplus'ed, fp32)
    A          [d_in, n]      negative decay rates (fp32)
    B, C       [b, l, n]
    D          [d_in]
    h0 / h     [b, d_in, n]   SSM state, fp32
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D, h0=None, states=None):
    """Sequential selective scan (Gu & Dao 2023, Alg. 2), one token at a time.

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t;   y_t = <h_t, C_t> + D * u_t
    Returns (y [b, l, d_in] fp32, h_last [b, d_in, n] fp32). Differentiable through autograd.
    ``states`` [b, l, d_in, n], optional, receives h_{t-1} for every t (the state before each token).
    """
    b, l, d_in = u.shape
    u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
    h = torch.zeros(b, d_in, A.shape[1], dtype=torch.float32, device=u.device) if h0 is None else h0.float()
    ys = []
    for t in range(l):
        if states is not None:
            states[:, t] = h
        dA = torch.exp(delta[:, t, :, None] * A)                       # [b, d_in, n]
        dBu = (delta[:, t, :, None] * B[:, t, None, :]) * u[:, t, :, None]
        h = dA * h + dBu
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else u.new_zeros(b, 0, d_in)
    return y + u * D, h


def causal_conv1d_ref(x, weight, bias=None, state=None):
    """Depthwise causal conv + SiLU.

    x: [b, l, d_in]; weight: [d_in, k]; bias: [d_in] or None; state: [b, d_in, k-1] (the last k-1 inputs
    before x, updated in place) or None (zeros before x). Returns [b, l, d_in].
    """
    b, l, d_in = x.shape
    k = weight.shape[1]
    xt = x.transpose(1, 2)                                                # [b, d_in, l]
    prev = state.to(x.dtype) if state is not None else x.new_zeros(b, d_in, k - 1)
    full = torch.cat([prev, xt], dim=-1)                                  # [b, d_in, k-1+l]
    if state is not None:
        state.copy_(full[:, :, full.shape[-1] - (k - 1):])
    out = F.conv1d(full, weight[:, None, :].to(x.dtype), None if bias is None else bias.to(x.dtype), groups=d_in)
    return F.silu(out).transpose(1, 2)                                    # [b, l, d_in]
