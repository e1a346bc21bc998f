"""The MLP (SwiGLU, or Nemotron-H's relu^2 without a gate) and Jamba's mixture of experts (with DeepSeek-V3's
sigmoid router as an option: ``router_scoring``).

Jamba's router: softmax over all experts in fp32, keep the top-k probabilities *without*
renormalising them (``router_renormalize`` turns renormalisation on), no capacity limit, so no token
is dropped. Tokens are dispatched grouped by expert: one matmul per expert over all of its tokens.
"""
from __future__ import annotations

import torch
from torch import nn

from .kernels import Linear, decode_kernels, mlp_step, moe_step, silu_mul


class MLP(nn.Module):
    """``act`` "silu": down(silu(gate(x)) * up(x)) (SwiGLU, Jamba); "relu2": down(relu(up(x))^2), no gate_proj
    (Nemotron-H's MLP, after So et al. 2021, "Primer")."""

    def __init__(self, d: int, d_ff: int, act: str = "silu"):
        super().__init__()
        self.gate_proj = Linear(d, d_ff, bias=False) if act == "silu" else None
        self.up_proj = Linear(d, d_ff, bias=False)
        self.down_proj = Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_proj is None:
            return self.down_proj(torch.relu(self.up_proj(x)).square())
        if decode_kernels(x, self.gate_proj, self.up_proj, self.down_proj):
            return mlp_step(self, x)                                  # a few rows: fused (kernels/decode_cpu.py)
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.router_renormalize
        self.router = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size or cfg.intermediate_size,
                                         cfg.mlp_hidden_act) for _ in range(cfg.num_experts))
        self.sigmoid = cfg.router_scoring == "sigmoid"
        if self.sigmoid:       # DeepSeek-V3's load-balancing bias: it steers the choice, not the weights
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts))
            self.n_group, self.topk_group, self.scale = cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor
        # the C++ decode step computes Jamba's softmax-routed SwiGLU experts only
        self.fused = cfg.mlp_hidden_act == "silu" and not self.sigmoid

    def route(self, x: torch.Tensor):
        """x: [t, d] -> router logits [t, e], top-k weights [t, k] (x's dtype), expert ids [t, k]."""
        logits = self.router(x)
        if self.sigmoid:
            return (logits, *self._route_sigmoid(logits.float(), x.dtype))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        w, idx = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            w = w / w.sum(-1, keepdim=True)
        return logits, w.to(x.dtype), idx

    def _route_sigmoid(self, logits: torch.Tensor, dtype: torch.dtype):
        """DeepSeek-V3's router (as Nemotron-H's MoE layers use it): experts chosen by sigmoid score +
        e_score_correction_bias, only among the topk_group groups whose two best experts score highest;
        weighted by the bare sigmoid scores. logits: [t, e] fp32 -> weights [t, k], expert ids [t, k]."""
        scores = torch.sigmoid(logits)
        choice = scores + self.e_score_correction_bias.float()
        if self.topk_group < self.n_group:
            t, e = choice.shape
            best2 = choice.view(t, self.n_group, e // self.n_group).topk(2, dim=-1).values.sum(-1)   # [t, groups]
            keep = torch.zeros_like(best2, dtype=torch.bool).scatter_(1, best2.topk(self.topk_group, -1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(e // self.n_group, dim=1), float("-inf"))
        idx = choice.topk(self.top_k, dim=-1).indices
        w = scores.gather(1, idx)
        if self.renormalize:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return (w * self.scale).to(dtype), idx

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [b, l, d] -> (out [b, l, d], router logits [b*l, e])."""
        if self.fused and decode_kernels(x, self.router, *(p for ex in self.experts
                                                          for p in (ex.gate_proj, ex.up_proj, ex.down_proj))):
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
