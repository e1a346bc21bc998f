"""transformers' Mamba-2 hybrids: their config.json fields and tensor names, mapped onto ours.

    granitemoehybrid  IBM Granite 4.0-H (GraniteMoeHybridForCausalLM): Mamba-2 + attention without
                      positional encoding (RoPE optional), a MoE with a shared SwiGLU expert on every layer
                      (or the shared expert alone: num_local_experts 0), muP-style multipliers
    bamba             IBM Bamba (BambaForCausalLM): Jamba's layer structure with Mamba-2 mixers, a dense
                      SwiGLU MLP, RoPE on half of each attention head (partial_rotary_factor 0.5)
    nemotron_h        NVIDIA Nemotron-H (NemotronHForCausalLM): every layer holds one sublayer, by
                      ``hybrid_override_pattern`` / ``layers_block_type``: Mamba-2 (M), attention without
                      positional encoding (*), a relu^2 MLP without a gate (-), or a MoE (E: relu^2 experts,
                      DeepSeek-V3's sigmoid router, a relu^2 shared expert; latent projections refused);
                      our layer i is its layer i (``s_``, ``a_``, ``f``, ``F``)

Reading: ``config_from_family`` turns a config.json into a ``HybridConfig`` (``family`` set), and
``hub_to_ours`` renames (and splits fused) tensors as the loader streams them. Writing: ``config_to_family``
and ``ours_to_hub`` produce the same format back, so transformers loads our files. Field names and
defaults are those of transformers 5.x's configuration classes; tensor names are what its
``save_pretrained`` writes (Granite's legacy ``input_linear``/``output_linear``/``router.layer`` names,
which IBM's published checkpoints use too; the in-memory ``experts.gate_up_proj`` names are read as well).
"""
from __future__ import annotations

import math
import re

import torch

FAMILIES = ("granitemoehybrid", "bamba", "nemotron_h")
REFUSED: dict[str, str] = {}

_ARCH = {"granitemoehybrid": "GraniteMoeHybridForCausalLM", "bamba": "BambaForCausalLM",
         "nemotron_h": "NemotronHForCausalLM"}
# Nemotron-H: hybrid_override_pattern symbols, layers_block_type names (and their legacy spellings), ours
_NEMOTRON_SYMBOL = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_NEMOTRON_OURS = {"linear_attention": "s_", "mamba": "s_", "full_attention": "a_", "attention": "a_", "mlp": "f",
                  "moe": "F"}
_NEMOTRON_TYPE = {"s_": "linear_attention", "a_": "full_attention", "f": "mlp", "F": "moe"}
# NemotronHConfig's older field names, which it still reads
_NEMOTRON_LEGACY = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
                    "mamba_dt_min": "time_step_min", "mamba_dt_max": "time_step_max",
                    "mamba_dt_limit": "time_step_limit", "mamba_dt_init_floor": "time_step_floor",
                    "mamba_conv_bias": "use_conv_bias", "mamba_chunk_size": "chunk_size",
                    "layer_types": "layers_block_type", "num_local_experts": "n_routed_experts"}
_MAMBA2 = ("mamba", "linear_attention")            # layer_types spellings (legacy, transformers 5)
_ATTENTION = ("attention", "full_attention")

# transformers' defaults, for fields a config.json may leave out
_DEFAULTS = {
    "granitemoehybrid": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=None, max_position_embeddings=2048,
                             initializer_range=0.02, rms_norm_eps=1e-6, pad_token_id=None, bos_token_id=1,
                             eos_token_id=2, tie_word_embeddings=False, embedding_multiplier=1.0,
                             logits_scaling=1.0, residual_multiplier=1.0, attention_multiplier=1.0,
                             num_local_experts=8, num_experts_per_tok=2, router_aux_loss_coef=0.001,
                             shared_intermediate_size=1024, position_embedding_type=None, layer_types=None,
                             mamba_n_heads=128, mamba_n_groups=1, mamba_d_state=256, mamba_d_head="auto",
                             mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256, mamba_conv_bias=True,
                             mamba_proj_bias=False, time_step_limit=(0.0, math.inf), attention_bias=False),
    "bamba": dict(vocab_size=128000, tie_word_embeddings=False, hidden_size=4096, intermediate_size=14336,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, initializer_range=0.02,
                  rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  max_position_embeddings=262144, attn_layer_indices=None, mamba_n_heads=128, mamba_d_head="auto",
                  mamba_n_groups=1, mamba_d_state=256, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=256,
                  mamba_conv_bias=True, mamba_proj_bias=False, time_step_limit=(0.0, math.inf),
                  attention_bias=False, mlp_bias=False),
    "nemotron_h": dict(vocab_size=131072, hidden_size=4096, layers_block_type=None, tie_word_embeddings=False,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, num_attention_heads=32, num_key_value_heads=8,
                       head_dim=128, max_position_embeddings=4096, attention_bias=False, sliding_window=None,
                       intermediate_size=21504, mlp_hidden_act="relu2", mlp_bias=False, ssm_state_size=128,
                       mamba_num_heads=128, mamba_head_dim=64, mamba_hidden_act="silu", n_groups=8, conv_kernel=4,
                       expand=2, time_step_min=0.001, time_step_max=0.1, time_step_floor=1e-4, use_conv_bias=True,
                       chunk_size=128, use_bias=False, initializer_range=0.02, layer_norm_epsilon=1e-5,
                       n_routed_experts=8, moe_intermediate_size=7688, moe_shared_expert_intermediate_size=7688,
                       moe_latent_size=None, num_experts_per_tok=2, routed_scaling_factor=1.0, n_group=1,
                       topk_group=1, norm_topk_prob=True),
}


def _infinite(v):
    """A JSON number, or transformers' {"__float__": "Infinity"} spelling of a non-finite one."""
    if isinstance(v, dict) and set(v) == {"__float__"}:
        return float(v["__float__"])
    return v


def _dt_limit(v, where: str):
    if v is None:
        return (0.0, math.inf)
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ValueError(f"{where}: time_step_limit must be [lo, hi], got {v!r}")
    return tuple(float(_infinite(x)) for x in v)


def config_from_family(d: dict):
    """A HybridConfig from a granitemoehybrid or bamba config.json (``d``), or a ValueError naming what
    hybridlm does not support (or what is malformed: checkpoints come from the internet)."""
    mt = d["model_type"]
    if mt in REFUSED:
        raise ValueError(f"unsupported model_type {mt!r}: {REFUSED[mt]}")
    if mt == "nemotron_h":
        d = {_NEMOTRON_LEGACY.get(k, k): v for k, v in d.items()}
        if "head_dim" not in d and "attention_head_dim" in d:    # NVIDIA's remote-code configs spell it so
            d["head_dim"] = d["attention_head_dim"]
    try:
        if mt == "nemotron_h":
            return _from_nemotron({**_DEFAULTS[mt], **d})
        return _from_family(mt, {**_DEFAULTS[mt], **d})
    except (TypeError, KeyError, ZeroDivisionError, OverflowError) as e:     # a field of the wrong type or value
        raise ValueError(f"malformed {mt} config ({type(e).__name__}: {e}); check its layer_types / "
                         f"attn_layer_indices, mamba_* and rope fields") from None


def _from_family(mt: str, f: dict):
    from .config import MAX_LAYERS, HybridConfig
    n = f["num_hidden_layers"]
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_LAYERS:   # before any list is built
        raise ValueError(f"num_hidden_layers must be an integer from 1 to {MAX_LAYERS}, got {n!r}")
    if f.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {f['hidden_act']!r}: {mt} models use 'silu'")
    for k in ("attention_bias", "mlp_bias"):
        if f.get(k):
            raise ValueError(f"unsupported {k}=true: hybridlm's {mt} layers have no attention/MLP biases")
    heads, hidden = f["mamba_n_heads"], f["hidden_size"]
    d_head = f["mamba_d_head"]
    if d_head == "auto":
        d_head = f["mamba_expand"] * hidden // heads
    kw = dict(vocab_size=f["vocab_size"], hidden_size=hidden, num_attention_heads=f["num_attention_heads"],
              num_key_value_heads=f["num_key_value_heads"] or f["num_attention_heads"],
              rms_norm_eps=f["rms_norm_eps"], tie_word_embeddings=f["tie_word_embeddings"],
              initializer_range=f["initializer_range"], pad_token_id=f["pad_token_id"],
              bos_token_id=f["bos_token_id"], eos_token_id=f["eos_token_id"],
              max_position_embeddings=f["max_position_embeddings"],
              mamba_d_conv=f["mamba_d_conv"], mamba_conv_bias=f["mamba_conv_bias"],
              mamba_proj_bias=f["mamba_proj_bias"], mamba2_n_heads=heads, mamba2_head_dim=d_head,
              mamba2_n_groups=f["mamba_n_groups"], mamba2_d_state=f["mamba_d_state"],
              mamba2_chunk_size=f["mamba_chunk_size"], mamba2_dt_limit=_dt_limit(f["time_step_limit"], mt),
              family=mt)
    if f.get("head_dim") is not None:
        kw["head_dim"] = f["head_dim"]
    rope = f.get("rope_parameters") or {"rope_type": "default", "rope_theta": f.get("rope_theta", 10000.0)}
    if mt == "granitemoehybrid":
        types = f["layer_types"] or ["mamba"] * f["num_hidden_layers"]
        n_exp = f["num_local_experts"]
        if n_exp == 1:
            raise ValueError("unsupported num_local_experts=1 in a granitemoehybrid config (a router over one "
                             "expert); use 0 (shared MLP only) or >= 2")
        kw.update(embedding_multiplier=f["embedding_multiplier"], residual_multiplier=f["residual_multiplier"],
                  attention_multiplier=f["attention_multiplier"], logits_scaling=f["logits_scaling"],
                  router_aux_loss_coef=f["router_aux_loss_coef"])
        if n_exp:
            # transformers' Granite router: softmax over the top-k logits = the top-k softmax renormalised
            kw.update(num_experts=n_exp, num_experts_per_tok=f["num_experts_per_tok"],
                      intermediate_size=f["intermediate_size"], router_renormalize=True,
                      shared_expert_intermediate_size=f["shared_intermediate_size"])
        else:                       # the shared MLP alone: a dense SwiGLU feed-forward
            kw.update(num_experts=1, num_experts_per_tok=1, intermediate_size=f["shared_intermediate_size"])
        pet = f["position_embedding_type"]
        if pet not in (None, "nope", "rope"):   # published Granite 4.0-H configs say "nope"
            raise ValueError(f"unsupported position_embedding_type {pet!r}: Granite 4.0-H uses 'nope' (none) "
                             f"or 'rope'")
        if pet == "rope":
            kw.update(_rope(rope, mt, default_partial=1.0))
    else:
        attn = f["attn_layer_indices"] or []
        types = ["attention" if i in attn else "mamba" for i in range(f["num_hidden_layers"])]
        kw.update(intermediate_size=f["intermediate_size"], num_experts=1, num_experts_per_tok=1)
        kw.update(_rope(rope, mt, default_partial=0.5))      # BambaConfig sets 0.5 unless told otherwise
    if not isinstance(types, list) or len(types) != f.get("num_hidden_layers", len(types)):
        raise ValueError(f"{mt}: layer_types must list one type per layer ({f.get('num_hidden_layers')}), got "
                         f"{types!r:.120}")
    bad = [t for t in types if t not in _MAMBA2 + _ATTENTION][:5]
    if bad:
        raise ValueError(f"unsupported layer types {bad}: {mt} layers are 'mamba'/'linear_attention' or "
                         f"'attention'/'full_attention'")
    sym = "".join("s" if t in _MAMBA2 else "a" for t in types)
    kw["layout"] = sym.upper() if kw["num_experts"] > 1 else sym
    kw["num_hidden_layers"] = len(types)
    return HybridConfig(**kw)


def _from_nemotron(f: dict):
    """A nemotron_h config.json (legacy names already renamed) as a HybridConfig: one of our layers per layer."""
    from .config import MAX_LAYERS, HybridConfig
    types = f["layers_block_type"]
    if types is None and "hybrid_override_pattern" in f:
        pattern = f["hybrid_override_pattern"]
        if not isinstance(pattern, str) or not set(pattern) <= set(_NEMOTRON_SYMBOL):
            raise ValueError(f"nemotron_h: hybrid_override_pattern must be a string of M (Mamba-2), * (attention), "
                             f"- (MLP) and E (MoE), got {pattern!r:.120}")
        types = [_NEMOTRON_SYMBOL[c] for c in pattern]
    if types is None:                          # NemotronHConfig's own default
        types = ["linear_attention", "moe", "full_attention", "mlp"]
    if not isinstance(types, list) or not 1 <= len(types) <= MAX_LAYERS:
        raise ValueError(f"nemotron_h: layers_block_type must list 1 to {MAX_LAYERS} layer types, got {types!r:.120}")
    bad = sorted({str(t) for t in types if t not in _NEMOTRON_OURS})[:5]
    if bad:
        raise ValueError(f"nemotron_h: unknown layer types {bad}; they are 'linear_attention' (Mamba-2), "
                         f"'full_attention', 'mlp' or 'moe'")
    moe = {}
    if "moe" in types:
        if f["moe_latent_size"] is not None:
            raise ValueError("unsupported moe_latent_size in a nemotron_h config: hybridlm's experts read the hidden "
                             "state itself (no latent down/up projections)")
        if not isinstance(f["n_routed_experts"], int) or f["n_routed_experts"] < 2:
            raise ValueError(f"nemotron_h: a config with MoE layers ('moe' / 'E') needs n_routed_experts >= 2, got "
                             f"{f['n_routed_experts']!r}")
        moe = dict(num_experts=f["n_routed_experts"], num_experts_per_tok=f["num_experts_per_tok"],
                   moe_intermediate_size=f["moe_intermediate_size"],
                   shared_expert_intermediate_size=f["moe_shared_expert_intermediate_size"], router_scoring="sigmoid",
                   n_group=f["n_group"], topk_group=f["topk_group"],
                   routed_scaling_factor=float(f["routed_scaling_factor"]), router_renormalize=f["norm_topk_prob"])
    for k, want in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
        if f[k] != want:
            raise ValueError(f"unsupported {k} {f[k]!r}: hybridlm implements Nemotron-H's {want!r}")
    for k in ("attention_bias", "mlp_bias"):
        if f[k]:
            raise ValueError(f"unsupported {k}=true: hybridlm's nemotron_h layers have no attention/MLP biases")
    if f["sliding_window"] is not None:
        raise ValueError("unsupported sliding_window in a nemotron_h config: its attention is full")
    heads = f["num_attention_heads"]
    # transformers' NemotronHMamba2Mixer clamps dt from below at time_step_min (time_step_limit is not read)
    return HybridConfig(
        vocab_size=f["vocab_size"], hidden_size=f["hidden_size"], intermediate_size=f["intermediate_size"],
        num_hidden_layers=len(types), num_attention_heads=heads, num_key_value_heads=f["num_key_value_heads"] or heads,
        head_dim=f["head_dim"] if f["head_dim"] is not None else f["hidden_size"] // heads,
        rms_norm_eps=f["layer_norm_epsilon"], tie_word_embeddings=f["tie_word_embeddings"],
        initializer_range=f["initializer_range"], pad_token_id=f["pad_token_id"], bos_token_id=f["bos_token_id"],
        eos_token_id=f["eos_token_id"], max_position_embeddings=f["max_position_embeddings"],
        **(moe or dict(num_experts=1, num_experts_per_tok=1)), mlp_hidden_act="relu2",
        mamba_d_conv=f["conv_kernel"], mamba_conv_bias=f["use_conv_bias"], mamba_proj_bias=f["use_bias"],
        mamba2_n_heads=f["mamba_num_heads"], mamba2_head_dim=f["mamba_head_dim"], mamba2_n_groups=f["n_groups"],
        mamba2_d_state=f["ssm_state_size"], mamba2_chunk_size=f["chunk_size"],
        mamba2_dt_limit=(float(f["time_step_min"]), math.inf),
        layout="".join(_NEMOTRON_OURS[t] for t in types), family="nemotron_h")


def _to_nemotron(cfg) -> dict:
    """config.json contents of a nemotron_h checkpoint (NemotronHConfig's field names)."""
    syms = cfg.layer_symbols
    bad = sorted(set(syms) - set(_NEMOTRON_TYPE))
    if bad:
        raise ValueError(f"a nemotron_h checkpoint's layers hold one sublayer each: 's_' (Mamba-2), 'a_' (attention), "
                         f"'f' (MLP); this layout has {bad} ({cfg.pattern!r:.80}): use family=None (hybridlm's own "
                         f"format)")
    moe = "F" in syms
    lo, hi = cfg.mamba2_dt_limit
    different = [what for what, ok in (
        ("mlp_hidden_act 'relu2'", cfg.mlp_hidden_act == "relu2"), ("no RoPE", cfg.rope_theta is None),
        ("no multipliers", (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.logits_scaling) == (1, 1, 1)
         and cfg.attention_multiplier is None),
        ("a shared expert on its MoE layers" if moe else "no shared expert",
         bool(cfg.shared_expert_intermediate_size) == moe),
        ("a sigmoid router" if moe else "no router", (cfg.router_scoring == "sigmoid") == moe),
        ("a gated norm per B/C group", cfg.mamba2_norm_grouped), ("no upper dt limit", math.isinf(hi))) if not ok]
    if different:
        raise ValueError(f"a nemotron_h checkpoint has {', '.join(different)}; this config differs: save it with "
                         f"family=None (hybridlm's own format)")
    types = [_NEMOTRON_TYPE[s] for s in syms]
    experts = dict(n_routed_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                   moe_intermediate_size=cfg.moe_intermediate_size or cfg.intermediate_size,
                   moe_shared_expert_intermediate_size=cfg.shared_expert_intermediate_size, moe_latent_size=None,
                   n_group=cfg.n_group, topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor,
                   norm_topk_prob=cfg.router_renormalize) if moe else {}
    return experts | dict(model_type="nemotron_h", architectures=[_ARCH["nemotron_h"]], vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size, layers_block_type=types,
                hybrid_override_pattern="".join({v: k for k, v in _NEMOTRON_SYMBOL.items()}[t] for t in types),
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_size,
                max_position_embeddings=cfg.max_position_embeddings, attention_bias=False, mlp_bias=False,
                intermediate_size=cfg.intermediate_size, mlp_hidden_act="relu2", mamba_hidden_act="silu",
                ssm_state_size=cfg.mamba2_d_state, mamba_num_heads=cfg.mamba2_n_heads,
                mamba_head_dim=cfg.mamba2_head_dim, n_groups=cfg.mamba2_n_groups, conv_kernel=cfg.mamba_d_conv,
                expand=max(1, cfg.mamba2_d_inner // cfg.hidden_size), chunk_size=cfg.mamba2_chunk_size,
                time_step_min=lo, time_step_limit=[lo, {"__float__": "Infinity"}],
                use_conv_bias=cfg.mamba_conv_bias, use_bias=cfg.mamba_proj_bias, layer_norm_epsilon=cfg.rms_norm_eps,
                tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
                pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)


def _rope(rope: dict, mt: str, default_partial: float) -> dict:
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported rope_parameters {rope!r}: hybridlm implements {mt}'s default RoPE only")
    return dict(rope_theta=float(rope.get("rope_theta", 10000.0)),
                partial_rotary_factor=float(rope.get("partial_rotary_factor", default_partial)))


def config_to_family(cfg) -> dict:
    """config.json contents in ``cfg.family``'s transformers format."""
    mt = cfg.family
    if mt == "nemotron_h":
        return _to_nemotron(cfg)
    p = cfg.pattern
    types = ["mamba" if c.lower() == "s" else "attention" for c in p]
    moe = {c.isupper() for c in p}
    if any(c.lower() not in "sa" for c in p) or len(moe) > 1 or (mt == "bamba" and True in moe):
        raise ValueError(f"a {mt} checkpoint has Mamba-2 ('s') and attention ('a') layers only, "
                         f"{'all dense' if mt == 'bamba' else 'all dense or all MoE'}; this layout is {p!r}: "
                         f"use family=None (hybridlm's own format)")
    lo, hi = cfg.mamba2_dt_limit
    d = dict(model_type=mt, architectures=[_ARCH[mt]], vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
             num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
             num_key_value_heads=cfg.num_key_value_heads, hidden_act="silu", rms_norm_eps=cfg.rms_norm_eps,
             tie_word_embeddings=cfg.tie_word_embeddings, initializer_range=cfg.initializer_range,
             pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
             max_position_embeddings=cfg.max_position_embeddings, attention_bias=False,
             mamba_n_heads=cfg.mamba2_n_heads, mamba_d_head=cfg.mamba2_head_dim, mamba_n_groups=cfg.mamba2_n_groups,
             mamba_d_state=cfg.mamba2_d_state, mamba_d_conv=cfg.mamba_d_conv,
             mamba_expand=cfg.mamba2_d_inner // cfg.hidden_size, mamba_chunk_size=cfg.mamba2_chunk_size,
             mamba_conv_bias=cfg.mamba_conv_bias, mamba_proj_bias=cfg.mamba_proj_bias,
             time_step_limit=[lo, {"__float__": "Infinity"} if math.isinf(hi) else hi])
    if cfg.head_dim is not None:
        d["head_dim"] = cfg.head_dim
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": cfg.partial_rotary_factor}
    if mt == "granitemoehybrid":
        moe = p.isupper()
        d.update(layer_types=types, embedding_multiplier=cfg.embedding_multiplier,
                 residual_multiplier=cfg.residual_multiplier, logits_scaling=cfg.logits_scaling,
                 attention_multiplier=(cfg.attention_multiplier if cfg.attention_multiplier is not None
                                       else cfg.head_size ** -0.5),
                 num_local_experts=cfg.num_experts if moe else 0,
                 # dense: 0 routed experts used (llama.cpp's loader asserts experts used <= experts)
                 num_experts_per_tok=cfg.num_experts_per_tok if moe else 0,
                 intermediate_size=cfg.intermediate_size, router_aux_loss_coef=cfg.router_aux_loss_coef,
                 shared_intermediate_size=(cfg.shared_expert_intermediate_size if moe else cfg.intermediate_size),
                 position_embedding_type=None if cfg.rope_theta is None else "rope")
        if moe and not (cfg.shared_expert_intermediate_size and cfg.router_renormalize):
            raise ValueError("a granitemoehybrid MoE has a shared expert and renormalised top-k weights; set "
                             "shared_expert_intermediate_size and router_renormalize=true, or family=None")
        if not moe and cfg.shared_expert_intermediate_size:
            raise ValueError("a dense granitemoehybrid layer is its shared MLP alone; unset "
                             "shared_expert_intermediate_size (the MLP is intermediate_size wide), or family=None")
        if cfg.rope_theta is not None:
            d["rope_parameters"] = rope
    else:
        if cfg.rope_theta is None or cfg.shared_expert_intermediate_size or \
                (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.logits_scaling) != (1, 1, 1) or \
                cfg.attention_multiplier is not None:
            raise ValueError("a bamba checkpoint has RoPE, no shared expert and no multipliers; this config "
                             "differs: save it with family=None (hybridlm's own format)")
        d.update(attn_layer_indices=[i for i, t in enumerate(types) if t == "attention"],
                 intermediate_size=cfg.intermediate_size, mlp_bias=False, rope_parameters=rope)
    if cfg.mamba2_d_inner != d["mamba_expand"] * cfg.hidden_size:
        raise ValueError(f"{mt} needs mamba2_n_heads * mamba2_head_dim ({cfg.mamba2_d_inner}) to be a multiple "
                         f"of hidden_size ({cfg.hidden_size}) (transformers derives it as mamba_expand * hidden_size)")
    return d


# ---- tensors ------------------------------------------------------------------------------------------
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.*)")


def hub_to_ours(cfg, tensors):
    """The loader's (name, lazy getter, shape) stream, renamed into hybridlm's names (fused tensors split).
    Names this map does not know pass through, so the loader reports them as unexpected."""
    if cfg.family == "nemotron_h":
        yield from _nemotron_to_ours(cfg, tensors)
        return
    if cfg.family != "granitemoehybrid":      # Bamba's names are ours (Jamba's)
        yield from tensors
        return
    dense = not cfg.pattern.isupper()          # Granite: every layer MoE, or every layer dense
    mlp = "feed_forward" if dense else "shared_mlp"
    for name, get, shape in tensors:
        if name == "model.norm.weight":
            yield "model.final_layernorm.weight", get, shape
            continue
        m = _LAYER.fullmatch(name)
        if m is None:
            yield name, get, shape
            continue
        pre, rest = f"model.layers.{m.group(1)}.", m.group(2)
        if rest == "post_attention_layernorm.weight":
            yield pre + "pre_ff_layernorm.weight", get, shape
        elif rest == "shared_mlp.input_linear.weight" and len(shape) == 2:
            yield from _halves(pre + mlp, get, shape)
        elif rest == "shared_mlp.output_linear.weight":
            yield pre + mlp + ".down_proj.weight", get, shape
        elif rest in ("block_sparse_moe.router.layer.weight", "block_sparse_moe.router.weight"):
            yield pre + "feed_forward.router.weight", get, shape
        elif rest == "block_sparse_moe.input_linear.weight" and len(shape) == 3:
            for e in range(shape[0]):
                yield from _halves(f"{pre}feed_forward.experts.{e}", lambda g=get, e=e: g()[e], shape[1:])
        elif rest == "block_sparse_moe.output_linear.weight" and len(shape) == 3:
            for e in range(shape[0]):
                yield f"{pre}feed_forward.experts.{e}.down_proj.weight", (lambda g=get, e=e: g()[e]), shape[1:]
        elif rest.startswith("block_sparse_moe.experts."):       # transformers' in-memory names, split already
            yield pre + "feed_forward." + rest.removeprefix("block_sparse_moe."), get, shape
        else:
            yield name, get, shape


def _halves(prefix: str, get, shape):
    """A fused [2f, d] gate|up weight (chunk(2): gate first) as gate_proj and up_proj."""
    f = shape[0] // 2
    yield f"{prefix}.gate_proj.weight", (lambda: get()[:f]), (f, shape[1])
    yield f"{prefix}.up_proj.weight", (lambda: get()[f:]), (shape[0] - f, shape[1])


def ours_to_hub(cfg, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict in ``cfg.family``'s tensor names (Granite's fused tensors rebuilt)."""
    if cfg.family == "nemotron_h":
        return dict(sorted((_ours_to_nemotron(k), v) for k, v in sd.items()))
    if cfg.family != "granitemoehybrid":
        return sd
    if any(k.endswith((".weight_scale", ".weight_min")) for k in sd):
        raise ValueError("a quantized model cannot be written in Granite's format (its fused expert tensors have "
                         "no quantized form); save it with model.config.family = None (hybridlm's own format)")
    dense = not cfg.pattern.isupper()          # Granite: every layer MoE, or every layer dense
    out = {}
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        mlp = pre + ("feed_forward" if dense else "shared_mlp")
        out[pre + "shared_mlp.input_linear.weight"] = torch.cat([sd.pop(mlp + ".gate_proj.weight"),
                                                                 sd.pop(mlp + ".up_proj.weight")])
        out[pre + "shared_mlp.output_linear.weight"] = sd.pop(mlp + ".down_proj.weight")
        out[pre + "post_attention_layernorm.weight"] = sd.pop(pre + "pre_ff_layernorm.weight")
        if not dense:
            ex = [f"{pre}feed_forward.experts.{e}." for e in range(cfg.num_experts)]
            out[pre + "block_sparse_moe.router.layer.weight"] = sd.pop(pre + "feed_forward.router.weight")
            out[pre + "block_sparse_moe.input_linear.weight"] = torch.stack(
                [torch.cat([sd.pop(e + "gate_proj.weight"), sd.pop(e + "up_proj.weight")]) for e in ex])
            out[pre + "block_sparse_moe.output_linear.weight"] = torch.stack([sd.pop(e + "down_proj.weight") for e in ex])
    out["model.norm.weight"] = sd.pop("model.final_layernorm.weight")
    out.update(sd)
    return dict(sorted(out.items()))


# ---- Nemotron-H: one sublayer per layer, so a rename: layers.{i}.norm is the norm of whichever sublayer the
# layer holds, layers.{i}.mixer the sublayer. Files say "backbone." (NVIDIA's and transformers' save_pretrained);
# transformers' in-memory names say "model.": both are read.
_NEMOTRON_SUBLAYER = {"mamba2": "mamba", "attention": "self_attn", None: "feed_forward"}


def _nemotron_to_ours(cfg, tensors):
    for name, get, shape in tensors:
        if name.startswith("mtp."):        # multi-token-prediction layers: transformers skips them too
            continue
        rest = name.removeprefix("backbone.").removeprefix("model.") if name.startswith(("backbone.", "model.")) \
            else None
        if rest == "embeddings.weight":
            name = "model.embed_tokens.weight"
        elif rest == "norm_f.weight":
            name = "model.final_layernorm.weight"
        elif rest is not None and (m := re.fullmatch(r"layers\.(\d+)\.(norm|mixer)\.(.+)", rest)) \
                and int(m.group(1)) < cfg.num_hidden_layers:
            i, part, leaf = int(m.group(1)), m.group(2), m.group(3)
            kind = cfg.mixer(i)
            if part == "norm":
                name = f"model.layers.{i}.{'pre_ff_layernorm' if kind is None else 'input_layernorm'}.{leaf}"
            elif kind is None and leaf.startswith(("gate.", "shared_experts.")):      # a MoE's router, shared expert
                name = f"model.layers.{i}." + leaf.replace("gate.weight", "feed_forward.router.weight").replace(
                    "gate.e_score_correction_bias", "feed_forward.e_score_correction_bias").replace(
                    "shared_experts.", "shared_mlp.")
            else:
                name = f"model.layers.{i}.{_NEMOTRON_SUBLAYER.get(kind, 'mixer')}.{leaf}"
        yield name, get, shape


def _ours_to_nemotron(name: str) -> str:
    if name.startswith("model.embed_tokens."):
        return "backbone.embeddings." + name.removeprefix("model.embed_tokens.")
    if name.startswith("model.final_layernorm."):
        return "backbone.norm_f." + name.removeprefix("model.final_layernorm.")
    m = re.fullmatch(r"model\.layers\.(\d+)\.(input_layernorm|pre_ff_layernorm|mamba|self_attn|feed_forward|"
                     r"shared_mlp)\.(.+)", name)
    if m:
        part, leaf = ("norm" if m.group(2).endswith("layernorm") else "mixer"), m.group(3)
        if m.group(2) == "shared_mlp":
            leaf = "shared_experts." + leaf
        elif m.group(2) == "feed_forward" and leaf.startswith(("router.", "e_score_correction_bias")):
            leaf = "gate." + leaf.removeprefix("router.")
        return f"backbone.layers.{m.group(1)}.{part}.{leaf}"
    return name
