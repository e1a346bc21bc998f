"""Equal parameters: each variant's ``match.field`` (the feed-forward width by default) is set so that its
non-embedding parameter count (total, or active per token for MoE variants) is as close as it gets to
the reference variant's; a variant that cannot get within ``match.tolerance`` is refused before any
training (Jamba's ablations compare layouts at equal size; a 5% larger model wins for that reason alone).
"""
from __future__ import annotations

import torch

from ..config import HybridConfig, expand_pattern
from .spec import Spec, Variant


def count_params(cfg: HybridConfig, active: bool = False) -> int:
    """Parameters outside the embedding and the output head (identical across variants of one task),
    total or active per token. Counted with the model's own ``num_params`` on one-layer models of each
    distinct layer symbol, on the meta device (nothing allocated; the matcher calls this often)."""
    from collections import Counter

    from ..model import HybridLM
    def layers(layout: str, n: int) -> int:
        one = cfg.replace(layout=layout, num_hidden_layers=n, vocab_size=1)
        with torch.device("meta"):
            m = HybridLM(one)
        outside = 2 * cfg.hidden_size if not cfg.tie_word_embeddings else cfg.hidden_size  # 1-token emb, head
        return m.num_params(active=active) - outside - cfg.hidden_size

    total = cfg.hidden_size                                         # the final norm
    for sym, n in Counter(cfg.layer_symbols).items():
        # a feed-forward-only layer cannot be a model alone: counted beside a mixer-only one, then without it
        total += n * (layers(sym + "a_", 2) - layers("a_", 1) if sym in "fF" else layers(sym, 1))
    return total


def variant_config(spec: Spec, v: Variant, vocab_size: int, **changes) -> HybridConfig:
    fields = {**spec.model, **v.overrides, "vocab_size": vocab_size, **changes}
    return HybridConfig(layout=v.layout, num_hidden_layers=len(expand_pattern(v.layout)), **fields)


def match_variants(spec: Spec, vocab_size: int) -> dict[str, dict]:
    """Per variant: its config with ``match.field`` adjusted, its parameter counts and the deviation from
    the reference variant. Parameter counts grow monotonically with the field, so a bisection over the
    field's values (integers; multiples of 2 x heads for hidden_size, to keep an even head size) finds
    the closest."""
    ref_v = spec.variant(spec.match_reference)
    ref_cfg = variant_config(spec, ref_v, vocab_size)
    fname = spec.match_field
    if fname not in HybridConfig.__dataclass_fields__:
        raise ValueError(f"match.field {fname!r} is not a HybridConfig field")
    step = ref_cfg.num_attention_heads * 2 if fname == "hidden_size" else 1
    out = {}
    for v in spec.variants:
        cfg = variant_config(spec, v, vocab_size)
        which = v.match if v.match != "none" else "total"
        target = count_params(ref_cfg, active=(which == "active"))
        if v.match != "none" and v.name != ref_v.name:
            def n(x, v=v, which=which):
                return count_params(variant_config(spec, v, vocab_size, **{fname: x * step}), active=(which == "active"))
            lo, hi = 1, max(2, 2 * getattr(cfg, fname) // step)
            while n(hi) < target:
                hi *= 2
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if n(mid) <= target else (lo, mid)
            best = min((lo, hi), key=lambda x: abs(n(x) - target))
            cfg = variant_config(spec, v, vocab_size, **{fname: best * step})
        total, active = count_params(cfg), count_params(cfg, active=True)
        got = active if which == "active" else total
        dev = got / target - 1
        if v.match != "none" and abs(dev) > spec.match_tolerance:
            raise ValueError(f"variant {v.name!r}: the closest {fname} ({getattr(cfg, fname)}) gives {got:,} "
                             f"{which} parameters, {dev:+.1%} from the reference's {target:,} (tolerance "
                             f"{spec.match_tolerance:.0%}); match on another [match] field (intermediate_size is the "
                             f"finest), widen match.tolerance, or set match = \"none\" for this variant")
        out[v.name] = {"config": cfg, "params": total, "active_params": active, "matched_on": which,
                       "deviation": dev, "field_value": getattr(cfg, fname)}
    return out
