"""Weight-only quantization: int8 and int4 weights, applied after the model is built by swapping its
linear layers for ``QuantLinear`` (gpt-fast's way: model.py knows nothing of it).

Schemes (``QuantScheme``):
    int8    symmetric, one scale per output channel (Jamba-1.5's ExpertsInt8 recipe; every expert is its
            own set of layers, so per expert too), or per group of columns: value = q * s, q in [-127, 127]
    int4    groups of 32 / 64 / 128 input columns (any multiple of 32), each with its own scale:
            symmetric  value = (q - 8) * s, s = -m / 8 where m is the group's entry of largest magnitude, so
                       that entry is exact (GGUF's Q4_0 rule), q in [0, 15]
            asymmetric value = q * s + min, s = (max - min) / 15
Scales (and mins) are stored in bf16 or fp32; q is computed against the stored (rounded) scale.
Round to nearest; no calibration.

What is quantized, as llama.cpp does: every linear layer (Mamba's in_proj, x_proj, dt_proj, out_proj;
q/k/v/o; the MLP and expert projections; lm_head unless ``lm_head=False``). What stays as loaded: the
MoE router, conv1d, A_log, D, every norm and bias, the embeddings; the SSM state stays fp32 (cache.py).

Storage, per quantized layer with k input and o output features, ld = k rounded up to the group (per
channel: to a multiple of 32; the padding columns are zero weights), in tiles of 8 output rows (T =
ceil(o / 8) tiles; the rows past o are zero), as kernels/csrc/mat.h reads it:
    weight        int8 [T, ld / 32, 256]   per tile and 32-column block: 8 sub-blocks s of 4 columns, each
                                           8 rows x 4 bytes: byte (s, i, j) = row i, column 4 s + j
                  uint8 [T, ld / 32, 128]  (int4) 4 sub-blocks s of 8 columns, each 8 rows x 4 bytes: byte
                                           (s, i, j) = column 8 s + j (low nibble) | 8 s + 4 + j (high)
    weight_scale  [T, ld / group, 8]       row i of the tile's scale of each group
    weight_min    [T, ld / group, 8]       (asymmetric int4 only)
    bias          as loaded
The decode kernel multiplies a tile's 8 rows at once with one output lane per row: 4 int8 activations
broadcast against 4 bytes of each row, so no horizontal sums and one scale vector per block (~1.7x faster
than rows one by one on AVX2; benchmarks/quant_gemv.py). ``QuantLinear.rows`` gives the plain row layout
(the integers unpacked, scales [o, ld / group]) and ``set_rows`` takes it.
A saved checkpoint records the scheme in config.json under ``quantization_config``, with ``"layout":
"tiles8"``; checkpoints written before the tiles (no layout: rows of packed int4 [o, ld / 2], scales [o,
ld / group]) are converted as they load (checkpoint.py).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

QUANT_METHOD = "hybridlm"
_SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
_ROW_CHUNK = 1 << 22   # weights quantized per torch pass: bounds the fp32 temporaries (~16 MB each)
TILE = 8               # output rows per tile of the stored layout (module docstring)
LAYOUT = "tiles8"      # quantization_config["layout"] of checkpoints in that layout


@dataclass(frozen=True)
class QuantScheme:
    """A weight-only quantization scheme; ``QuantScheme.parse("int4:g64")`` reads the CLI spelling."""
    bits: int                          # 8 or 4
    group: int = 0                     # input columns per scale; 0: one scale per output channel (int8)
    symmetric: bool = True
    scale_dtype: str = "bfloat16"      # "bfloat16" or "float32"
    lm_head: bool = True               # quantize the output projection too

    def __post_init__(self):
        if self.bits not in (4, 8):
            raise ValueError(f"unknown quantization bits {self.bits}; use int8 or int4")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale dtype {self.scale_dtype!r}: use 'bfloat16' or 'float32'")
        if self.bits == 4 and (self.group <= 0 or self.group % 32):
            raise ValueError(f"int4 needs a group size that is a positive multiple of 32 (32, 64, 128, ...), "
                             f"got {self.group}")
        if self.bits == 8 and (self.group < 0 or self.group % 32):
            raise ValueError(f"int8 takes group 0 (one scale per output channel) or a multiple of 32, got {self.group}")
        if self.bits == 8 and not self.symmetric:
            raise ValueError("int8 is symmetric only; drop 'asym' or use int4")

    @classmethod
    def parse(cls, spec: "str | QuantScheme") -> "QuantScheme":
        """'int8' (per channel, fp32 scales), 'int4' (group 64, symmetric, bf16 scales), and options joined
        by ':' — 'g32' / 'g128' (group), 'asym', 'fp32' / 'bf16' (scale dtype), 'keep-lm-head'; e.g.
        'int4:g128:asym', 'int8:g32'."""
        if isinstance(spec, QuantScheme):
            return spec
        parts = [p.strip().lower() for p in str(spec).split(":")]
        kinds = {"int8": dict(bits=8, group=0, scale_dtype="float32"), "int4": dict(bits=4, group=64)}
        if parts[0] not in kinds:
            raise ValueError(f"unknown quantization scheme {spec!r}; use int8 or int4, with options like "
                             f"'int4:g128', 'int4:g32:asym', 'int8:g32', ':fp32', ':keep-lm-head'")
        kw = dict(kinds[parts[0]])
        for p in parts[1:]:
            if p.startswith("g") and p[1:].isdigit():
                kw["group"] = int(p[1:])
            elif p in ("asym", "sym"):
                kw["symmetric"] = p == "sym"
            elif p in ("fp32", "bf16"):
                kw["scale_dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[p]
            elif p == "keep-lm-head":
                kw["lm_head"] = False
            else:
                raise ValueError(f"quantization scheme {spec!r}: unknown option {p!r}; options: gN (group size), "
                                 f"asym, fp32, bf16, keep-lm-head")
        return cls(**kw)

    def __str__(self) -> str:
        group = f"g{self.group}" if self.group else "per-channel"
        sym = "sym" if self.symmetric else "asym"
        return f"int{self.bits} {group} {sym}, {self.scale_dtype} scales" + ("" if self.lm_head else ", lm_head kept")

    def to_config(self) -> dict:
        """config.json's ``quantization_config``."""
        return {"quant_method": QUANT_METHOD, **asdict(self), "layout": LAYOUT}

    @classmethod
    def from_config(cls, d: dict, source: str = "config.json") -> "QuantScheme":
        method = d.get("quant_method")
        if method != QUANT_METHOD:
            raise ValueError(f"{source}: quantization_config has quant_method {method!r}; hybridlm reads its own "
                             f"int8/int4 checkpoints ({QUANT_METHOD!r}). Load the original bf16/fp32 checkpoint and "
                             f"quantize it with `hybridlm quantize` instead")
        try:
            return cls(**{k: d[k] for k in ("bits", "group", "symmetric", "scale_dtype", "lm_head") if k in d})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: invalid quantization_config {d}: {e}") from None


class QuantLinear(nn.Module):
    """A linear layer with int8/int4 weights (layout in the module docstring); its forward multiplies
    int8-quantized activations by them (see ``forward``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: QuantScheme,
                 device=None, bias_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.ld = math.ceil(in_features / (scheme.group or 32)) * (scheme.group or 32)
        self.group = scheme.group or self.ld           # per channel: one group, the whole (padded) row
        sdtype = _SCALE_DTYPES[scheme.scale_dtype]
        tiles, blocks, groups = -(-out_features // TILE), self.ld // 32, self.ld // self.group
        self.register_buffer("weight", torch.zeros(tiles, blocks, 4 * scheme.bits * TILE, device=device,
                                                   dtype=torch.int8 if scheme.bits == 8 else torch.uint8))
        self.register_buffer("weight_scale", torch.zeros(tiles, groups, TILE, device=device, dtype=sdtype))
        self.register_buffer("weight_min", None if scheme.symmetric else
                             torch.zeros(tiles, groups, TILE, device=device, dtype=sdtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=bias_dtype),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme) -> "QuantLinear":
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, scheme,
                device=linear.weight.device, bias_dtype=linear.weight.dtype)
        q.quantize_(linear.weight)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return q

    @property
    def packed_numel(self) -> int:
        """The values the packed weight stands for (model.num_params counts them)."""
        return self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}"

    @torch.no_grad()
    def quantize_(self, w: torch.Tensor):
        """Set the quantized weight from a float weight [out_features, in_features] (a view of a memory-mapped
        checkpoint is fine: it is read in row chunks, so temporaries stay small)."""
        o, k = self.out_features, self.in_features
        if tuple(w.shape) != (o, k):
            raise ValueError(f"quantize: weight of shape {list(w.shape)} does not fit a layer of {k} inputs and "
                             f"{o} outputs")
        device = w.device if w.device.type != "meta" else "cpu"
        data, scale = torch.empty_like(self.weight, device=device), torch.empty_like(self.weight_scale, device=device)
        mins = None if self.scheme.symmetric else torch.empty_like(scale)
        rows = max(1, _ROW_CHUNK // max(1, self.ld)) // TILE * TILE or TILE
        for r0 in range(0, o, rows):
            q, s, m = quantize_rows(w[r0:r0 + rows].to(device=device, dtype=torch.float32), self.scheme, self.ld)
            t = slice(r0 // TILE, -(-(r0 + q.shape[0]) // TILE))
            data[t], scale[t], m = tile(q, s, m, self.scheme.bits)
            if mins is not None:
                mins[t] = m
        self.weight, self.weight_scale, self.weight_min = data, scale, mins

    def rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The weights in rows: (q [o, ld] (int8; int4: uint8 0..15), scale [o, ld / group], min or None)."""
        return untile(self.weight, self.weight_scale, self.weight_min, self.out_features, self.scheme.bits)

    @torch.no_grad()
    def set_rows(self, q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None = None):
        """Set the weights from rows as ``rows`` gives them (a GGUF file's blocks, an older checkpoint)."""
        o, ng = self.out_features, self.ld // self.group
        want = {"q": ((o, self.ld), self.weight.dtype), "scale": ((o, ng), self.weight_scale.dtype)}
        if self.weight_min is not None:
            want["min"] = ((o, ng), self.weight_scale.dtype)
        for name, t in (("q", q), ("scale", scale), ("min", mins)):
            if (name in want) != (t is not None) or (t is not None and (tuple(t.shape), t.dtype) != want[name]):
                raise ValueError(f"{self}: weights in rows need {name} of shape and dtype {want.get(name)}, got "
                                 f"{None if t is None else (tuple(t.shape), t.dtype)}")
        self.weight, self.weight_scale, self.weight_min = tile(q, scale, mins, self.scheme.bits)

    def set_packed_rows(self, weight: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None = None):
        """Set the weights from the row layout of checkpoints written before the tiles: weight int8 [o, ld] or
        packed int4 [o, ld / 2] (``unpack_int4``'s order), scale and min [o, ld / group]."""
        half = (self.out_features, self.ld // 2)
        if self.scheme.bits == 4 and (tuple(weight.shape) != half or weight.dtype != torch.uint8):
            raise ValueError(f"{self}: packed int4 rows need weight of shape {list(half)} (uint8), got "
                             f"{list(weight.shape)} ({weight.dtype})")
        self.set_rows(weight if self.scheme.bits == 8 else unpack_int4(weight), scale, mins)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out_features, in_features] in ``dtype`` (the C++ kernel on CPU, else the reference)."""
        return kernels.dequantize(self, dtype)

    def product_ref(self, x: torch.Tensor) -> torch.Tensor:
        """The reference twin of the decode kernel's product (csrc/decode.cpp, gemv_q), as integers: x
        [..., k] quantized as ``quantize_activations`` does, exact integer dots per block of 32 columns, then
        the scales; returns [..., out_features] fp32, without the bias."""
        lead, k = x.shape[:-1], x.shape[-1]
        xb = F.pad(x.float().reshape(-1, k), (0, self.ld - k)).view(-1, self.ld // 32, 32)      # [n, blocks, 32]
        xq, d = _quantize_blocks(xb)
        q, scale, mins = self.rows()
        q = q.float() - (8 if self.scheme.bits == 4 and mins is None else 0)
        qb = q.view(self.out_features, self.ld // 32, 32)                                        # [o, blocks, 32]
        dots = torch.einsum("nbc,obc->nob", xq.double(), qb.double()).float()                    # exact integers
        sw = scale.float().repeat_interleave(self.group // 32, dim=1)                           # [o, blocks]
        y = (dots * (d[:, None, :] * sw[None])).sum(-1)
        if mins is not None:
            mins = mins.float().repeat_interleave(self.group // 32, dim=1)
            y = y + ((xq.sum(-1) * d)[:, None, :] * mins[None]).sum(-1)
        return y.view(*lead, self.out_features)

    def dequantize_ref(self) -> torch.Tensor:
        """The reference twin of the dequantization kernel: plain torch ops, fp32 [out_features, in_features]."""
        q, scale, mins = self.rows()
        q, s = q.float(), scale.float().repeat_interleave(self.group, dim=1)
        if mins is not None:
            w = q * s + mins.float().repeat_interleave(self.group, dim=1)
        else:
            w = (q - 8) * s if self.scheme.bits == 4 else q * s
        return w[:, :self.in_features]

    def forward(self, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """x [..., in_features] -> [..., out_features]; ``bias=False`` leaves the bias out (see kernels.Linear).

        The activations are quantized to int8 per block of 32 columns (``quantize_activations``, as llama.cpp
        does) and multiplied by the quantized weights: by the kernel's integer dot products for up to
        decode_cpu.quant_rows(self) rows (decode and prompts; every row where GEMMs run in fp32), by a GEMM
        on the dequantized weight (in kernels.gemm_dtype) otherwise. Both compute the same product (``product_ref``), so decode and prefill
        agree. Nothing here is trainable (no gradient reaches the packed weights)."""
        b = self.bias if bias else None
        if kernels.decode_kernels(x, self, max_rows=kernels.decode_cpu.quant_rows(self)):
            return kernels.linear_step(x, self, b)
        dtype = kernels.gemm_dtype(x)
        w = kernels.dequantize(self, dtype, scratch=True)           # used at once: a reused buffer
        y = F.linear(kernels.quantize_activations(x, dtype), w, None if b is None else b.to(dtype))
        return y.to(x.dtype)


def quantize_rows(w: torch.Tensor, scheme: QuantScheme, ld: int):
    """w fp32 [r, k] -> (q [r, ld] (int8, or uint8 0..15 for int4), scale [r, groups], min [r, groups] or
    None) by the module docstring's rules, padding to ld columns with zeros."""
    r, k = w.shape
    g = scheme.group or ld
    sdtype = _SCALE_DTYPES[scheme.scale_dtype]
    wg = F.pad(w, (0, ld - k)).view(r, ld // g, g)                      # [r, groups, g]
    mins = None
    if scheme.bits == 8:
        s = (wg.abs().amax(-1) / 127).to(sdtype)
        q = torch.round(wg / _divisor(s)).clamp_(-127, 127)
        return q.to(torch.int8).view(r, ld), s, None
    if scheme.symmetric:
        m = wg.gather(-1, wg.abs().argmax(-1, keepdim=True))[..., 0]     # signed entry of largest magnitude
        s = (m / -8).to(sdtype)
        q = torch.round(wg / _divisor(s)).add_(8).clamp_(0, 15)
    else:
        lo, hi = wg.amin(-1), wg.amax(-1)
        mins = lo.to(sdtype)
        s = ((hi - lo) / 15).to(sdtype)
        q = torch.round((wg - mins.float()[..., None]) / _divisor(s)).clamp_(0, 15)
    return q.to(torch.uint8).view(r, ld), s, mins


def _divisor(s: torch.Tensor) -> torch.Tensor:
    """Group scales [r, groups] as fp32 divisors [r, groups, 1], 1 where a group is all zeros (its q is 0)."""
    sf = s.float()
    return torch.where(sf == 0, 1.0, sf)[..., None]


def _quantize_blocks(xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xb fp32 [..., 32] -> (integers [..., 32] in -127..127 as fp32, scale [...] = max|x| / 127): q =
    round(x * (1 / scale)), as csrc/decode.cpp's quantize_x computes it."""
    d = xb.abs().amax(-1) / 127
    return torch.round(xb * torch.where(d == 0, 0.0, 1.0 / d)[..., None]), d


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [..., k] as quantized layers see it: each row quantized to int8 per block of 32 columns with the
    scale max|x| / 127, returned dequantized in fp32 (the last block may be partial)."""
    k = x.shape[-1]
    xb = F.pad(x.float(), (0, -k % 32)).unflatten(-1, (-1, 32))                             # [..., blocks, 32]
    q, d = _quantize_blocks(xb)
    return (q * d[..., None]).flatten(-2)[..., :k]


def tile(q: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, bits: int):
    """Rows -> the stored tiles (module docstring): q [o, ld] (int8, or uint8 0..15), scale and min [o, g]
    -> (weight [T, ld / 32, 256 or 128], scale [T, g, 8], min or None); rows padded to T * 8 with zeros."""
    o, ld = q.shape
    pad = -o % TILE
    q = F.pad(q, (0, 0, 0, pad)).view(-1, TILE, ld // 32, 32)              # [T, i, block, column]
    if bits == 8:
        w = q.view(-1, TILE, ld // 32, 8, 4).permute(0, 2, 3, 1, 4)          # [T, block, s, i, j]
    else:
        q = q.view(-1, TILE, ld // 32, 4, 2, 4)                              # column = 8 s + 4 h + j
        w = (q[..., 0, :] | (q[..., 1, :] << 4)).permute(0, 2, 3, 1, 4)     # [T, block, s, i, j]
    per_tile = lambda t: F.pad(t, (0, 0, 0, pad)).view(-1, TILE, t.shape[1]).transpose(1, 2).contiguous()  # noqa: E731
    return (w.reshape(-1, ld // 32, 4 * bits * TILE).contiguous(), per_tile(scale),
            None if mins is None else per_tile(mins))


def untile(weight: torch.Tensor, scale: torch.Tensor, mins: torch.Tensor | None, o: int, bits: int):
    """The inverse of ``tile``: the first ``o`` rows as (q [o, ld], scale [o, g], min [o, g] or None)."""
    t, blocks = weight.shape[:2]
    if bits == 8:
        q = weight.view(t, blocks, 8, TILE, 4).permute(0, 3, 1, 2, 4)       # [T, i, block, s, j]
    else:
        b = weight.view(t, blocks, 4, TILE, 4).permute(0, 3, 1, 2, 4)       # [T, i, block, s, j]
        q = torch.stack([b & 15, b >> 4], dim=-2)                            # [T, i, block, s, h, j]
    q = q.reshape(t * TILE, blocks * 32)[:o]
    rows = lambda x: x.transpose(1, 2).reshape(t * TILE, -1)[:o]             # noqa: E731
    return q, rows(scale), None if mins is None else rows(mins)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:
    """Rows of packed int4 blocks as GGUF's Q4_0 (and hybridlm's checkpoints before the tiles) store them,
    [r, ld / 2] with byte j of each 16-byte block = column j (low nibble) | column j + 16 (high nibble),
    -> uint8 [r, ld] with values 0..15."""
    r, half = p.shape
    blocks = p.view(r, half // 16, 16)
    return torch.stack([blocks & 15, blocks >> 4], dim=2).reshape(r, half * 2)


def quantizable(name: str, module: nn.Module, scheme: QuantScheme) -> bool:
    """Whether the layer ``name`` is quantized under ``scheme`` (see the module docstring)."""
    if not isinstance(module, nn.Linear) or name.endswith("router"):
        return False
    return scheme.lm_head or name != "lm_head"


def quantize_model(model: nn.Module, scheme: "QuantScheme | str", progress: bool = False) -> nn.Module:
    """Swap every quantizable linear layer of ``model`` for a QuantLinear holding its weight quantized
    (in place; the float weights are released layer by layer). Returns the model."""
    scheme = QuantScheme.parse(scheme)
    names = [n for n, m in model.named_modules() if quantizable(n, m, scheme)]
    bar = _progress(len(names), "quantizing", progress)
    for name in names:
        linear = model.get_submodule(name)
        model.set_submodule(name, QuantLinear.from_linear(linear, scheme))
        bar.update(1)
    bar.close()
    if getattr(model, "config", None) is not None and scheme.lm_head and model.config.tie_word_embeddings:
        model.config.tie_word_embeddings = False     # lm_head is now its own (quantized) copy of the embeddings
    return model


def quantize_structure(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """The same swap on a model built on the meta device: empty QuantLinear layers for a loader to fill."""
    for name, m in list(model.named_modules()):
        if quantizable(name, m, scheme):
            model.set_submodule(name, QuantLinear(m.in_features, m.out_features, m.bias is not None, scheme,
                                                  device="meta", bias_dtype=m.weight.dtype))
    return model


def scheme_of(model: nn.Module) -> QuantScheme | None:
    """The scheme of a quantized model (None when it has no QuantLinear layers)."""
    schemes = {m.scheme for m in model.modules() if isinstance(m, QuantLinear)}
    if len(schemes) > 1:
        raise ValueError(f"the model mixes quantization schemes {sorted(map(str, schemes))}; one per model")
    return next(iter(schemes), None)


def _progress(total: int, desc: str, enabled: bool):
    class _Null:
        def update(self, n): pass
        def close(self): pass
    if not enabled:
        return _Null()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Null()
    return tqdm(total=total, desc=desc, unit="layer", leave=False)


def quantize_cli(model: str, to: str = "int8", out: str = "", group: int = -1, asym: bool = False,
                 scale_dtype: str = "", keep_lm_head: bool = False, overwrite: bool = False) -> int:
    """Quantize a checkpoint's weights to int8 or int4 and save it; `from_pretrained` and every command
    load the result straight into quantized layers.

    Weights are read and quantized one tensor at a time, so memory holds the quantized model plus one
    tensor, never the whole float model. The tokenizer and chat template files are copied along.

    Args:
        model: checkpoint directory (bf16 / fp32 / fp16 safetensors) or .gguf file (see gguf.py)
        to: int8 (one scale per output channel) or int4 (groups), or a full spec such as int4:g128:asym
        out: output directory (required; must be empty or absent unless --overwrite)
        group: input columns per scale (int4: a multiple of 32, default 64; int8: 0 = per channel, default)
        asym: int4 with a per-group minimum (q * s + min) instead of symmetric (q - 8) * s
        scale_dtype: bfloat16 or float32 (default: float32 for per-channel int8, bfloat16 for groups)
        keep_lm_head: leave the output projection in its loaded dtype
        overwrite: replace what is in --out

    Examples:
        hybridlm quantize ./jamba-3b --to int4 --group 64 --out ./jamba-3b-int4
        hybridlm quantize ./jamba-3b --to int8 --out ./jamba-3b-int8
        hybridlm generate ./jamba-3b-int4 --prompt "Hello"
    """
    import dataclasses
    import resource
    import shutil
    import time
    from pathlib import Path

    from .checkpoint import load_pretrained
    from .cli import CLIError
    from .summary import fmt_bytes
    if not out:
        raise CLIError("give --out DIR, the directory to write the quantized checkpoint to")
    from .gguf import is_gguf
    src, dst = Path(model), Path(out)
    if not (src / "config.json").is_file() and not (is_gguf(src) and src.is_file()):
        raise CLIError(f"{model} is not a checkpoint directory (no config.json) or .gguf file; quantize a saved "
                       f"checkpoint")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise CLIError(f"{out} is not empty; choose a new directory or pass --overwrite")
    if dst.resolve() == src.resolve():
        raise CLIError("--out must differ from the source checkpoint")
    scheme = QuantScheme.parse(to)
    changes = {}
    if group >= 0:
        changes["group"] = group
    if asym:
        changes["symmetric"] = False
    if scale_dtype:
        changes["scale_dtype"] = scale_dtype
    if keep_lm_head:
        changes["lm_head"] = False
    try:
        scheme = dataclasses.replace(scheme, **changes)
    except ValueError as e:
        raise CLIError(str(e)) from None
    t0 = time.perf_counter()
    m = load_pretrained(src, quantize=scheme)
    loaded = time.perf_counter() - t0
    m.save_pretrained(dst, max_shard_bytes=2 << 30)
    if is_gguf(src):          # the tokenizer and chat template from the file's metadata
        from .tokenizer import load_tokenizer
        load_tokenizer(src).save(dst)
    else:
        for f in src.iterdir():   # tokenizer, its config, chat template, generation config
            if f.is_file() and f.name != "config.json" and not f.name.startswith("model") and f.suffix != ".bin":
                shutil.copy2(f, dst / f.name)
    size = lambda d: (d.stat().st_size if d.is_file() else   # noqa: E731
                      sum(f.stat().st_size for f in Path(d).glob("*.safetensors")))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"quantized {model} -> {out}: {scheme}")
    print(f"  weights {fmt_bytes(size(src))} -> {fmt_bytes(size(dst))}; load+quantize {loaded:.1f} s, "
          f"total {time.perf_counter() - t0:.1f} s, peak RSS {fmt_bytes(rss)}")
    return 0
