"""The Mamba-2 mixer (SSD: Dao & Gu 2024, "Transformers are SSMs"), as Granite 4.0-H, Bamba and Nemotron-H use it.

Glossary (the paper's letters; mamba.py's where they agree):
    b       batch size                      l       tokens in this call
    d       hidden size (d_model)           d_in    inner width = h * p
    h       heads (n_heads)                 p       channels per head (head_dim)
    g       groups of B/C (n_groups)        n       state size (d_state)
    k       conv kernel width (d_conv)      Q       chunk length (chunk_size)
    dt      [b, l, h] per-token, per-head step size, softplus(dt + dt_bias) clamped to dt_limit
    A       [h] = -exp(A_log), one scalar decay rate per head (Mamba-1 has a [d_in, n] matrix)
    B, C    [b, l, g, n] input-dependent, each group shared by h / g heads
    D       [h] skip connection
    S       [b, h, p, n] the SSM state, fp32

The recurrence, per head (sec. 3 of the paper; Mamba-1's with a scalar A):
    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T        y_t = S_t C_t + D * x_t

Differences from Mamba-1 (mamba.py): one in_proj gives z, x, B, C and dt at once (no x_proj/dt_proj); the
causal conv runs over x, B and C together; the output is gated by a grouped RMSNorm of y * silu(z)
(``norm``, statistics over each of the g groups of d_in / g channels) before ``out_proj``.

Three scans compute the recurrence: ``ssd_scan_ref`` (token by token, the oracle), ``ssd_chunked`` (the SSD
algorithm, sec. 6: inside a chunk of Q tokens the recurrence is a masked matrix product, and only the
chunk-end states pass sequentially, in fp32; what prefill and training run) and ``ssd_step`` (one token
against the cached state, decode). One forward serves training, prefill and decode, as mamba.py's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import Mamba2State
from .kernels import Linear, causal_conv1d, decode_kernels, gemm_dtype, mamba2_step
from .norm import RMSNorm

# elements of one [b, chunks, h, Q, Q] block of the intra-chunk product: bounds prefill memory (a 256K-token
# prompt is processed a few chunks at a time, the state passed on between them)
_BLOCK_ELEMS = 1 << 24


def ssd_scan_ref(x, dt, A, B, C, S0=None):
    """Sequential reference, one token at a time (the oracle the other scans are tested against).

    x: [b, l, h, p]; dt: [b, l, h] (after softplus and clamp); A: [h] (negative); B, C: [b, l, g, n];
    S0: [b, h, p, n] or None (zeros). Returns (y [b, l, h, p] fp32 without the D skip, S [b, h, p, n] fp32).
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    x, dt, A = x.float(), dt.float(), A.float()
    B = B.float().repeat_interleave(h // g, dim=2)                       # [b, l, h, n]: head i uses group i // (h/g)
    C = C.float().repeat_interleave(h // g, dim=2)
    S = x.new_zeros(b, h, p, n) if S0 is None else S0.float()
    ys = []
    for t in range(l):
        decay = torch.exp(dt[:, t] * A)                                  # [b, h]
        S = decay[:, :, None, None] * S + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, C[:, t]))
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, h, p)
    return y, S


def ssd_step(x, dt, A, B, C, S):
    """One token against the state, S updated in place (decode). x: [b, h, p]; dt: [b, h]; B, C: [b, g, n];
    S: [b, h, p, n] fp32. Returns y [b, h, p] fp32 without the D skip."""
    b, h, p = x.shape
    g = B.shape[1]
    Bh = B.float().repeat_interleave(h // g, dim=1)                      # [b, h, n]
    Ch = C.float().repeat_interleave(h // g, dim=1)
    dt = dt.float()
    S.mul_(torch.exp(dt * A)[:, :, None, None])
    S.add_((dt[..., None] * x.float())[..., None] * Bh[:, :, None, :])  # dt x B^T: [b, h, p, n]
    return (S @ Ch[..., None])[..., 0]                                    # S C: [b, h, p]


def ssd_chunked(x, dt, A, B, C, chunk_size: int, S0=None, mm_dtype: torch.dtype = torch.float32):
    """The chunked SSD scan (Dao & Gu 2024, sec. 6, "SSD algorithm"); same contract as ``ssd_scan_ref``.

    Within a chunk, y = (L o C B^T) (dt x) with L[i, j] = exp(sum_{j<t<=i} dt_t A) the causal decay mask (the
    quadratic, attention-like form: matrix products); each chunk also leaves a state, and these are chained
    across chunks in fp32 (the recurrence at chunk granularity), then read by C at every position of the
    next chunk. fp32 throughout, except that the four matrix products take ``mm_dtype`` inputs (bf16 for a
    bf16 model where bf16 GEMMs are fast: ``kernels.gemm_dtype``) and return fp32; the decays, the masks
    and the chunk-to-chunk states stay fp32. Autograd differentiates it. Memory is bounded: at most
    ``_BLOCK_ELEMS`` elements of Q x Q masks exist at once (chunks are taken a block at a time)."""
    def mm(a, b):
        return a @ b if mm_dtype == torch.float32 else (a.to(mm_dtype) @ b.to(mm_dtype)).float()

    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    Q = max(1, min(chunk_size, l))
    pad = (-l) % Q
    # padding at the end is dt = 0, x = 0: decay 1 and no input, so the final state is untouched
    x, dt, B, C = (F.pad(t.float(), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    nc = (l + pad) // Q
    # [b, c, Q, ...] -> heads in (g, h/g) order, so B and C broadcast over the heads of their group
    x = x.view(b, nc, Q, g, h // g, p).permute(0, 1, 3, 4, 2, 5)          # [b, c, g, r, Q, p]
    dt = dt.view(b, nc, Q, g, h // g).permute(0, 1, 3, 4, 2)              # [b, c, g, r, Q]
    B = B.view(b, nc, Q, g, n).permute(0, 1, 3, 2, 4)[:, :, :, None]      # [b, c, g, 1, Q, n]
    C = C.view(b, nc, Q, g, n).permute(0, 1, 3, 2, 4)[:, :, :, None]
    a = dt * A.float().view(g, h // g, 1)                                  # log decay per token [b, c, g, r, Q]
    S = x.new_zeros(b, g, h // g, p, n) if S0 is None else S0.float().reshape(b, g, h // g, p, n)
    causal = torch.ones(Q, Q, dtype=torch.bool, device=x.device).tril()
    per_chunk = b * h * Q * Q
    step = max(1, _BLOCK_ELEMS // per_chunk)
    ys = []
    for c0 in range(0, nc, step):
        sl = slice(c0, min(nc, c0 + step))
        xs, dts, Bs, Cs, cum = x[:, sl], dt[:, sl], B[:, sl], C[:, sl], a[:, sl].cumsum(-1)   # cum: [b, c, g, r, Q]
        # 1. inside each chunk: L[i, j] = exp(cum_i - cum_j) for j <= i (masked before exp: no overflow)
        seg = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf"))
        M = mm(Cs, Bs.transpose(-1, -2)) * torch.exp(seg) * dts[..., None, :]     # [b, c, g, r, Q, Q]
        y = mm(M, xs)                                                               # [b, c, g, r, Q, p]
        # 2. the state each chunk leaves from its own tokens: sum_j exp(cum_end - cum_j) dt_j x_j B_j^T
        w = torch.exp(cum[..., -1:] - cum) * dts                                   # [b, c, g, r, Q]
        own = mm((xs * w[..., None]).transpose(-1, -2), Bs)                        # [b, c, g, r, p, n]
        # 3. chain the chunk states (fp32, sequential over chunks): the state entering each chunk
        total = torch.exp(cum[..., -1])                                            # [b, c, g, r] decay over a chunk
        entering = []
        for c in range(own.shape[1]):
            entering.append(S)
            S = total[:, c, :, :, None, None] * S + own[:, c]
        Sin = torch.stack(entering, dim=1)                                         # [b, c, g, r, p, n]
        # 4. what the entering state contributes at each position: exp(cum_i) C_i S
        y = y + torch.exp(cum)[..., None] * mm(Cs, Sin.transpose(-1, -2))          # [b, c, g, r, Q, p]
        ys.append(y)
    y = torch.cat(ys, dim=1).permute(0, 1, 4, 2, 3, 5).reshape(b, nc * Q, h, p)[:, :l]
    return y, S.reshape(b, h, p, n)


class GatedRMSNorm(RMSNorm):
    """RMSNorm of y * silu(z) (Mamba-2's ``norm_before_gate=False``), statistics over groups of ``group``
    channels, in fp32; returns fp32."""

    def __init__(self, dim: int, group: int, eps: float):
        super().__init__(dim, eps)
        self.group = group

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        u = y.float() * F.silu(z.float())
        shape = u.shape
        u = u.view(*shape[:-1], shape[-1] // self.group, self.group)                # [..., groups, group]
        u = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.float() * u.view(shape)


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, k = cfg.hidden_size, cfg.mamba_d_conv
        self.h, self.p, self.g, self.n = cfg.mamba2_n_heads, cfg.mamba2_head_dim, cfg.mamba2_n_groups, cfg.mamba2_d_state
        self.d_in, self.conv_dim, self.k = cfg.mamba2_d_inner, cfg.mamba2_conv_dim, k
        self.chunk_size = cfg.mamba2_chunk_size
        self.dt_limit = tuple(cfg.mamba2_dt_limit)
        # upstream names and order: in_proj -> [z | x B C | dt]
        self.in_proj = Linear(d, self.d_in + self.conv_dim + self.h, bias=cfg.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, k, groups=self.conv_dim, bias=cfg.mamba_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.h))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.h + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(self.h))
        self.norm = GatedRMSNorm(self.d_in, self.d_in // self.g if cfg.mamba2_norm_grouped else self.d_in,
                                 cfg.rms_norm_eps)
        self.out_proj = Linear(self.d_in, d, bias=cfg.mamba_proj_bias)

    def forward(self, x: torch.Tensor, state: Mamba2State | None = None,
                mask: torch.Tensor | None = None, scan=None) -> torch.Tensor:
        """x: [b, l, d]; mask: [b, l] bool, False at (left-)padding; returns [b, l, d]. ``scan``: the scan
        function for l > 1, called as ``scan(x, dt, A, B, C, S0)`` (default: ``ssd_chunked`` with the config's
        chunk size; tests pass ``ssd_scan_ref``).

        As in mamba.py, padded positions add nothing: x, B, C are zeroed before and after the conv, and dt
        is 0 there (decay 1, no input), so a left-padded row ends in the state it would have alone."""
        b, l, _ = x.shape
        if l == 1 and state is not None and mask is None and decode_kernels(x, self.in_proj, self.out_proj):
            return mamba2_step(self, x, state)                   # the same computation, fused (kernels/decode_cpu.py)
        z, xBC, dt = self.in_proj(x).split([self.d_in, self.conv_dim, self.h], dim=-1)  # [b,l,d_in] [b,l,conv] [b,l,h]
        if mask is not None:
            xBC = xBC * mask[..., None]
        xBC = causal_conv1d(xBC, self.conv1d.weight[:, 0], self.conv1d.bias,
                            state.conv if state is not None else None)                   # [b, l, conv_dim], SiLU applied
        if mask is not None:
            xBC = xBC * mask[..., None]
        xs, B, C = xBC.split([self.d_in, self.g * self.n, self.g * self.n], dim=-1)
        # dt_limit clamps in prefill and decode alike (transformers' and mamba_ssm's decode steps skip it;
        # with the (0, inf) limit of Granite and Bamba the two agree, as softplus is positive)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.dt_limit)          # [b, l, h] fp32
        if mask is not None:
            dt = dt * mask[..., None]
        A = -torch.exp(self.A_log.float())                                                # [h]
        xs = xs.view(b, l, self.h, self.p)                                                # [b, l, h, p]
        B = B.view(b, l, self.g, self.n)                                                  # [b, l, g, n]
        C = C.view(b, l, self.g, self.n)
        if l == 1 and state is not None:
            y = ssd_step(xs[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], state.ssm)[:, None]     # [b, 1, h, p]
        else:
            S0 = state.ssm if state is not None else None
            y, S = scan(xs, dt, A, B, C, S0) if scan is not None else \
                ssd_chunked(xs, dt, A, B, C, self.chunk_size, S0, gemm_dtype(x))         # [b, l, h, p], [b, h, p, n]
            if state is not None:
                state.ssm.copy_(S)
        y = y + xs.float() * self.D.float()[:, None]                                      # D skip
        y = self.norm(y.reshape(b, l, self.d_in), z)                                      # [b, l, d_in] fp32
        return self.out_proj(y.to(x.dtype))
