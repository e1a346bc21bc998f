"""The Mamba-1 mixer as Jamba uses it (Lieber et al. 2024, sec. 2; Gu & Dao 2023, Alg. 2).

Glossary (mamba-minimal's letters):
    b       batch size                      l       sequence length (this call)
    d       hidden size (d_model)           d_in    inner width = expand * d       (E*D in the paper)
    n       state size (d_state)            k       conv kernel width (d_conv)
    r       dt_rank                         Δ / dt  per-token step size, softplus(dt_proj(...))
    A       [d_in, n] = -exp(A_log), input-independent decay rates
    B, C    [b, l, n] input-dependent state input/output matrices
    D       [d_in] skip connection

Jamba differs from Mamba-1 in one place: RMSNorms on dt, B and C right after ``x_proj``
(``dt_layernorm``, ``b_layernorm``, ``c_layernorm``), which stabilised training at scale.

One forward serves training, prefill and decode: with a ``MambaState`` the conv window and the SSM
state continue from it and are updated in place; without one they start from zero.
"""
from __future__ import annotations

import torch
from torch import nn

from .cache import MambaState
from .kernels import Linear, causal_conv1d, decode_kernels, mamba_step, selective_scan
from .norm import RMSNorm


class MambaMixer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, d_in, n, r, k = cfg.hidden_size, cfg.d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank, cfg.mamba_d_conv
        self.d_in, self.n, self.r, self.k = d_in, n, r, k
        self.in_proj = Linear(d, 2 * d_in, bias=cfg.mamba_proj_bias)
        # depthwise causal conv: the weight keeps upstream's [d_in, 1, k] shape
        self.conv1d = nn.Conv1d(d_in, d_in, k, groups=d_in, bias=cfg.mamba_conv_bias)
        self.x_proj = Linear(d_in, r + 2 * n, bias=False)
        self.dt_proj = Linear(r, d_in, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d_in, 1))
        self.D = nn.Parameter(torch.ones(d_in))
        self.out_proj = Linear(d_in, d, bias=cfg.mamba_proj_bias)
        self.dt_layernorm = RMSNorm(r, cfg.rms_norm_eps)
        self.b_layernorm = RMSNorm(n, cfg.rms_norm_eps)
        self.c_layernorm = RMSNorm(n, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, state: MambaState | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: [b, l, d]; mask: [b, l] bool, False at (left-)padding; returns [b, l, d].

        Padded positions are zeroed before the conv and before the scan, so they add nothing to
        the conv window or the SSM state: a left-padded row ends in the state it would have alone.
        """
        b, l, _ = x.shape
        # speculative decoding (Cache.checkpoint(trail=True)): record what a rollback by copy needs
        trail = state.trail if state is not None and state.trail is not None and state.trail.u is None else None
        if l == 1 and state is not None and mask is None and trail is None and \
                decode_kernels(x, self.in_proj, self.x_proj, self.dt_proj, self.out_proj):
            return mamba_step(self, x, state)                   # the same computation, fused (kernels/decode_cpu.py)
        xz = self.in_proj(x)                                    # [b, l, 2*d_in]
        u, z = xz.chunk(2, dim=-1)                              # [b, l, d_in] each
        if mask is not None:
            u = u * mask[..., None]
        if trail is not None:
            trail.u = u.detach()
        u = causal_conv1d(u, self.conv1d.weight[:, 0], self.conv1d.bias,
                          state.conv if state is not None else None)   # [b, l, d_in], SiLU applied
        if mask is not None:
            u = u * mask[..., None]
        dt, B, C = self.x_proj(u).split([self.r, self.n, self.n], dim=-1)  # [b,l,r] [b,l,n] [b,l,n]
        dt = self.dt_layernorm(dt)
        B = self.b_layernorm(B)
        C = self.c_layernorm(C)
        dt = self.dt_proj(dt, bias=False)                      # [b, l, d_in]; its bias goes in with the softplus
        A = -torch.exp(self.A_log.float())                      # [d_in, n]
        # delta = softplus(dt + bias) in fp32 (the reference kernel's delta_bias, delta_softplus), and the
        # output gate y * silu(z): both inside selective_scan, which fuses them where it can (kernels/)
        states = None if trail is None else torch.empty(b, l, self.d_in, self.n, dtype=torch.float32,
                                                           device=x.device)
        y, h = selective_scan(u, dt, A, B, C, self.D.float(), state.ssm if state is not None else None,
                              delta_bias=self.dt_proj.bias, z=z, states=states)   # y: [b, l, d_in] in z's dtype
        if trail is not None:
            trail.ssm, trail.last = states, h
        if state is not None:
            state.ssm.copy_(h)
        return self.out_proj(y.to(x.dtype))
