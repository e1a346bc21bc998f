"""One typed config for every hybrid layout.

Field names are transformers' ``JambaConfig`` names, so a Jamba ``config.json`` reads straight in and
our ``config.json`` is read by transformers and vLLM. Research layouts that Jamba's period/offset
fields cannot express are written as a pattern string, one symbol per layer:

    m  Mamba mixer      + dense MLP        M  Mamba mixer      + MoE
    s  Mamba-2 (SSD)    + dense MLP        S  Mamba-2 (SSD)    + MoE   (the ``mamba2_*`` fields)
    a  attention (full) + dense MLP        A  attention (full) + MoE
    w  local attention  + dense MLP        W  local attention  + MoE   (window = ``sliding_window``)

Lower case is a dense feed-forward, upper case a mixture of experts. Layers that hold one sublayer only
(Nemotron-H's) are written with two more forms:

    s_ m_ a_ w_   the mixer alone, no feed-forward (``_`` after a lower-case mixer symbol: one layer)
    f  F          the feed-forward alone, no mixer: dense MLP (f) or mixture of experts (F)

Spaces and ``|`` are ignored, so blocks can be shown apart, and ``PATTERN*N`` repeats a block N times.
Jamba-v0.1 is ``"mMmMaMmM*4"``: attention at layer 4 of every 8, MoE on every odd layer. Blocks join with
``+``: Bamba-9B (Mamba-2, attention at layers 9, 18, 27 of 32) is ``"sssssssssa + (ssssssssa)*2 + ssss"``.
Mamba-1 and Mamba-2 layers can share a stack. Nemotron-H's ``hybrid_override_pattern`` maps symbol for
symbol (M -> ``s_``, * -> ``a_``, - -> ``f``, E -> ``F``): its ``"M-M*-M-"`` is ``"s_ f s_ a_ f s_ f"``,
seven layers, and our layer i is its layer i. Every layer has a pre-norm and a residual per sublayer.
The MLPs are SwiGLU (``mlp_hidden_act`` "silu") or, as in Nemotron-H, relu(x)^2 without a gate ("relu2").

Checkpoints of transformers' Mamba-2 hybrids (Granite 4.0-H, Bamba, Nemotron-H) read into this config too
(``families.py``); ``family`` then records which format ``save_pretrained`` writes back.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path

MIXERS = {"m": "mamba", "s": "mamba2", "a": "attention", "w": "local"}
MIXER_SYMBOL = {v: k for k, v in MIXERS.items()}
FEED_FORWARD_ONLY = "f"          # f / F: a layer with a feed-forward and no mixer
NO_FEED_FORWARD = "_"            # after a lower-case mixer symbol: a layer with a mixer and no feed-forward
MLP_ACTIVATIONS = ("silu", "relu2")   # SwiGLU (gate_proj, up_proj, down_proj); relu(x)^2, no gate (up, down)
# one layer of an expanded pattern: a mixer without a feed-forward, or one symbol
_LAYER_SYMBOL = re.compile(r"[msaw]_|[msawfMSAWF]")

# Sanity bounds, so a corrupt or hostile config.json is refused in milliseconds instead of running for
# minutes or allocating gigabytes. Each is far beyond any published model (Jamba-1.5-Large: 72 layers,
# 16 experts, 398B parameters; the most experts in an open MoE: 384, Kimi K2).
MAX_LAYERS = 4096
MAX_EXPERTS = 4096
MAX_DIM = 2**31 - 1               # any one dimension (vocabulary, hidden size, heads, state, ...)
MAX_PARAMS = 10**13               # the model as a whole


def expand_pattern(pattern: str, max_layers: int = MAX_LAYERS) -> str:
    """``"mMmMaMmM*2"`` -> ``"mMmMaMmMmMmMaMmM"``; spaces and ``|`` dropped; unknown symbols raise, and so
    does a pattern of more than ``max_layers`` layers (counted before anything is expanded)."""
    if not isinstance(pattern, str):
        raise ValueError(f"layout must be a pattern string such as 'mMmMaMmM*4', got {pattern!r}")
    shown = pattern if len(pattern) <= 60 else pattern[:57] + "..."
    too_long = ValueError(f"layout pattern {shown!r} has more than {max_layers} layers, the most hybridlm "
                          f"accepts")
    if len(pattern) > 16 * max_layers:       # even with spaces and '|' between symbols: too long
        raise too_long
    text = re.sub(r"[\s|]", "", pattern)
    blocks, total = [], 0
    for part in text.split("+"):
        m = re.fullmatch(r"\(?([^()*]*)\)?(?:\*(\d+))?", part)
        if not m:
            raise ValueError(f"layout pattern {shown!r}: cannot parse {part[:40]!r}; write symbols like 'mMmMaMmM' "
                             f"optionally followed by '*N' to repeat, and join blocks with '+'")
        block, digits = m.group(1), m.group(2) or "1"
        bad = sorted({c for c in block if c.lower() not in MIXERS and c.lower() != FEED_FORWARD_ONLY
                      and c != NO_FEED_FORWARD})
        if bad:
            raise ValueError(f"layout pattern {shown!r}: unknown symbol(s) {bad}; use m/M (Mamba), s/S (Mamba-2), "
                             f"a/A (attention), w/W (local attention); lower case = dense MLP, upper case = MoE; "
                             f"f/F a feed-forward alone, '_' after a lower-case mixer for a mixer alone")
        stray = re.search(r"(^|[^msaw])_", block)
        if stray:
            before = stray.group(1)
            fix = (f"write '{before.lower()}_' (a layer without a feed-forward has no MoE)" if before and
                   before in "MSAW" else "'_' follows a lower-case mixer symbol (m, s, a, w) and makes it a layer "
                   "without a feed-forward; for a feed-forward alone write f or F")
            raise ValueError(f"layout pattern {shown!r}: misplaced '_' in {block[:40]!r}: {fix}")
        if len(digits) > len(str(max_layers)):
            raise too_long
        total += (len(block) - block.count(NO_FEED_FORWARD)) * int(digits)
        if total > max_layers:
            raise too_long
        blocks.append((block, int(digits)))
    return "".join(block * rep for block, rep in blocks)


@dataclass
class HybridConfig:
    """Every dimension of a hybrid model. Fields mirror transformers' JambaConfig."""

    vocab_size: int = 65536
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Jamba)
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    # mixture of experts
    num_experts: int = 16
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.001
    router_renormalize: bool = False  # Jamba keeps the top-k softmax weights as they are
    moe_intermediate_size: int | None = None   # each expert's width (Nemotron-H); None: intermediate_size
    # the router's scores: "softmax" (Jamba, Granite) or "sigmoid" (DeepSeek-V3's, Nemotron-H's: the top-k are chosen
    # on sigmoid + e_score_correction_bias within the topk_group best of n_group expert groups, weighted by the
    # sigmoid scores (renormalised with router_renormalize) times routed_scaling_factor)
    router_scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # Jamba's periodic layout; ignored when `layout` is given
    expert_layer_period: int = 2
    expert_layer_offset: int = 1
    attn_layer_period: int = 8
    attn_layer_offset: int = 4
    # Mamba-1 mixer
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_dt_rank: int | str = "auto"  # "auto": ceil(hidden_size / 16)
    mamba_conv_bias: bool = True     # also the Mamba-2 mixer's
    mamba_proj_bias: bool = False    # also the Mamba-2 mixer's
    # Mamba-2 (SSD) mixer, layers 's'/'S' (Dao & Gu 2024, sec. 7); its conv width is mamba_d_conv
    mamba2_n_heads: int = 8          # heads, each with its own scalar decay A and step dt
    mamba2_head_dim: int = 64        # channels per head; inner width = n_heads * head_dim
    mamba2_n_groups: int = 1         # groups of B/C, each shared by n_heads / n_groups heads
    mamba2_d_state: int = 128
    mamba2_chunk_size: int = 256     # SSD chunk length (the result does not depend on it)
    mamba2_dt_limit: tuple[float, float] = (0.0, math.inf)   # dt clamped to [lo, hi] after the softplus
    mamba2_norm_grouped: bool = True  # gated RMSNorm statistics per B/C group (True in every published config)
    # multipliers (Granite 4.0's muP-style ones; 1.0 / None elsewhere): embeddings are multiplied by
    # embedding_multiplier, every residual branch by residual_multiplier, logits divided by logits_scaling;
    # attention scores are scaled by attention_multiplier (None: 1/sqrt(head size))
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    # every MoE feed-forward also adds a dense "shared expert" MLP of this width (Granite 4.0, Nemotron-H); None: none
    shared_expert_intermediate_size: int | None = None
    # RoPE on the first partial_rotary_factor * head size channels of each head (Bamba: 0.5)
    partial_rotary_factor: float = 1.0
    # attention options (Jamba: no positional encoding, full attention)
    rope_theta: float | None = None
    sliding_window: int | None = None
    # explicit layout pattern (see module docstring); None: derived from the periods above
    layout: str | None = None
    # tokens
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    max_position_embeddings: int = 262144
    # the MLPs' (and experts') activation: "silu" = SwiGLU, "relu2" = relu(x)^2 without a gate (Nemotron-H)
    mlp_hidden_act: str = "silu"
    # the transformers format this config came from and save_pretrained writes ("granitemoehybrid",
    # "bamba", "nemotron_h"; see families.py); None: Jamba's
    family: str | None = None

    def __post_init__(self):
        self._check_fields()     # types and ranges first: the derivations below compute with them
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        if self.layout is not None:
            self.layout = expand_pattern(self.layout)
        if isinstance(self.mamba2_dt_limit, list):          # from JSON
            self.mamba2_dt_limit = tuple(self.mamba2_dt_limit)
        self.validate()

    # ---- layout -------------------------------------------------------------------------------
    @property
    def pattern(self) -> str:
        """The per-layer layout as a pattern string, one symbol per layer (built once per layout: ``mixer(i)``
        and ``is_moe(i)`` are called for every layer)."""
        if self.layout is not None:
            return self.layout
        key = (self.num_hidden_layers, self.num_experts, self.attn_layer_period, self.attn_layer_offset,
               self.expert_layer_period, self.expert_layer_offset)
        cached = self.__dict__.get("_pattern")
        if cached is not None and cached[0] == key:
            return cached[1]
        out = []
        for i in range(self.num_hidden_layers):
            sym = "a" if i % self.attn_layer_period == self.attn_layer_offset else "m"
            moe = self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset
            out.append(sym.upper() if moe else sym)
        self.__dict__["_pattern"] = (key, "".join(out))
        return self.__dict__["_pattern"][1]

    @property
    def layer_symbols(self) -> tuple[str, ...]:
        """The pattern split into layers: ``"s_fSa"`` -> ``("s_", "f", "S", "a")``."""
        p = self.pattern
        cached = self.__dict__.get("_symbols")
        if cached is None or cached[0] != p:
            cached = (p, tuple(_LAYER_SYMBOL.findall(p)))
            self.__dict__["_symbols"] = cached
        return cached[1]

    def mixer(self, i: int) -> str | None:
        """'mamba', 'mamba2', 'attention' or 'local' for layer i; None for a feed-forward-only layer."""
        c = self.layer_symbols[i][0].lower()
        return None if c == FEED_FORWARD_ONLY else MIXERS[c]

    def is_moe(self, i: int) -> bool:
        return self.layer_symbols[i].isupper()

    def has_feed_forward(self, i: int) -> bool:
        return not self.layer_symbols[i].endswith(NO_FEED_FORWARD)

    @property
    def single_sublayer(self) -> bool:
        """Whether some layer holds a mixer alone or a feed-forward alone (Nemotron-H's layers)."""
        return NO_FEED_FORWARD in self.pattern or FEED_FORWARD_ONLY in self.pattern.lower()

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def mamba2_d_inner(self) -> int:
        return self.mamba2_n_heads * self.mamba2_head_dim

    @property
    def mamba2_conv_dim(self) -> int:
        """Channels of the Mamba-2 conv: x, B and C side by side."""
        return self.mamba2_d_inner + 2 * self.mamba2_n_groups * self.mamba2_d_state

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that RoPE rotates (the rest pass through)."""
        return int(self.head_size * self.partial_rotary_factor)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def periodic_fields(self) -> dict | None:
        """Jamba period/offset fields that reproduce this layout, or None when none do."""
        if self.layout is None:  # the periods already describe it
            return {k: getattr(self, k) for k in ("attn_layer_period", "attn_layer_offset",
                                                  "expert_layer_period", "expert_layer_offset")}
        p = self.pattern
        n = len(p)
        if any(c.lower() in "ws" for c in p) or self.single_sublayer:
            return None
        attn = [i for i, c in enumerate(p) if c.lower() == "a"]
        moe = [i for i, c in enumerate(p) if c.isupper()]

        def find(idx):
            # the first index is the offset and the gap to the second the period (with one index: the
            # shortest period that puts no second one in the stack); then every index must follow
            offset = idx[0]
            period = idx[1] - offset if len(idx) > 1 else max(offset + 1, n - offset)
            return (period, offset) if offset < period and list(range(offset, n, period)) == idx else None

        # "no layer of this kind" is expressed by a period longer than the stack
        a = find(attn) if attn else (n + 1, n)
        e = find(moe) if moe else (n + 1, n)
        if a is None or e is None:
            return None
        return {"attn_layer_period": a[0], "attn_layer_offset": a[1],
                "expert_layer_period": e[0], "expert_layer_offset": e[1]}

    # ---- validation ---------------------------------------------------------------------------
    def _check_fields(self):
        """Every field on its own: its type (JSON's: a boolean is not a number, "false" is not a boolean)
        and its range. Integers and reals of other types (numpy's, from a GGUF file) become Python's."""
        def integer(name, v, low, high=MAX_DIM):
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"{name} must be {what}, got {v!r} ({_json_type(v)})")
            if v < low:
                raise ValueError(f"{name} must be {what}, got {v!r}")
            if v > high:
                raise ValueError(f"{name} is {v}, more than the {high} hybridlm accepts; is the config corrupt?")
            if type(v) is not int:
                setattr(self, name, int(v))

        def real(name, v, positive):
            try:   # an integer past float's range (JSON's 10**400) is not finite either
                f = float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else math.nan
            except OverflowError:
                f = math.inf
            if not math.isfinite(f) or not (f > 0 if positive else f >= 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")
            if type(v) is not float:   # torch takes a Python int as int64: rope_theta 2**64 overflowed there
                setattr(self, name, f)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "mamba_d_state", "mamba_d_conv", "mamba_expand", "num_experts_per_tok",
                     "max_position_embeddings", "mamba2_n_heads", "mamba2_head_dim", "mamba2_n_groups",
                     "mamba2_d_state", "mamba2_chunk_size", "n_group", "topk_group"):
            integer(name, getattr(self, name), 1)
        integer("num_hidden_layers", self.num_hidden_layers, 1, MAX_LAYERS)
        integer("num_experts", self.num_experts, 1, MAX_EXPERTS)
        integer("attn_layer_period", self.attn_layer_period, 1)
        integer("expert_layer_period", self.expert_layer_period, 1)
        integer("attn_layer_offset", self.attn_layer_offset, 0)
        integer("expert_layer_offset", self.expert_layer_offset, 0)
        if self.mamba_dt_rank != "auto":
            integer("mamba_dt_rank", self.mamba_dt_rank, 1)
        for name in ("head_dim", "sliding_window", "shared_expert_intermediate_size", "moe_intermediate_size"):
            if getattr(self, name) is not None:
                integer(name, getattr(self, name), 1)
        real("rms_norm_eps", self.rms_norm_eps, positive=True)
        real("initializer_range", self.initializer_range, positive=False)
        real("router_aux_loss_coef", self.router_aux_loss_coef, positive=False)
        if self.rope_theta is not None:
            real("rope_theta", self.rope_theta, positive=True)
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling", "partial_rotary_factor",
                     "routed_scaling_factor"):
            real(name, getattr(self, name), positive=True)
        if self.attention_multiplier is not None:
            real("attention_multiplier", self.attention_multiplier, positive=True)
        lim = self.mamba2_dt_limit
        if not (isinstance(lim, (tuple, list)) and len(lim) == 2 and all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v) for v in lim)
                and 0 <= lim[0] < lim[1]):
            raise ValueError(f"mamba2_dt_limit must be two numbers [lo, hi] with 0 <= lo < hi (hi may be "
                             f"infinite), got {lim!r}")
        if self.router_scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"router_scoring must be 'softmax' (Jamba) or 'sigmoid' (DeepSeek-V3, Nemotron-H), got "
                             f"{self.router_scoring!r}")
        if self.mlp_hidden_act not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_hidden_act must be one of {list(MLP_ACTIVATIONS)} (SwiGLU, or relu(x)^2 without "
                             f"a gate as Nemotron-H has), got {self.mlp_hidden_act!r}")
        if self.family is not None and not isinstance(self.family, str):
            raise ValueError(f"family must be a transformers model_type string or null, got {self.family!r}")
        for name in ("tie_word_embeddings", "router_renormalize", "mamba_conv_bias", "mamba_proj_bias",
                     "mamba2_norm_grouped"):
            v = getattr(self, name)
            if not isinstance(v, bool):
                raise ValueError(f"{name} must be true or false (a JSON boolean), got {v!r} ({_json_type(v)})")

        def token_id(i) -> bool:
            return isinstance(i, numbers.Integral) and not isinstance(i, bool)

        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            ok = v is None or token_id(v) or (name == "eos_token_id" and isinstance(v, list) and v
                                              and all(map(token_id, v)))
            if not ok:
                raise ValueError(f"{name} must be a token id (an integer), "
                                 f"{'a list of them, ' if name == 'eos_token_id' else ''}or null; got {v!r}")
        if self.layout is not None and not isinstance(self.layout, str):
            raise ValueError(f"layout must be a pattern string such as 'mMmMaMmM*4', got {self.layout!r}")

    def num_params(self) -> int:
        """Parameters of a model of this config (``HybridLM(cfg).num_params()``), without building it."""
        d, v = self.hidden_size, self.vocab_size
        d_in, r, n, k = self.d_inner, self.mamba_dt_rank, self.mamba_d_state, self.mamba_d_conv
        h, h_kv, d_h = self.num_attention_heads, self.num_key_value_heads, self.head_size
        mamba = (d * 2 * d_in + d_in * k + d_in * (r + 2 * n) + r * d_in + d_in + d_in * n + d_in + d_in * d
                 + r + 2 * n + self.mamba_proj_bias * (2 * d_in + d) + self.mamba_conv_bias * d_in)
        attention = d * (h + 2 * h_kv) * d_h + h * d_h * d
        h2, d2, c2 = self.mamba2_n_heads, self.mamba2_d_inner, self.mamba2_conv_dim
        mamba2 = (d * (d2 + c2 + h2) + c2 * k + 3 * h2 + d2 + d2 * d
                  + self.mamba_proj_bias * (d2 + c2 + h2 + d) + self.mamba_conv_bias * c2)
        mats = 3 if self.mlp_hidden_act == "silu" else 2        # SwiGLU: gate, up, down; relu2: up, down
        mlp = mats * d * self.intermediate_size
        shared = mats * d * (self.shared_expert_intermediate_size or 0)
        expert = mats * d * (self.moe_intermediate_size or self.intermediate_size)
        per_mixer = {"mamba": mamba, "mamba2": mamba2, "attention": attention, "local": attention}
        total = v * d * (1 if self.tie_word_embeddings else 2) + d
        for i in range(len(self.layer_symbols)):
            kind = self.mixer(i)
            if kind is not None:
                total += d + per_mixer[kind]                       # its pre-norm and the mixer
            if self.has_feed_forward(i):
                total += d + (shared + self.num_experts * expert + d * self.num_experts if self.is_moe(i) else mlp)
        return total

    def validate(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        self._check_fields()
        need(self.attn_layer_offset < self.attn_layer_period,
             f"attn_layer_offset ({self.attn_layer_offset}) must be smaller than attn_layer_period "
             f"({self.attn_layer_period}); e.g. period 8 offset 4 puts attention at layers 4, 12, 20, ...")
        need(self.expert_layer_offset < self.expert_layer_period,
             f"expert_layer_offset ({self.expert_layer_offset}) must be smaller than expert_layer_period "
             f"({self.expert_layer_period}); e.g. period 2 offset 1 puts MoE on every odd layer")
        if self.head_dim is None:
            need(self.hidden_size % self.num_attention_heads == 0,
                 f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size ({self.hidden_size}); "
                 f"choose a divisor such as {_divisors_near(self.hidden_size, self.num_attention_heads)} or set head_dim")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
             f"({self.num_attention_heads}); choose one of {_divisors(self.num_attention_heads)}")
        if self.n_group > 1 or self.topk_group > 1:
            need(self.router_scoring == "sigmoid" and self.num_experts % self.n_group == 0
                 and self.num_experts // self.n_group >= 2 and self.topk_group <= self.n_group,
                 f"group-limited routing (n_group {self.n_group}, topk_group {self.topk_group}) needs "
                 f"router_scoring 'sigmoid', n_group dividing num_experts ({self.num_experts}) into groups of at "
                 f"least 2, and topk_group <= n_group")
        need(self.num_experts == 1 or self.num_experts_per_tok <= self.num_experts,  # 1 expert = dense
             f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_experts ({self.num_experts}); "
             f"lower num_experts_per_tok or add experts")
        if self.layout is not None:
            n = len(self.layer_symbols)
            need(n == self.num_hidden_layers,
                 f"layout has {n} layers but num_hidden_layers is {self.num_hidden_layers}; "
                 f"make the pattern {self.num_hidden_layers} layers long or change num_hidden_layers")
            need(any(self.mixer(i) is not None for i in range(n)),
                 "layout has feed-forward-only layers (f/F) and no mixer: nothing mixes the tokens; "
                 "add a Mamba or attention layer (m, s, a, w)")
            need(not any(c.isupper() for c in self.layout) or self.num_experts > 1,
                 "layout has MoE layers (upper case) but num_experts is 1; set num_experts >= 2 "
                 "or use lower-case symbols")
        if any(c.lower() == "w" for c in self.pattern):
            need(self.sliding_window is not None and self.sliding_window >= 1,
                 "layout has local attention layers ('w'/'W') but sliding_window is not set; set sliding_window=N")
        if self.rope_theta is not None:
            need(self.head_size % 2 == 0,
                 f"rope_theta needs an even head size (got {self.rope_theta}, {self.head_size})")
            need(self.partial_rotary_factor <= 1 and self.rotary_dim >= 2 and self.rotary_dim % 2 == 0,
                 f"partial_rotary_factor {self.partial_rotary_factor} of head size {self.head_size} rotates "
                 f"{self.rotary_dim} channels; choose a factor <= 1 that gives an even number >= 2")
        if "s" in self.pattern.lower():
            need(self.mamba2_n_heads % self.mamba2_n_groups == 0,
                 f"mamba2_n_groups ({self.mamba2_n_groups}) must divide mamba2_n_heads ({self.mamba2_n_heads}): "
                 f"each B/C group serves n_heads / n_groups heads; choose one of {_divisors(self.mamba2_n_heads)}")
            need(self.mamba_d_conv >= 2,
                 f"mamba_d_conv is {self.mamba_d_conv}; the Mamba-2 conv needs a kernel of width >= 2 (4 in "
                 f"every published model)")
        if self.family is not None:
            from .families import FAMILIES, config_to_family
            need(self.family in FAMILIES,
                 f"family {self.family!r} is not a format hybridlm writes; use one of {sorted(FAMILIES)} or null")
            config_to_family(self)          # the family's format can express this config, or a ValueError says why
        need(self.num_params() <= MAX_PARAMS,
             f"this config describes a model of {self.num_params():.3g} parameters, more than the {MAX_PARAMS:.0e} "
             f"hybridlm accepts (vocab_size {self.vocab_size}, hidden_size {self.hidden_size}, intermediate_size "
             f"{self.intermediate_size}, {self.num_hidden_layers} layers, {self.num_experts} experts): is it corrupt?")

    # ---- config.json --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """config.json contents with transformers' JambaConfig field names and model_type 'jamba'."""
        if self.family is not None:                 # Granite 4.0-H / Bamba: their own config.json
            from .families import config_to_family
            return config_to_family(self)
        d = dataclasses.asdict(self)
        d.pop("layout")
        periodic = self.periodic_fields()
        if periodic is not None:
            d.update(periodic)
        else:
            d["layout"] = self.pattern  # transformers cannot express this layout; we can
        for k in ("head_dim", "rope_theta", "sliding_window", "family", "attention_multiplier",
                  "shared_expert_intermediate_size"):
            if d[k] is None:
                d.pop(k)
        if "s" not in self.pattern.lower():        # Jamba's own fields only, as before
            for k in [k for k in d if k.startswith("mamba2_")]:
                d.pop(k)
        else:
            d["mamba2_dt_limit"] = [self.mamba2_dt_limit[0], None if math.isinf(self.mamba2_dt_limit[1])
                                    else self.mamba2_dt_limit[1]]
        for k, neutral in (("embedding_multiplier", 1.0), ("residual_multiplier", 1.0), ("logits_scaling", 1.0),
                           ("partial_rotary_factor", 1.0), ("routed_scaling_factor", 1.0), ("n_group", 1),
                           ("topk_group", 1), ("router_scoring", "softmax"), ("moe_intermediate_size", None)):
            if d[k] == neutral:
                d.pop(k)
        if not self.router_renormalize:
            d.pop("router_renormalize")
        if self.mlp_hidden_act == "silu":
            d.pop("mlp_hidden_act")
        d["hidden_act"] = "silu"
        d["model_type"] = "jamba"
        d["architectures"] = ["JambaForCausalLM"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HybridConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object of fields, got {_json_type(d)}")
        mt = d.get("model_type", "jamba")
        from .families import FAMILIES, REFUSED, config_from_family
        if isinstance(mt, str) and (mt in FAMILIES or mt in REFUSED):   # a list or object is unhashable
            return config_from_family(d)
        if mt != "jamba":
            raise ValueError(f"unsupported model_type {mt!r}: hybridlm reads Jamba checkpoints (model_type 'jamba') "
                             f"and {', '.join(repr(f) for f in FAMILIES)}; this checkpoint is a {mt!r} model")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: Jamba uses 'silu'")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and k != "family"}
        if isinstance(kwargs.get("mamba2_dt_limit"), list) and len(kwargs["mamba2_dt_limit"]) == 2 and \
                kwargs["mamba2_dt_limit"][1] is None:                      # JSON has no infinity
            kwargs["mamba2_dt_limit"] = (kwargs["mamba2_dt_limit"][0], math.inf)
        if "num_local_experts" in d and "num_experts" not in d:
            kwargs["num_experts"] = d["num_local_experts"]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "HybridConfig":
        """Read config.json; any problem with it is a ValueError that names the file."""
        d = read_json(path)
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_json(self, path: str | Path):
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes) -> "HybridConfig":
        return dataclasses.replace(self, **changes)


def read_json(path: str | Path):
    """The JSON value in ``path``; a file that is not UTF-8 JSON is a ValueError naming it."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, RecursionError, ValueError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def _json_type(v) -> str:
    names = {bool: "a boolean", str: "a string", float: "a float", int: "an integer", list: "a list",
             dict: "an object", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _divisors_near(n: int, k: int) -> list[int]:
    return sorted(_divisors(n), key=lambda d: abs(d - k))[:3]


PRESETS: dict[str, dict] = {
    # seconds-long tests and a minutes-long CPU training demo; 8 layers so it still has the Jamba block
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                 mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, max_position_embeddings=4096),
    # the reference model for every speed figure
    "bench-88m": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                      expert_layer_period=2, expert_layer_offset=1, attn_layer_period=8, attn_layer_offset=4,
                      mamba_d_state=16, mamba_d_conv=4, mamba_expand=2),
    # dimensions of AI21's Jamba-v0.1 (no weights here)
    "jamba-v0.1": dict(vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, num_experts=16, num_experts_per_tok=2,
                       attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1),
    # dimensions of AI21's Jamba Reasoning 3B / Jamba2-3B (no weights here), as AI21's model card and two
    # independent ports give them (the config.json itself could not be read from here): 28 layers,
    # attention at layers 7 and 21 only, 20 query heads sharing 1 key/value head of size 128, dense MLPs,
    # dt_rank 160, a separate lm_head (file sizes suggest it); 3.197B parameters
    "jamba-reasoning-3b": dict(vocab_size=65536, hidden_size=2560, intermediate_size=8192, num_hidden_layers=28,
                               num_attention_heads=20, num_key_value_heads=1, num_experts=1, num_experts_per_tok=1,
                               attn_layer_period=14, attn_layer_offset=7, mamba_d_state=16, mamba_d_conv=4,
                               mamba_expand=2, mamba_dt_rank=160, mamba_conv_bias=True, mamba_proj_bias=False,
                               rms_norm_eps=1e-6, max_position_embeddings=262144, tie_word_embeddings=False),
    # dimensions of AI21's Jamba-1.5-Mini (also Jamba-1.6/1.7 Mini and Jamba2 Mini; no weights here), as the
    # Jamba-1.5 report and model card give them: the Jamba-v0.1 shape with dt_rank 256, 51.6B total /
    # 12.1B active parameters
    "jamba-1.5-mini": dict(vocab_size=65536, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=8, num_experts=16, num_experts_per_tok=2,
                           attn_layer_period=8, attn_layer_offset=4, expert_layer_period=2, expert_layer_offset=1,
                           mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=256),
    # dimensions of IBM's Granite 4.0-H-Tiny (no weights here), as a public repository's test fixture quotes its
    # published config.json (granitemoehybrid; the config itself could not be read from here): 40 layers,
    # attention at 5, 15, 25, 35, every layer MoE (64 experts of width 512, top 6) plus a shared expert of 1024,
    # Mamba-2 with 48 heads of 64, one B/C group, d_state 128, tied embeddings. Not sourced, so left at
    # hybridlm's defaults: rms_norm_eps and the muP multipliers (embedding/residual/attention/logits).
    # (Granite 4.0-H-Micro and Bamba-9B presets are missing: their full configs could not be sourced here.)
    "granite-4.0-h-tiny": dict(vocab_size=100352, hidden_size=1536, intermediate_size=512, num_hidden_layers=40,
                               num_attention_heads=12, num_key_value_heads=4, num_experts=64, num_experts_per_tok=6,
                               router_renormalize=True, shared_expert_intermediate_size=1024,
                               layout="SSSSSA + (SSSSSSSSSA)*3 + SSSS", mamba2_n_heads=48, mamba2_head_dim=64,
                               mamba2_n_groups=1, mamba2_d_state=128, mamba_d_conv=4, mamba2_chunk_size=256,
                               mamba_conv_bias=True, mamba_proj_bias=False, tie_word_embeddings=True,
                               max_position_embeddings=131072),
    # dimensions of IBM's Bamba-9B (no weights here): transformers 5.24's BambaConfig defaults, which its
    # docstring ties to the ibm-fms/Bamba-9.8b-2.2T-hf checkpoint (hidden 4096, MLP 14336, 32 layers, 32
    # query heads on 8 key/value heads, Mamba-2 with 128 heads of 2 * 4096 / 128 = 64 channels, 1 group,
    # state 256, conv 4, chunk 256, conv bias, no projection bias, rms_norm_eps 1e-5, vocabulary 128000,
    # untied, 262144 positions, RoPE on half of each head with theta 10000 (BambaConfig hard-codes
    # partial_rotary_factor 0.5)), with attention at layers 9, 18 and 27 (issue 15; BambaConfig's default
    # attn_layer_indices is empty).
    "bamba-9b": dict(vocab_size=128000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     layout="sssssssssa + (ssssssssa)*2 + ssss", num_attention_heads=32, num_key_value_heads=8,
                     num_experts=1, num_experts_per_tok=1, mamba2_n_heads=128, mamba2_head_dim=64,
                     mamba2_n_groups=1, mamba2_d_state=256, mamba_d_conv=4, mamba2_chunk_size=256,
                     mamba_conv_bias=True, mamba_proj_bias=False, rms_norm_eps=1e-5, tie_word_embeddings=False,
                     max_position_embeddings=262144, rope_theta=10000.0, partial_rotary_factor=0.5,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2, family="bamba"),
    # dimensions of NVIDIA's Nemotron-H-8B-Base-8K (no weights here), as NVIDIA's Megatron-Bridge quotes its
    # config.json (NVIDIA-NeMo/Megatron-Bridge, tests/unit_tests/models/nemotronh/test_nemotron_h_bridge.py,
    # fixture nemotronh_8b_config_dict): hybrid_override_pattern "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-
    # M-M-M-M-M-" (52 layers: 24 Mamba-2, 4 attention, 24 relu^2 MLPs, one sublayer each), hidden 4096, MLP
    # 21504, 32 query heads of 128 (attention_head_dim) on 8 key/value heads, Mamba-2 with 128 heads of 64,
    # 8 groups, ssm_state_size 128, conv 4, chunk 128, conv bias, no projection bias, layer_norm_epsilon 1e-5,
    # vocabulary 131072, 8192 positions, untied. The quoted config sets no time_step_min, so transformers'
    # default 1e-3 is the dt floor (the lower dt limit).
    "nemotron-h-8b": dict(vocab_size=131072, hidden_size=4096, intermediate_size=21504, num_hidden_layers=52,
                          layout="(s_ f)*3 + s_ a_ f + (s_ f s_ f s_ f s_ f s_ a_ f)*3 + (s_ f)*5",
                          num_attention_heads=32, num_key_value_heads=8, head_dim=128, num_experts=1,
                          num_experts_per_tok=1, mlp_hidden_act="relu2", mamba2_n_heads=128, mamba2_head_dim=64,
                          mamba2_n_groups=8, mamba2_d_state=128, mamba_d_conv=4, mamba2_chunk_size=128,
                          mamba2_dt_limit=(1e-3, math.inf), mamba_conv_bias=True, mamba_proj_bias=False,
                          rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=8192,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2, family="nemotron_h"),
}


def preset(name: str, **overrides) -> HybridConfig:
    """The config of a preset, looked up by exact name, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return HybridConfig(**{**PRESETS[name], **overrides})
