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

    def advance(self, l: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Reserve slots for l new tokens (mask: [b, l] bool, None: all real); returns their positions
        [b, l] for RoPE."""
        if self.pos + l > self.max_len:
            raise ValueError(f"cache is full: {self.pos} + {l} tokens > max_len {self.max_len}; "
                             f"allocate a larger cache (max_len) or shorten the prompt")
        if mask is None:
            positions = self.seen[:, None] + torch.arange(l, device=self.seen.device)
            self.valid[:, self.pos:self.pos + l] = True
            self.seen += l
        else:
            positions = (self.seen[:, None] + mask.long().cumsum(1) - 1).clamp_min(0)
            self.valid[:, self.pos:self.pos + l] = mask
            self.seen += mask.long().sum(1)
        self.pos += l
        return positions

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

    # ---- snapshots: save, fork, roll back -----------------------------------------------------
    def snapshot(self, logits: torch.Tensor | None = None) -> "Snapshot":
        """A copy of the state after ``pos`` tokens (attention buffers trimmed to ``pos``), plus the
        logits the state ended on, so generation can continue from it without re-reading anything."""
        tensors = {}
        for k, t in self.tensors().items():
            s = self.layers[int(k.split(".")[1])] if k.startswith("layers.") else None
            if isinstance(s, KVState) and s.window is None:
                t = t[:, :, :self.pos]
            tensors[k] = t.clone()
        if logits is not None:
            tensors["logits"] = logits.detach().clone()
        dtype = next(t.dtype for k, t in tensors.items() if k.endswith((".conv", ".k")))
        return Snapshot(tensors, {"format": SNAPSHOT_FORMAT, "fingerprint": self.fingerprint, "pos": str(self.pos),
                                  "batch": str(self.batch), "dtype": str(dtype).removeprefix("torch.")})

    def restore(self, snap: "Snapshot"):
        """Roll this cache back (or forward) to ``snap``, in place."""
        pos, batch = int(snap.meta["pos"]), int(snap.meta["batch"])
        if snap.meta.get("fingerprint") != self.fingerprint:
            raise ValueError("snapshot was taken from a different model (fingerprint "
                             f"{snap.meta.get('fingerprint')} != {self.fingerprint}); load it into the model "
                             f"that produced it")
        if batch != self.batch or pos > self.max_len:
            raise ValueError(f"snapshot holds batch {batch} x {pos} positions; this cache is batch {self.batch} "
                             f"x {self.max_len}")
        own = self.tensors()
        for k, t in snap.tensors.items():
            if k == "logits":
                continue
            if k == "valid":
                self.valid.zero_()
                self.valid[:, :pos] = t
            elif k == "seen":
                self.seen.copy_(t)
            elif own[k].shape == t.shape:
                own[k].copy_(t)
            else:  # a full-attention buffer saved trimmed to pos
                own[k][:, :, :pos].copy_(t)
        self.pos = pos


SNAPSHOT_FORMAT = "hybridlm-snapshot-1"


@dataclass
class Snapshot:
    """The whole inference state after a prompt: tensors by name plus a small string header."""
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]

    @property
    def logits(self) -> torch.Tensor | None:
        return self.tensors.get("logits")

    @property
    def pos(self) -> int:
        return int(self.meta["pos"])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def save(self, path):
        """Write as safetensors (atomically: a temporary name, then rename); the header is its metadata."""
        import os
        from pathlib import Path

        from .safetensors_io import save_file
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: t.contiguous() for k, t in self.tensors.items()}, tmp, metadata=self.meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path) -> "Snapshot":
        from .safetensors_io import SafeTensorsFile
        f = SafeTensorsFile(path)
        if f.metadata.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path} is not a hybridlm state snapshot (format {f.metadata.get('format')!r})")
        return cls({k: f.get(k).clone() for k in f.keys()}, dict(f.metadata))

    def check(self, model):
        """Refuse a snapshot of another model or dtype, saying which."""
        want_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        if self.meta["dtype"] != want_dtype:
            raise ValueError(f"snapshot state is {self.meta['dtype']} but the model runs in {want_dtype}; "
                             f"load the model with dtype={self.meta['dtype']}")
        if self.meta["fingerprint"] != model.fingerprint():
            raise ValueError("snapshot was taken from a different model (config or weights differ: fingerprint "
                             f"{self.meta['fingerprint']} != {model.fingerprint()})")

    def to_cache(self, model, max_len: int | None = None) -> "Cache":
        """A new cache holding this state (fork: call it as often as needed), room for ``max_len`` tokens."""
        self.check(model)
        cache = model.new_cache(int(self.meta["batch"]), max(max_len or 0, self.pos))
        cache.restore(self)
        return cache
