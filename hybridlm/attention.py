"""Grouped-query attention. Jamba uses no positional encoding (the Mamba layers carry position);
RoPE and sliding-window (local) attention are options for research layouts.

Glossary: b batch, l new tokens, s key slots, h query heads, h_kv key/value heads, d_h head size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVState
from .kernels import Linear, attn_step, decode_kernels, flash_attn_cpu, fused_attention

# queries per SDPA call when an explicit mask is needed: bounds the [b, 1, q, s] mask's memory
_Q_BLOCK_ELEMS = 1 << 25


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int | None = None) -> torch.Tensor:
    """Rotary embedding (Su et al. 2021), half-split convention. x: [b, h, l, d_h]; positions: [b, l].
    ``rotary_dim`` < d_h: only the first rotary_dim channels rotate, the rest pass through (partial RoPE,
    Bamba's, with the frequencies of a rotary_dim-wide head)."""
    if rotary_dim is not None and rotary_dim < x.shape[-1]:
        return torch.cat([rope(x[..., :rotary_dim], positions, theta), x[..., rotary_dim:]], dim=-1)
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)   # [d_h/2]
    ang = positions[:, None, :, None].float() * inv                                         # [b, 1, l, d_h/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg, window: int | None = None):
        super().__init__()
        self.h, self.h_kv, self.d_h = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        self.q_proj = Linear(cfg.hidden_size, self.h * self.d_h, bias=False)
        self.k_proj = Linear(cfg.hidden_size, self.h_kv * self.d_h, bias=False)
        self.v_proj = Linear(cfg.hidden_size, self.h_kv * self.d_h, bias=False)
        self.o_proj = Linear(self.h * self.d_h, cfg.hidden_size, bias=False)
        self.rope_theta = cfg.rope_theta
        self.rotary_dim = cfg.rotary_dim
        # a score scale other than 1/sqrt(d_h) (Granite's attention_multiplier) is folded into q
        self.q_scale = None if cfg.attention_multiplier is None else cfg.attention_multiplier * self.d_h ** 0.5
        self.window = window

    def forward(self, x: torch.Tensor, state: KVState | None = None, ctx=None) -> torch.Tensor:
        """x: [b, l, d]. ``ctx`` (a ``model.StepContext``) carries positions, validity and the cache position."""
        b, l, _ = x.shape
        # kernels.Linear: through the decode kernel for a few rows
        q = self.q_proj(x).view(b, l, self.h, self.d_h).transpose(1, 2)          # [b, h, l, d_h]
        k = self.k_proj(x).view(b, l, self.h_kv, self.d_h).transpose(1, 2)       # [b, h_kv, l, d_h]
        v = self.v_proj(x).view(b, l, self.h_kv, self.d_h).transpose(1, 2)
        if self.rope_theta is not None:
            q, k = (rope(t, ctx.positions, self.rope_theta, self.rotary_dim) for t in (q, k))
        if self.q_scale is not None:
            q = q * self.q_scale
        if l == 1 and state is not None and self.window is None and decode_kernels(x, state.k):
            # one new token, full attention: write its K/V, then one kernel call over the cache
            state.k[:, :, ctx.start] = k[:, :, 0]
            state.v[:, :, ctx.start] = v[:, :, 0]
            out = attn_step(q.transpose(1, 2).reshape(b, 1, self.h * self.d_h), state.k, state.v, ctx.valid,
                            ctx.start + 1, self.h)
            return self.o_proj(out)

        start = ctx.start                                 # slot of the first new token
        q_slots = torch.arange(start, start + l, device=x.device)
        if state is None:                                 # training / plain forward: keys are just these
            keys, vals, k_slots = k, v, q_slots
            k_valid = ctx.mask                            # [b, l] or None
        elif state.window is None:                        # full attention: write at positions
            state.k[:, :, start:start + l] = k
            state.v[:, :, start:start + l] = v
            keys, vals = state.k[:, :, :start + l], state.v[:, :, :start + l]
            k_slots = torch.arange(start + l, device=x.device)
            k_valid = ctx.valid[:, :start + l]
        else:                                             # local attention: a ring of `window` slots
            w = state.k.shape[2]
            ring_slots = start - w + torch.remainder(torch.arange(w, device=x.device) - (start - w), w)
            keys = torch.cat([state.k, k], dim=2)
            vals = torch.cat([state.v, v], dim=2)
            k_slots = torch.cat([ring_slots, q_slots])
            k_valid = ctx.valid[:, k_slots.clamp_min(0)] & (k_slots >= 0)
            keep = min(l, w)                              # the newest `keep` tokens go into the ring
            idx = torch.remainder(q_slots[l - keep:], w)
            state.k[:, :, idx] = k[:, :, l - keep:]
            state.v[:, :, idx] = v[:, :, l - keep:]

        out = self._sdpa(q, keys, vals, q_slots, k_slots, k_valid)              # [b, h, l, d_h]
        return self.o_proj(out.transpose(1, 2).reshape(b, l, self.h * self.d_h))

    def _sdpa(self, q, k, v, q_slots, k_slots, k_valid):
        if self.window is None and fused_attention(q, k, v):   # keys are slots 0 .. s-1 here
            return flash_attn_cpu(q, k, v, k_valid, int(q_slots[0]))        # inference on CPU (kernels/attn_cpu.py)
        gqa = self.h != self.h_kv
        plain_causal = (k_valid is None and self.window is None and k.shape[2] == q.shape[2])
        if plain_causal:                                  # the fast fused causal kernel, no mask tensor
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        b, l, s = q.shape[0], q.shape[2], k.shape[2]
        block = max(1, _Q_BLOCK_ELEMS // max(1, b * s))
        outs = []
        for i in range(0, l, block):                      # bounded mask memory for long chunked prefill
            qs = q_slots[i:i + block]
            allowed = k_slots[None, :] <= qs[:, None]                             # [q, s] causal
            if self.window is not None:
                allowed = allowed & (k_slots[None, :] > qs[:, None] - self.window)
            mask = allowed[None, None]                                             # [1, 1, q, s]
            if k_valid is not None:
                mask = mask & k_valid[:, None, None, :]                            # [b, 1, q, s]
            # a query with no visible key (a padded query) would give NaN; let it see itself
            if k_valid is not None:
                none = ~mask.any(-1, keepdim=True)
                mask = mask | (none & (k_slots[None, None, None, :] == qs[None, None, :, None]))
            outs.append(F.scaled_dot_product_attention(q[:, :, i:i + block], k, v, attn_mask=mask, enable_gqa=gqa))
        return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
