"""The inference cache: preallocated, one state per layer.

Attention layers own fixed K/V buffers ``[b, h_kv, s_max, d_h]`` written at positions (local-attention
layers keep only their window); Mamba layers own a conv window ``[b, d_in, k-1]`` and an SSM state
``[b, d_in, n]`` kept in fp32 whatever the weights' dtype; Mamba-2 layers a conv window over x, B, C and an
SSM state ``[b, n_heads, head_dim, d_state]`` in fp32. Nothing grows by concatenation.

Feed-forward-only layers (``f``/``F``, Nemotron-H's MLP layers) hold no state: their entry is None.

``valid[b, s]`` marks which slots hold real tokens (False for left padding, and for the holes speculative
decoding leaves when rows keep different numbers of a verify chunk's tokens: ``Cache.rollback``) and
``seen[b]`` counts the real tokens of each row, which is the position the next token has (RoPE). All rows
share one write position ``pos``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MambaState:
    conv: torch.Tensor  # [b, d_in, k-1], model dtype
    ssm: torch.Tensor   # [b, d_in, n], fp32
    trail: "MambaTrail | None" = None   # set by Cache.checkpoint(trail=True): the next forward records into it


class Mamba2State(MambaState):
    """A Mamba-2 (SSD) layer's state (mamba2.py): conv [b, conv_dim, k-1] over x, B and C side by side (model
    dtype), ssm [b, n_heads, head_dim, d_state] fp32. A MambaState, so snapshots and byte counts take it as is."""


def _mamba_shapes(cfg, kind: str, batch: int) -> tuple[tuple, tuple]:
    """(conv shape, SSM shape) of a 'mamba' or 'mamba2' layer's state."""
    if kind == "mamba2":
        return ((batch, cfg.mamba2_conv_dim, cfg.mamba_d_conv - 1),
                (batch, cfg.mamba2_n_heads, cfg.mamba2_head_dim, cfg.mamba2_d_state))
    return (batch, cfg.d_inner, cfg.mamba_d_conv - 1), (batch, cfg.d_inner, cfg.mamba_d_state)


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
        self.owner = None       # a weak reference to the model (HybridLM.new_cache): snapshots hash its weights
        # the decode kernels' plan over these buffers (kernels/decode_cpu.DecodePlan, which checks it is still
        # current before each use); opaque here, dropped with the cache
        self.kernel_plan = None

    @classmethod
    def allocate(cls, cfg, batch: int, max_len: int, dtype: torch.dtype, device="cpu", fingerprint: str = ""):
        layers = []
        for i in range(cfg.num_hidden_layers):
            kind = cfg.mixer(i)
            if kind is None:                    # a feed-forward-only layer ('f'/'F') keeps no state
                layers.append(None)
            elif kind in ("mamba", "mamba2"):
                conv, ssm = _mamba_shapes(cfg, kind, batch)
                layers.append((Mamba2State if kind == "mamba2" else MambaState)(
                    conv=torch.zeros(conv, dtype=dtype, device=device),
                    ssm=torch.zeros(ssm, dtype=torch.float32, device=device)))
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
            elif isinstance(s, KVState):
                out[f"layers.{i}.k"], out[f"layers.{i}.v"] = s.k, s.v
        return out

    def nbytes(self) -> dict[str, int]:
        """Allocated bytes per component: attention K/V, Mamba conv, Mamba SSM."""
        kv = conv = ssm = 0
        for s in self.layers:
            if isinstance(s, MambaState):
                conv += s.conv.numel() * s.conv.element_size()
                ssm += s.ssm.numel() * s.ssm.element_size()
            elif isinstance(s, KVState):
                kv += 2 * s.k.numel() * s.k.element_size()
        return {"kv": kv, "conv": conv, "ssm": ssm, "total": kv + conv + ssm}

    # ---- rows: continuous batching (serve.py) and what code outside this file may read -----------
    @property
    def device(self) -> torch.device:
        return self.valid.device

    def kernel_view(self) -> tuple[list, torch.Tensor, int]:
        """(per-layer states, validity mask [b, max_len], slots written): the raw buffers a fused decode
        kernel reads and writes in place (kernels/decode_cpu.py). Everything else goes through methods."""
        return self.layers, self.valid, self.pos

    def _empty_like(self, batch: int, max_len: int) -> "Cache":
        """A zeroed cache with this one's layer kinds, shapes, dtypes and device, for ``batch`` x ``max_len``
        (what ``allocate`` builds for the same model)."""
        layers = []
        for s in self.layers:
            if isinstance(s, MambaState):
                layers.append(type(s)(conv=s.conv.new_zeros((batch, *s.conv.shape[1:])),
                                      ssm=s.ssm.new_zeros((batch, *s.ssm.shape[1:]))))
            elif s is None:
                layers.append(None)
            else:
                slots = max_len if s.window is None else min(s.window, max_len)
                shape = (batch, s.k.shape[1], slots, s.k.shape[3])
                layers.append(KVState(s.k.new_zeros(shape), s.v.new_zeros(shape), s.window))
        out = Cache(layers, batch, max_len, self.device, self.fingerprint)
        out.owner = self.owner
        return out

    @classmethod
    def gather(cls, parts: list[tuple["Cache", int]], room: int) -> "Cache":
        """A new cache whose row j is row ``parts[j][1]`` of cache ``parts[j][0]`` (caches of one model),
        right-aligned, with ``room`` free positions: rows join and leave a running batch this way. Leading
        invalid slots of a row (left padding) are dropped, so the batch is as long as its longest row, not
        as its history. Positions (RoPE) come from ``seen`` and are kept; the model reads the slots before
        a shorter row as left padding. Holes a speculative rollback left (``holes_exact``: caches without
        rings) are dropped too: a row's valid slots are copied side by side."""
        if not parts:
            raise ValueError("gather needs at least one row")
        real = [c.valid[r, :c.pos].nonzero()[:, 0] for c, r in parts]      # each row's slots of real tokens
        lengths = [len(x) for x in real]
        p = max(lengths)
        out = parts[0][0]._empty_like(len(parts), p + room)
        for j, ((c, r), idx, n) in enumerate(zip(parts, real, lengths)):
            o = p - n
            lead = c.pos - n                   # (rings: no holes, so the row's slots are lead .. pos - 1)
            out.valid[j, o:p] = True
            out.seen[j] = c.seen[r]
            for src, dst in zip(c.layers, out.layers):
                if src is None:
                    continue
                if isinstance(src, MambaState):
                    dst.conv[j] = src.conv[r]
                    dst.ssm[j] = src.ssm[r]
                elif src.window is None:
                    dst.k[j, :, o:p] = src.k[r, :, idx.to(src.k.device)]
                    dst.v[j, :, o:p] = src.v[r, :, idx.to(src.v.device)]
                else:                          # ring buffers: slot s lives at index s % ring size
                    keep = min(src.k.shape[2], dst.k.shape[2], n)
                    slots = torch.arange(c.pos - keep, c.pos, device=src.k.device)
                    to = torch.remainder(slots - lead + o, dst.k.shape[2])
                    dst.k[j, :, to] = src.k[r, :, torch.remainder(slots, src.k.shape[2])]
                    dst.v[j, :, to] = src.v[r, :, torch.remainder(slots, src.v.shape[2])]
        out.pos = p
        return out

    # ---- snapshots: save, fork, roll back -----------------------------------------------------
    def snapshot(self, logits: torch.Tensor | None = None, model=None) -> "Snapshot":
        """A copy of the state after ``pos`` tokens (attention buffers trimmed to ``pos``), plus the
        logits the state ended on, so generation can continue from it without re-reading anything.
        ``model``: the model that wrote this cache (default: the one that allocated it, ``owner``); the
        snapshot records a hash of all its weights (``weights_fingerprint``), which ``Snapshot.check``
        requires to match. A cache built without its model (``Cache.allocate``) gives a snapshot without
        that hash, which ``restore`` accepts and a check against a model refuses."""
        tensors = {}
        for k, t in self.tensors().items():
            s = self.layers[int(k.split(".")[1])] if k.startswith("layers.") else None
            if isinstance(s, KVState) and s.window is None:
                t = t[:, :, :self.pos]
            tensors[k] = t.clone()
        if logits is not None:
            tensors["logits"] = logits.detach().clone()
        dtype = next(t.dtype for k, t in tensors.items() if k.endswith((".conv", ".k")))
        meta = {"format": SNAPSHOT_FORMAT, "fingerprint": self.fingerprint, "pos": str(self.pos),
                "batch": str(self.batch), "dtype": str(dtype).removeprefix("torch.")}
        model = model if model is not None else (self.owner() if self.owner is not None else None)
        if model is not None:
            meta["weights"] = weights_fingerprint(model)
        return Snapshot(tensors, meta)

    def _layout(self, pos: int) -> dict:
        """What a snapshot of this cache after ``pos`` positions holds (see ``_state_layout``)."""
        out = {"valid": ((self.batch, pos), torch.bool), "seen": ((self.batch,), torch.long)}
        for i, s in enumerate(self.layers):
            if isinstance(s, MambaState):
                out[f"layers.{i}.conv"] = (tuple(s.conv.shape), s.conv.dtype)
                out[f"layers.{i}.ssm"] = (tuple(s.ssm.shape), s.ssm.dtype)
            elif isinstance(s, KVState):
                b, h, _, d = s.k.shape
                slots = pos if s.window is None else (min(pos, s.window), s.window)
                out[f"layers.{i}.k"] = out[f"layers.{i}.v"] = ((b, h, slots, d), s.k.dtype)
        return out

    def restore(self, snap: "Snapshot"):
        """Roll this cache back (or forward) to ``snap``, in place. Every state tensor is checked
        (present, shape, dtype, finite) before anything is written, so a refused snapshot leaves the
        cache as it was."""
        pos, batch = _meta_int(snap.meta, "pos"), _meta_int(snap.meta, "batch")
        if snap.meta.get("fingerprint") != self.fingerprint:
            raise ValueError("snapshot was taken from a different model (fingerprint "
                             f"{snap.meta.get('fingerprint')} != {self.fingerprint}); load it into the model "
                             f"that produced it")
        if batch != self.batch or pos > self.max_len:
            raise ValueError(f"snapshot holds batch {batch} x {pos} positions; this cache is batch {self.batch} "
                             f"x {self.max_len}")
        _check_layout(_specs(snap.tensors), self._layout(pos), "snapshot")
        _check_values(snap.tensors, "snapshot")
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
            else:
                # a full-attention buffer saved trimmed to pos, or a local ring that never wrapped
                # (pos <= its slots, checked above) saved from a cache of another length
                own[k][:, :, :pos].copy_(t[:, :, :pos])
        self.pos = pos

    # ---- speculative decoding: checkpoint before a verify chunk, roll rejected tokens back ------
    def checkpoint(self, span: int, trail: bool = False) -> "Checkpoint":
        """The little a rollback needs before the next ``span`` tokens are written (speculative.py):
        the position counters, every Mamba layer's conv window and SSM state, and the local-attention
        ring slots those tokens will overwrite. Full-attention slots need nothing: tokens only ever
        write slots past ``pos``, so a rollback just invalidates them.

        ``trail``: the next forward's Mamba-1 layers also record their conv inputs and the SSM state at
        every position (mamba.py), so ``rollback`` can keep any prefix of that forward by copying."""
        mamba, ring, trails = {}, {}, {}
        for i, s in enumerate(self.layers):
            if isinstance(s, MambaState):
                mamba[i] = (s.conv.clone(), s.ssm.clone())
                s.trail = MambaTrail() if trail else None
                if trail:
                    trails[i] = s.trail
            elif s is not None and s.window is not None:
                r = s.k.shape[2]     # the ring slots the span writes, in position order (all of them if it wraps)
                idx = torch.remainder(torch.arange(self.pos, self.pos + min(span, r), device=s.k.device), r)
                ring[i] = (idx, s.k[:, :, idx].clone(), s.v[:, :, idx].clone())
        return Checkpoint(self.pos, self.seen.clone(), span, mamba, ring, trails)

    def holes_exact(self) -> bool:
        """Whether rows may keep different numbers of a verify chunk's tokens (``rollback`` with a count per
        row): a row that keeps fewer than the most any row kept is left with a hole, slots marked invalid
        (k/v zeroed) between its kept tokens and the next position, which attention skips as it skips left
        padding. Exact where nothing else counts slots: full attention (RoPE positions come from ``seen``,
        the count of valid tokens, so they ignore the hole) and Mamba-1 layers (their state is per row,
        copied from the chunk's trail). Not where a local-attention ring holds the chunk (a hole would take
        window slots: the row would see fewer real tokens) nor with Mamba-2 layers (no trail: the kept
        tokens are run again, a chunk of one width for every row)."""
        return all(s is None or type(s) is MambaState or (isinstance(s, KVState) and s.window is None)
                   for s in self.layers)

    def rollback(self, ck: "Checkpoint", keep: "int | torch.Tensor" = 0) -> "int | torch.Tensor":
        """Return, in place, to the state ``ck`` was taken in plus the first ``keep`` tokens of the forward
        that followed it; returns how many it kept. Slots past those are invalidated (and zeroed, so the
        buffers equal those of a cache that never saw the rejected tokens) and ring slots restored.

        ``keep`` [b] (a count per row; different counts only where ``holes_exact`` and every Mamba layer
        recorded a trail): ``pos`` ends after the most any row kept, and a row that kept fewer has a hole
        of invalid, zeroed slots up to there (``holes_exact``); returns the counts kept, [b].

        Mamba states: with the checkpoint's trail (strategy 2 of issue 14) the SSM state after ``keep``
        tokens is a copy and the conv window is rebuilt from the recorded inputs, so all ``keep`` are kept.
        Without one (or a ring the forward wrapped around, or a layer that records no trail, Mamba-2's)
        the checkpoint's states come back and 0 is returned: the caller runs the kept tokens again
        (strategy 1)."""
        if not ck.pos <= self.pos <= ck.pos + ck.span:
            raise ValueError(f"checkpoint at position {ck.pos} (+{ck.span}) does not cover the cache's "
                             f"position {self.pos}")
        per_row = isinstance(keep, torch.Tensor)
        counts = keep.to("cpu", torch.long, copy=True) if per_row else torch.full((self.batch,), keep, dtype=torch.long)
        written = self.pos - ck.pos
        if counts.shape != (self.batch,) or not bool(((counts >= 0) & (counts <= written)).all()):
            raise ValueError(f"cannot keep {counts.tolist() if per_row else keep} tokens: {written} were written "
                             f"since the checkpoint (one count, or one per row of {self.batch})")
        most = int(counts.max()) if self.batch else 0
        mambas = [s for s in self.layers if isinstance(s, MambaState)]
        copies = (len(ck.trails) == len(mambas)
                  and all(t.u is not None and most <= t.u.shape[1] for t in ck.trails.values())
                  and all(ck.span <= self.layers[i].k.shape[2] for i in ck.ring))
        if bool((counts != most).any()) and not (copies and self.holes_exact()):
            raise ValueError("rows can keep different numbers of tokens only with full attention and Mamba-1 "
                             "layers whose trails were recorded (Cache.holes_exact, checkpoint(trail=True))")
        if most and not copies:
            counts.zero_()
            most = 0
        end = ck.pos + most
        # rows by the count they keep: one group (a slice, no indexing copies) when all keep the same
        values = counts.unique().tolist()
        groups = [(values[0], slice(None))] if len(values) == 1 else \
            [(c, (counts == c).nonzero()[:, 0].to(self.device)) for c in values]
        for i, s in enumerate(self.layers):
            if isinstance(s, MambaState):
                s.trail = None
                conv, ssm = ck.mamba[i]
                t = ck.trails.get(i)
                for c, rows in groups:
                    if c == 0:
                        s.conv[rows], s.ssm[rows] = conv[rows], ssm[rows]
                        continue
                    s.ssm[rows] = t.ssm[rows, c] if c < t.u.shape[1] else t.last[rows]
                    w = conv.shape[2]                                           # the conv window's inputs
                    if c >= w:
                        s.conv[rows] = t.u[rows, c - w:c].transpose(1, 2).to(conv.dtype)
                    else:
                        s.conv[rows] = torch.cat([conv[rows][:, :, c:], t.u[rows, :c].transpose(1, 2).to(conv.dtype)], -1)
            elif s is None:
                continue
            elif s.window is None:
                for c, rows in groups:
                    s.k[rows, :, ck.pos + c:self.pos] = 0
                    s.v[rows, :, ck.pos + c:self.pos] = 0
            else:
                idx, k, v = ck.ring[i]
                s.k[:, :, idx[most:]] = k[:, :, most:]
                s.v[:, :, idx[most:]] = v[:, :, most:]
        for c, rows in groups:
            self.valid[rows, ck.pos + c:self.pos] = False
        self.seen.copy_(ck.seen + self.valid[:, ck.pos:end].sum(1))
        self.pos = end
        return counts if per_row else most


@dataclass
class MambaTrail:
    """A Mamba-1 layer's record of one forward after ``Cache.checkpoint(trail=True)`` (filled by mamba.py)."""
    u: torch.Tensor | None = None        # [b, l, d_in] the conv's inputs (padding zeroed)
    ssm: torch.Tensor | None = None      # [b, l, d_in, n] fp32: the SSM state before each token
    last: torch.Tensor | None = None     # [b, d_in, n] fp32: the state after the last


@dataclass
class Checkpoint:
    """What ``Cache.rollback`` restores: taken by ``Cache.checkpoint`` before ``span`` tokens."""
    pos: int
    seen: torch.Tensor                                              # [b]
    span: int
    mamba: dict[int, tuple[torch.Tensor, torch.Tensor]]             # layer -> (conv, ssm)
    ring: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # layer -> (ring slots, k, v)
    trails: dict[int, MambaTrail] = field(default_factory=dict)     # layer -> what its next forward recorded


SNAPSHOT_FORMAT = "hybridlm-snapshot-1"
# decimal digits a snapshot header's pos/batch may have: far past any real state, far below int64
_MAX_DIGITS = 12


def weights_fingerprint(model) -> str:
    """SHA-256 over the config and every byte of every parameter and buffer (names, dtypes, shapes
    included): two models share it only if their configs and all their weights are identical. Snapshots
    record it and refuse to load into a model whose weights differ anywhere (``HybridLM.fingerprint``
    samples about 64 values per tensor, which misses a change elsewhere).

    Streamed one tensor at a time (GPU tensors in 64 MiB pieces), about 1.5 GB/s on one CPU core;
    cached on the model and recomputed only when a tensor is replaced or modified in place (the key is
    each tensor's storage address and autograd version counter; tensors made under
    ``torch.inference_mode`` have no counter, so for them only replacement is noticed)."""
    import hashlib

    def version(t):
        try:
            return t._version
        except RuntimeError:      # an inference tensor
            return -1
    tensors = list(model.state_dict(keep_vars=True).items())
    key = tuple((t.data_ptr(), version(t)) for _, t in tensors)
    cached = getattr(model, "_weights_fingerprint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    h = hashlib.sha256(repr(sorted(model.config.to_dict().items())).encode())
    seen: dict[tuple, str] = {}
    for name, t in tensors:
        t = t.detach()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        alias = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and alias in seen:          # a tied weight: hashed once, named twice
            h.update(f"={seen[alias]}".encode())
            continue
        seen[alias] = name
        flat = t.contiguous().view(-1)
        step = max(1, (64 << 20) // max(1, flat.element_size()))
        for i in range(0, flat.numel(), step):
            piece = flat[i:i + step].cpu()
            h.update(piece.view(torch.uint8).numpy() if piece.dtype != torch.bool else piece.numpy())
    digest = h.hexdigest()[:32]
    model._weights_fingerprint = (key, digest)
    return digest


def _meta_int(meta: dict, key: str) -> int:
    """A header's ``pos``/``batch``: a plain decimal string of a sane length (a hostile header cannot
    make anything allocate from it: shapes are checked against the tensors first)."""
    v = meta.get(key)
    if not isinstance(v, str) or not v.isascii() or not v.isdigit() or len(v) > _MAX_DIGITS:
        raise ValueError(f"snapshot header: {key} must be a non-negative integer of at most {_MAX_DIGITS} "
                         f"digits, got {v!r}")
    return int(v)


def _specs(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}


def _state_layout(cfg, batch: int, pos: int, dtype: torch.dtype) -> dict:
    """Every state tensor a snapshot of a ``cfg`` model after ``pos`` positions holds: name -> (shape,
    dtype), as ``Cache.allocate`` builds them. A local-attention layer's slot count is a range (lo, hi):
    its ring of ``sliding_window`` slots, or fewer when its cache was shorter than the window (a ring
    that cannot have wrapped, so it holds at least the ``pos`` positions written)."""
    out = {"valid": ((batch, pos), torch.bool), "seen": ((batch,), torch.long)}
    for i in range(cfg.num_hidden_layers):
        kind = cfg.mixer(i)
        if kind is None:
            continue
        if kind in ("mamba", "mamba2"):
            conv, ssm = _mamba_shapes(cfg, kind, batch)
            out[f"layers.{i}.conv"], out[f"layers.{i}.ssm"] = (conv, dtype), (ssm, torch.float32)
        else:
            w = cfg.sliding_window
            slots = pos if kind == "attention" else (min(pos, w), w)
            out[f"layers.{i}.k"] = out[f"layers.{i}.v"] = (
                (batch, cfg.num_key_value_heads, slots, cfg.head_size), dtype)
    return out


def _check_layout(found: dict, expected: dict, what: str, logits_shape: tuple | None = None):
    """Refuse (ValueError, listing the first problems) unless ``found`` (name -> (shape, dtype)) holds
    exactly the ``expected`` tensors with their shapes and dtypes, plus optionally ``logits``."""
    def fits(got, want):
        return want[0] <= got <= want[1] if isinstance(want, tuple) else got == want

    def name(dtype):
        return str(dtype).removeprefix("torch.")

    problems = []
    missing = [k for k in expected if k not in found]
    if missing:
        problems.append(f"missing state tensors ({len(missing)}): {', '.join(missing[:6])}")
    extra = [k for k in found if k not in expected and k != "logits"]
    if extra:
        problems.append(f"unexpected tensors ({len(extra)}): {', '.join(extra[:6])}")
    for k, (shape, dtype) in expected.items():
        if k not in found:
            continue
        got_shape, got_dtype = found[k]
        if len(got_shape) != len(shape) or not all(map(fits, got_shape, shape)):
            want = ", ".join(f"{w[0]}..{w[1]}" if isinstance(w, tuple) else str(w) for w in shape)
            problems.append(f"{k}: shape {list(got_shape)}, expected [{want}]")
        elif got_dtype != dtype:
            problems.append(f"{k}: dtype {name(got_dtype)}, expected {name(dtype)}")
    if "logits" in found:
        shape, dtype = found["logits"]
        if not dtype.is_floating_point or len(shape) != 2 or (logits_shape and tuple(shape) != logits_shape):
            problems.append(f"logits: {name(dtype)} {list(shape)}, expected floating point "
                            f"{list(logits_shape) if logits_shape else '[batch, vocab]'}")
    if problems:
        raise ValueError(f"{what} does not match the model's state layout: " + "; ".join(problems[:8]))


def _check_header(meta: dict, specs: dict, model=None, what: str = "snapshot"):
    """The header against the tensors (``specs``: name -> (shape, dtype), from memory or from a file's
    header) and, with ``model``, against the model: dtype, fingerprints, and every state tensor's shape
    and dtype as its config builds them. Reads no tensor data (the weights hash is cached on the model)."""
    for k in ("fingerprint", "dtype"):
        if not isinstance(meta.get(k), str):
            raise ValueError(f"{what}: the snapshot header has no {k!r}")
    pos, batch = _meta_int(meta, "pos"), _meta_int(meta, "batch")
    where = f"{what} (header: pos {pos}, batch {batch})"
    if batch < 1:
        raise ValueError(f"{where}: a state has at least one row")
    if model is None:           # without the model: the two tensors whose shapes the header alone fixes
        base = {"valid": ((batch, pos), torch.bool), "seen": ((batch,), torch.long)}
        _check_layout({k: specs[k] for k in base if k in specs}, base, where)
        return
    want_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    if meta["dtype"] != want_dtype:
        raise ValueError(f"snapshot state is {meta['dtype']} but the model runs in {want_dtype}; "
                         f"load the model with dtype={meta['dtype']}")
    if meta["fingerprint"] != model.fingerprint():
        raise ValueError("snapshot was taken from a different model (config or weights differ: fingerprint "
                         f"{meta['fingerprint']} != {model.fingerprint()})")
    if not isinstance(meta.get("weights"), str):   # the sampled fingerprint alone misses weights changed elsewhere
        raise ValueError("the snapshot records no hash of its model's weights ('weights'), so it cannot be checked "
                         "against this model; take it from a cache the model allocated (model.new_cache) or pass "
                         "the model to cache.snapshot(logits, model)")
    if meta["weights"] != weights_fingerprint(model):
        raise ValueError("snapshot was taken from a different model: its weights differ (hash of every weight "
                         f"{meta['weights']} != {weights_fingerprint(model)})")
    cfg = model.config
    if pos > cfg.max_position_embeddings:
        raise ValueError(f"{where}: more positions than the model's max_position_embeddings "
                         f"{cfg.max_position_embeddings}")
    _check_layout(specs, _state_layout(cfg, batch, pos, getattr(torch, want_dtype)), where,
                  logits_shape=(batch, cfg.vocab_size))


def _check_values(tensors: dict[str, torch.Tensor], what: str):
    """Refuse NaN/inf state and position counters that contradict the validity mask."""
    for k, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{what}: {k} holds NaN or infinite values; the state is corrupt")
    valid, seen = tensors["valid"], tensors["seen"]
    if not torch.equal(valid.sum(1), seen):
        raise ValueError(f"{what}: seen {seen.tolist()[:8]} does not count the valid positions "
                         f"{valid.sum(1).tolist()[:8]} of each row; the state is corrupt")


@dataclass
class Snapshot:
    """The whole inference state after a prompt: tensors by name plus a small string header.

    Header: ``format``, ``fingerprint`` (``HybridLM.fingerprint``), ``weights`` (``weights_fingerprint``,
    when the snapshot was taken with the model), ``pos``, ``batch``, ``dtype``; callers may add string
    fields (a chat's conversation). Nothing is allocated from the header: ``pos``/``batch`` are checked
    against the tensors, and the tensors against the model's config, before a cache is built."""
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
    def load(cls, path, model=None) -> "Snapshot":
        """Read a snapshot file. Its header (pos, batch) is checked against the shapes the file declares
        before any tensor is read, so a refused header costs no allocation. With ``model``, the file is
        checked as ``check`` does: dtype, fingerprints and every shape against the model before reading,
        the values after."""
        from .safetensors_io import SafeTensorsFile
        try:
            f = SafeTensorsFile(path)
            specs = {k: (f.shape(k), f.dtype(k)) for k in f.keys()}
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({type(e).__name__}: {e})") from None
        meta = f.metadata
        if not isinstance(meta, dict) or meta.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path} is not a hybridlm state snapshot (format "
                             f"{meta.get('format') if isinstance(meta, dict) else None!r})")
        bad = [k for k, v in meta.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"{path}: snapshot header fields must be strings: {', '.join(bad[:5])}")
        try:
            _check_header(meta, specs, model, str(path))
        except ValueError as e:   # the checks against the model (dtype, fingerprints) do not know the file
            raise ValueError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
        snap = cls({k: f.get(k).clone() for k in f.keys()}, dict(meta))
        if model is not None:
            _check_values(snap.tensors, str(path))
        return snap

    def check(self, model):
        """Refuse a snapshot of another model or dtype, a header that contradicts its tensors or the
        model's config, a missing or misshapen state tensor, or NaN/inf state, saying which. Allocates
        nothing the size of a cache."""
        _check_header(self.meta, _specs(self.tensors), model)
        _check_values(self.tensors, "snapshot")

    def to_cache(self, model, max_len: int | None = None) -> "Cache":
        """A new cache holding this state (fork: call it as often as needed), room for ``max_len`` tokens.
        The header and every tensor's shape are checked against the model before the cache is
        allocated, and the values (``restore``) before anything is written into it."""
        _check_header(self.meta, _specs(self.tensors), model)
        cache = model.new_cache(int(self.meta["batch"]), max(max_len or 0, self.pos))
        cache.restore(self)
        return cache
