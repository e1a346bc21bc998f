"""The inference cache: preallocated, one state per layer.

Attention layers own fixed K/V buffers ``[b, h_kv, s_max, d_h]`` written at positions (local-attention
layers keep only their window); Mamba layers own a conv window ``[b, d_in, k-1]`` and an SSM state
``[b, d_in, n]`` kept in fp32 whatever the weights' dtype. Nothing grows by concatenation.

``valid[b, s]`` marks which slots hold real tokens (False for left padding) and ``seen[b]`` counts the
real tokens of each row, which is the position the next token has (RoPE).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MambaState:
    conv: torch.Tensor  # [b, d_in, k-1], model dtype
    ssm: torch.Tensor   # [b, d_in, n], fp32


@dataclass
class KVState:
    k: torch.Tensor       # [b, h_kv, slots, d_h]
    v: torch.Tensor       # [b, h_kv, slots, d_h]
    window: int | None    # None: full attention, slots = s_max; else a ring of `window` slots


class Cache:
    """Per-layer states plus the write position. Build it with ``HybridLM.new_cache``."""

    def __init__(self, layers: list, batch: int, max_len: int, device, fingerprint: str = ""):
        self.layers = layers
        self.batch = batch
        self.max_len = max_len
        self.pos = 0                                                        # slots written so far
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)    # real tokens per row
        self.fingerprint = fingerprint

    @classmethod
    def allocate(cls, cfg, batch: int, max_len: int, dtype: torch.dtype, device="cpu", fingerprint: str = ""):
        layers = []
        for i in range(cfg.num_hidden_layers):
            kind = cfg.mixer(i)
            if kind == "mamba":
                layers.append(MambaState(
                    conv=torch.zeros(batch, cfg.d_inner, cfg.mamba_d_conv - 1, dtype=dtype, device=device),
                    ssm=torch.zeros(batch, cfg.d_inner, cfg.mamba_d_state, dtype=torch.float32, device=device)))
            else:
                window = cfg.sliding_window if kind == "local" else None
                slots = max_len if window is None else min(window, max_len)
                shape = (batch, cfg.num_key_value_heads, slots, cfg.head_size)
                layers.append(KVState(torch.zeros(shape, dtype=dtype, device=device),
                                      torch.zeros(shape, dtype=dtype, device=device), window))
        return cls(layers, batch, max_len, device, fingerprint)

    def advance(self, mask: torch.Tensor) -> torch.Tensor:
        """Reserve slots for l new tokens (mask: [b, l] bool); returns their positions [b, l] for RoPE."""
        l = mask.shape[1]
        if self.pos + l > self.max_len:
            raise ValueError(f"cache is full: {self.pos} + {l} tokens > max_len {self.max_len}; "
                             f"allocate a larger cache (max_len) or shorten the prompt")
        positions = self.seen[:, None] + mask.long().cumsum(1) - 1
        self.valid[:, self.pos:self.pos + l] = mask
        self.seen += mask.long().sum(1)
        self.pos += l
        return positions.clamp_min(0)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every state tensor by a stable name (used by snapshots and byte counts)."""
        out = {"valid": self.valid[:, :self.pos], "seen": self.seen}
        for i, s in enumerate(self.layers):
            if isinstance(s, MambaState):
                out[f"layers.{i}.conv"], out[f"layers.{i}.ssm"] = s.conv, s.ssm
            else:
                out[f"layers.{i}.k"], out[f"layers.{i}.v"] = s.k, s.v
        return out

    def nbytes(self) -> dict[str, int]:
        """Allocated bytes per component: attention K/V, Mamba conv, Mamba SSM."""
        kv = conv = ssm = 0
        for s in self.layers:
            if isinstance(s, MambaState):
                conv += s.conv.numel() * s.conv.element_size()
                ssm += s.ssm.numel() * s.ssm.element_size()
            else:
                kv += 2 * s.k.numel() * s.k.element_size()
        return {"kv": kv, "conv": conv, "ssm": ssm, "total": kv + conv + ssm}
