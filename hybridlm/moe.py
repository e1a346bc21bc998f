"""SwiGLU MLP and Jamba's mixture of experts.

Jamba's router: softmax over all experts in fp32, keep the top-k probabilities *without*
renormalising them (``router_renormalize`` turns renormalisation on), no capacity limit, so no token
is dropped. Tokens are dispatched grouped by expert: one matmul per expert over all of its tokens.
"""
from __future__ import annotations

import torch
from torch import nn

from .kernels import Linear, decode_kernels, mlp_step, moe_step, silu_mul


class MLP(nn.Module):
    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.gate_proj = Linear(d, d_ff, bias=False)
        self.up_proj = Linear(d, d_ff, bias=False)
        self.down_proj = Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if decode_kernels(x, self.gate_proj, self.up_proj, self.down_proj):
            return mlp_step(self, x)                                  # a few rows: fused (kernels/decode_cpu.py)
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.router_renormalize
        self.router = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.intermediate_size) for _ in range(cfg.num_experts))

    def route(self, x: torch.Tensor):
        """x: [t, d] -> router logits [t, e], top-k weights [t, k] (x's dtype), expert ids [t, k]."""
        logits = self.router(x)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            w = w / w.sum(-1, keepdim=True)
        return logits, w.to(x.dtype), idx

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [b, l, d] -> (out [b, l, d], router logits [b*l, e])."""
        if decode_kernels(x, self.router, *(p for ex in self.experts for p in (ex.gate_proj, ex.up_proj, ex.down_proj))):
            return moe_step(self, x)                                   # a few rows: fused (kernels/decode_cpu.py)
        shape = x.shape
        x = x.reshape(-1, shape[-1])                                   # [t, d]
        logits, w, idx = self.route(x)
        out = torch.zeros_like(x)
        if x.shape[0] == 1:
            # one token (batch-1 decode): call its k experts directly; the sort/bincount/index_add dispatch
            # below costs more than it saves at this size. Same expert order and same adds as below.
            for j, e in sorted(enumerate(idx[0].tolist()), key=lambda p: p[1]):
                out += self.experts[e](x) * w[:, j, None]
            return out.view(shape), logits
        flat = idx.flatten()                                           # [t*k] expert of each (token, slot)
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        token = order // self.top_k                                    # token of each sorted slot
        weight = w.flatten()[order]
        start = 0
        for e, n in enumerate(counts):                                 # one batched matmul per expert
            if n == 0:
                continue
            sel = token[start:start + n]
            y = self.experts[e](x[sel]) * weight[start:start + n, None]
            out.index_add_(0, sel, y)
            start += n
        return out.view(shape), logits


def load_balancing_loss(router_logits: list[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss (Fedus et al. 2021, eq. 4-6) pooled over all MoE layers, as
    transformers' Jamba computes it: E * sum_e (fraction of top-k slots routed to e) * (mean prob of e)."""
    probs = torch.cat([torch.softmax(g.float(), dim=-1) for g in router_logits])     # [rows, e]
    e = probs.shape[-1]
    chosen = torch.topk(probs, top_k, dim=-1).indices
    frac = torch.zeros(e, device=probs.device).index_add_(
        0, chosen.flatten(), torch.ones(chosen.numel(), device=probs.device)) / probs.shape[0]
    return e * (frac * probs.mean(0)).sum()
