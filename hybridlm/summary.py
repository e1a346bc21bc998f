"""Describe a model: its layer layout, parameter counts, and what it costs in memory at a context length.

The memory plan is the hybrid's selling point made concrete (Jamba paper, Table 1): only attention
layers keep a KV cache that grows with context; Mamba layers keep a fixed-size state.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import HybridConfig

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def parse_bytes(text: str) -> int:
    """'8GB', '8GiB', '512M', '1e9' -> bytes (powers of 1024 for K/M/G/T with or without 'i')."""
    import re
    m = re.fullmatch(r"\s*([\d.e+]+)\s*([KMGT]?)(i?B?)\s*", text, re.I)
    try:
        value = float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " ") if m else None
    except ValueError:          # '1.2.3', 'e'
        value = None
    if value is None:
        raise ValueError(f"cannot read memory size {text!r}; write e.g. 8GB, 512MiB or 2.5G")
    if not 0 <= value < 2 ** 60:     # 1e400 is inf, and no machine has an exabyte
        raise ValueError(f"memory size {text!r} is out of range; write e.g. 8GB, 512MiB or 2.5G")
    return int(value)


def layout_diagram(cfg: HybridConfig) -> str:
    """One row per layer: index, pattern symbol, mixer, feed-forward ('-' where the layer has none)."""
    legend = "m/M mamba, s/S mamba-2, a/A attention, w/W local; upper case = MoE"
    if cfg.single_sublayer:
        legend += "; s_ a_ ... mixer alone, f/F feed-forward alone"
    rows = [f"layout {cfg.pattern}  ({legend})"]
    mlp = "MLP" if cfg.mlp_hidden_act == "silu" else f"MLP {cfg.mlp_hidden_act}"
    width = max(map(len, cfg.layer_symbols))
    for i in range(cfg.num_hidden_layers):
        mixer = {"mamba": "Mamba    ", "mamba2": "Mamba-2  ", "attention": "ATTENTION",
                 "local": "LOCAL-ATT", None: "-        "}[cfg.mixer(i)]
        ffn = "-" if not cfg.has_feed_forward(i) else \
            f"MoE {cfg.num_experts}x top-{cfg.num_experts_per_tok}" if cfg.is_moe(i) else mlp
        rows.append(f"  {i:3d}  {cfg.layer_symbols[i]:{width}s}  {mixer} | {ffn}")
    return "\n".join(rows)


def param_counts(cfg: HybridConfig) -> dict[str, int]:
    """Total and per-token active parameters, computed from the config alone (no allocation)."""
    import torch

    from .model import HybridLM
    with torch.device("meta"):
        m = HybridLM(cfg)
    return {"total": m.num_params(), "active": m.num_params(active=True)}


# The process around the model: Python with torch and hybridlm imported and the kernel library loaded
# (0.22 GiB RSS measured after `import hybridlm` on Linux x86-64, torch 2.13 CPU), rounded up.
RUNTIME_BASE = 256 * 2**20


@dataclass
class MemoryPlan:
    weights: int
    kv: int
    conv: int
    ssm: int
    runtime: int = 0    # the process and the prefill's working buffers (``runtime_bytes``; estimated)

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.conv + self.ssm + self.runtime


def runtime_bytes(cfg: HybridConfig, context: int, batch: int = 1, weight_dtype: str = "bfloat16",
                  quantize=None) -> int:
    """What a run holds besides weights and cache, estimated: ``RUNTIME_BASE`` plus the working buffers of
    one prefill chunk (generate.DEFAULT_PREFILL_CHUNK tokens per row, or the context if shorter): the fp32
    activations of its widest layer (in_proj's or the MLP's outputs, residual and norm buffers), and, for
    weights not in fp32 (bf16, quantized), the fp32 copy of the largest linear weight a prefill GEMM
    multiplies (on CPUs without fast bf16 matmuls, and for dequantized weights). The 3B shape's peak RSS
    was 3-9% above weights + cache before this term was counted (benchmarks/results/quant_bench.md)."""
    from .generate import DEFAULT_PREFILL_CHUNK
    rows = batch * min(max(context, 1), DEFAULT_PREFILL_CHUNK)
    d_in = max(cfg.d_inner, getattr(cfg, "mamba2_d_inner", 0) or 0)
    ff = max(cfg.intermediate_size * max(1, min(cfg.num_experts_per_tok, cfg.num_experts)),
             getattr(cfg, "shared_expert_intermediate_size", 0) or 0)
    activations = rows * 4 * (2 * d_in + 2 * ff + 4 * cfg.hidden_size)
    widest = cfg.hidden_size * max(2 * d_in, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_size)
    upcast = 4 * widest if (weight_dtype != "float32" or quantize) else 0
    ssd = 0
    if "s" in cfg.pattern.lower():
        # Mamba-2's chunked scan (mamba2.ssd_chunked): ~3 fp32 [b, chunks, heads, Q, Q] temporaries at once
        # (the decay mask, its exp, the masked C B^T), a block of chunks of at most _BLOCK_ELEMS elements
        from .mamba2 import _BLOCK_ELEMS
        q = cfg.mamba2_chunk_size
        per_chunk = batch * cfg.mamba2_n_heads * q * q
        chunks = min(max(1, _BLOCK_ELEMS // per_chunk), -(-rows // (batch * q)))
        ssd = 3 * 4 * per_chunk * chunks
    return RUNTIME_BASE + activations + upcast + ssd


def weight_bytes(cfg: HybridConfig, dtype: str = "bfloat16", quantize=None) -> int:
    """Bytes of the weights in ``dtype``, with the linear layers quantized by ``quantize`` (a quant.py
    scheme or its spelling such as "int4") when given: packed integers and scales at their own sizes."""
    import torch

    from .model import HybridLM
    from .quant import QuantScheme, quantize_structure
    with torch.device("meta"):
        m = HybridLM(cfg)
    if quantize:
        quantize_structure(m, QuantScheme.parse(quantize))
    return (sum(p.numel() for p in m.parameters()) * _BYTES[dtype]
            + sum(b.numel() * b.element_size() for b in m.buffers()))


def memory_plan(cfg: HybridConfig, context: int, batch: int = 1, weight_dtype: str = "bfloat16",
                cache_dtype: str = "bfloat16", quantize=None, weights: int | None = None) -> MemoryPlan:
    """Bytes of weights (``weight_bytes``: ``quantize``, a quant.py scheme, plans quantized linear
    layers), KV cache (attention layers), conv and SSM state (Mamba layers, SSM in fp32). ``weights``
    skips counting the weight bytes again (callers that plan many contexts pass it)."""
    import torch

    from .cache import Cache
    # the cache as the model allocates it, on the meta device (shapes only): one source for its layout
    n = Cache.allocate(cfg, batch, context, getattr(torch, cache_dtype), device="meta").nbytes()
    kv, conv, ssm = n["kv"], n["conv"], n["ssm"]
    return MemoryPlan(weight_bytes(cfg, weight_dtype, quantize) if weights is None else weights, kv, conv, ssm,
                      runtime_bytes(cfg, context, batch, weight_dtype, quantize))


def transformer_twin(cfg: HybridConfig) -> HybridConfig:
    """The pure transformer of the same width, depth and MoE layout (every layer attention), the
    comparison Jamba's paper makes for KV-cache size."""
    # every mixer becomes attention; feed-forward-only layers ('f'/'F') and mixer-only ones ('s_') stay so
    return cfg.replace(layout="".join(sym if sym in "fF" else ("A" if sym.isupper() else "a") + sym[1:]
                                      for sym in cfg.layer_symbols))


def max_context(cfg: HybridConfig, budget: int, batch: int = 1, **kw) -> int:
    """Longest context whose weights + cache fit ``budget`` bytes (0 if the weights alone do not)."""
    kw.setdefault("weights", weight_bytes(cfg, kw.get("weight_dtype", "bfloat16"), kw.get("quantize")))
    if memory_plan(cfg, 0, batch, **kw).total > budget:
        return 0
    lo, hi = 0, 1 << 40
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if memory_plan(cfg, mid, batch, **kw).total <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def inspect_cmd(model: str, dtype: str = "auto", quantize: str = "") -> int:
    """Show a model's layer layout, total and active parameters, and weight bytes per dtype (and quantized).

    Args:
        model: checkpoint directory, .gguf file (also shows how each tensor loads), or preset name (tiny,
            bench-88m, jamba-v0.1, jamba-reasoning-3b, ...)
        dtype: accepted for symmetry with other commands; counts are shown for every dtype
        quantize: also show the weight bytes under this scheme (int8, int4, int4:g32, ...); a quantized
            checkpoint shows its own; for a GGUF file, the scheme it loads into (bf16: dequantized)

    Examples:
        hybridlm inspect bench-88m
        hybridlm inspect ./my-jamba-checkpoint
        hybridlm inspect jamba-reasoning-3b --quantize int4
        hybridlm inspect ./jamba-reasoning-3b-Q4_K_M.gguf
    """
    from .checkpoint import load_model
    from .gguf import gguf_plan, is_gguf
    from .quant import scheme_of
    rows = None
    if is_gguf(model):            # the plan gives the config, the scheme and each tensor's path at once
        cfg, stored, rows = gguf_plan(model, quantize or None)
    else:
        meta = load_model(model, device="meta", quantize=quantize or None)
        cfg, stored = meta.config, scheme_of(meta)
    counts = param_counts(cfg)
    kinds = [cfg.mixer(i) for i in range(cfg.num_hidden_layers)]
    n_attn = sum(k in ("attention", "local") for k in kinds)
    n_mamba = sum(k in ("mamba", "mamba2") for k in kinds)
    n_moe = sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers))
    ff_only = kinds.count(None)
    no_ff = sum(not cfg.has_feed_forward(i) for i in range(cfg.num_hidden_layers))
    alone = f"; {ff_only} feed-forward only, {no_ff} without a feed-forward" if ff_only or no_ff else ""
    print(f"model {model}: {cfg.num_hidden_layers} layers ({n_attn} attention, {n_mamba} Mamba{alone}; "
          f"{n_moe} MoE), hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
    print(layout_diagram(cfg))
    print(f"parameters: total {counts['total']:,}   active per token {counts['active']:,}")
    print("weight bytes: " + "   ".join(f"{k} {fmt_bytes(counts['total'] * b)}" for k, b in _BYTES.items()))
    if stored is not None:
        print(f"quantized {'' if quantize else '(as stored) '}{stored}: weight bytes "
              f"{fmt_bytes(weight_bytes(cfg, 'bfloat16', stored))} (other parameters in bfloat16)")
    if rows is not None:
        gguf_report(rows)
    return 0


def gguf_report(rows: list[tuple[str, str, str]]):
    """How each tensor of a GGUF file loads (the rows of gguf.gguf_plan), one line per kind of tensor
    across layers."""
    import re
    groups: dict[tuple[str, str, str], list[str]] = {}
    for name, typ, how in rows:
        m = re.match(r"blk\.(\d+)\.(.*)", name)
        key = ("blk.*." + m.group(2) if m else name, typ, how)
        groups.setdefault(key, []).append(m.group(1) if m else "")
    print(f"GGUF tensors ({len(rows)}), as they load:")
    for (name, typ, how), layers in groups.items():
        where = f" (layers {_ranges([int(i) for i in layers])})" if layers[0] else ""
        print(f"  {name:26s} {typ:6s} {how}{where}")


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out, start = [], None
    for i, x in enumerate(xs):
        if start is None:
            start = x
        if i + 1 == len(xs) or xs[i + 1] != x + 1:
            out.append(f"{start}-{x}" if x != start else f"{x}")
            start = None
    return ",".join(out)


def plan_cmd(model: str, context: int = 262144, batch: int = 1, budget: str = "", dtype: str = "bfloat16",
             quantize: str = "") -> int:
    """Memory plan: weights, KV cache and Mamba state at a context length, beside a pure transformer
    of the same size, and the longest context that fits a memory budget.

    Args:
        model: checkpoint directory or preset name
        context: context length in tokens
        batch: sequences held at once
        budget: memory budget such as 8GB; prints the longest context that fits
        dtype: weight and KV-cache dtype (bfloat16, float16, float32)
        quantize: plan the linear layers quantized: int8, int4, or a spec such as int4:g32 (empty: the
            checkpoint's own scheme, or none)

    Examples:
        hybridlm plan bench-88m --context 262144
        hybridlm plan jamba-v0.1 --context 262144 --budget 80GB
        hybridlm plan jamba-reasoning-3b --context 32768 --quantize int4
    """
    from .checkpoint import load_model
    if dtype not in _BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_BYTES)}")
    from .quant import scheme_of
    meta = load_model(model, device="meta", quantize=quantize or None)
    cfg = meta.config
    twin = transformer_twin(cfg)
    quantize = scheme_of(meta)
    kw = dict(weight_dtype=dtype, cache_dtype=dtype)
    rows = [("hybrid (" + cfg.pattern[:16] + ("..." if len(cfg.pattern) > 16 else "") + ")", cfg),
            ("pure transformer", twin)]
    if quantize:
        from .quant import QuantScheme
        kw["quantize"] = QuantScheme.parse(quantize)
    print(f"memory at context {context:,}, batch {batch}, {dtype}" + (f", weights {kw['quantize']}" if quantize
                                                                       else "") + ":")
    print(f"  {'model':28s} {'weights':>11s} {'KV cache':>11s} {'conv state':>11s} {'SSM state':>11s} "
          f"{'runtime':>11s} {'total':>11s}")
    for name, c in rows:
        p = memory_plan(c, context, batch, **kw)
        print(f"  {name:28s} {fmt_bytes(p.weights):>11s} {fmt_bytes(p.kv):>11s} {fmt_bytes(p.conv):>11s} "
              f"{fmt_bytes(p.ssm):>11s} {fmt_bytes(p.runtime):>11s} {fmt_bytes(p.total):>11s}")
    print("  runtime: Python and torch, and one prefill chunk's working buffers (estimated)")
    hk, tk = memory_plan(cfg, context, batch, **kw).kv, memory_plan(twin, context, batch, **kw).kv
    if hk:
        print(f"  KV cache: the hybrid needs {tk / hk:.1f}x less than the pure transformer")
    if budget:
        b = parse_bytes(budget)
        for name, c in rows:
            n = max_context(c, b, batch, **kw)
            if n == 0:
                what = "weights alone do not fit"
            elif n >= (1 << 40):
                what = "unbounded (no growing KV cache)"
            else:
                what = f"{n:,} tokens"
            print(f"  longest context within {fmt_bytes(b)}: {name}: {what}")
    return 0
