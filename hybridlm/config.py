"""One typed config for every hybrid layout.

Field names are transformers' ``JambaConfig`` names, so a Jamba ``config.json`` reads straight in and
our ``config.json`` is read by transformers and vLLM. Research layouts that Jamba's period/offset
fields cannot express are written as a pattern string, one symbol per layer:

    m  Mamba mixer      + dense MLP        M  Mamba mixer      + MoE
    a  attention (full) + dense MLP        A  attention (full) + MoE
    w  local attention  + dense MLP        W  local attention  + MoE   (window = ``sliding_window``)

Lower case is a dense feed-forward, upper case a mixture of experts. Spaces and ``|`` are ignored, so
blocks can be shown apart, and ``PATTERN*N`` repeats a block N times. Jamba-v0.1 is ``"mMmMaMmM*4"``:
attention at layer 4 of every 8, MoE on every odd layer.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

MIXERS = {"m": "mamba", "a": "attention", "w": "local"}
MIXER_SYMBOL = {v: k for k, v in MIXERS.items()}


def expand_pattern(pattern: str) -> str:
    """``"mMmMaMmM*2"`` -> ``"mMmMaMmMmMmMaMmM"``; spaces and ``|`` dropped; unknown symbols raise."""
    text = re.sub(r"[\s|]", "", pattern)
    out = []
    for part in text.split("+"):
        m = re.fullmatch(r"\(?([^()*]*)\)?(?:\*(\d+))?", part)
        if not m:
            raise ValueError(f"layout pattern {pattern!r}: cannot parse {part!r}; write symbols like 'mMmMaMmM' "
                             f"optionally followed by '*N' to repeat, and join blocks with '+'")
        block, rep = m.group(1), int(m.group(2) or 1)
        bad = sorted({c for c in block if c.lower() not in MIXERS})
        if bad:
            raise ValueError(f"layout pattern {pattern!r}: unknown symbol(s) {bad}; use m/M (Mamba), a/A (attention), "
                             f"w/W (local attention); lower case = dense MLP, upper case = MoE")
        out.append(block * rep)
    return "".join(out)


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
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
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

    def __post_init__(self):
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        if self.layout is not None:
            self.layout = expand_pattern(self.layout)
        self.validate()

    # ---- layout -------------------------------------------------------------------------------
    @property
    def pattern(self) -> str:
        """The per-layer layout as a pattern string, one symbol per layer."""
        if self.layout is not None:
            return self.layout
        out = []
        for i in range(self.num_hidden_layers):
            sym = "a" if i % self.attn_layer_period == self.attn_layer_offset else "m"
            moe = self.num_experts > 1 and i % self.expert_layer_period == self.expert_layer_offset
            out.append(sym.upper() if moe else sym)
        return "".join(out)

    def mixer(self, i: int) -> str:
        """'mamba', 'attention' or 'local' for layer i."""
        return MIXERS[self.pattern[i].lower()]

    def is_moe(self, i: int) -> bool:
        return self.pattern[i].isupper()

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

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
        if any(c.lower() == "w" for c in p):
            return None
        attn = [i for i, c in enumerate(p) if c.lower() == "a"]
        moe = [i for i, c in enumerate(p) if c.isupper()]

        def find(idx):
            for period in range(1, n + 1):
                for offset in range(period):
                    if [i for i in range(n) if i % period == offset] == idx:
                        return period, offset
            return None

        # "no layer of this kind" is expressed by a period longer than the stack
        a = find(attn) if attn else (n + 1, n)
        e = find(moe) if moe else (n + 1, n)
        if a is None or e is None:
            return None
        return {"attn_layer_period": a[0], "attn_layer_offset": a[1],
                "expert_layer_period": e[0], "expert_layer_offset": e[1]}

    # ---- validation ---------------------------------------------------------------------------
    def validate(self):
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank",
                     "num_experts", "num_experts_per_tok"):
            v = getattr(self, name)
            need(isinstance(v, int) and v >= 1, f"{name} must be a positive integer, got {v!r}")
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
        need(self.num_experts == 1 or self.num_experts_per_tok <= self.num_experts,  # 1 expert = dense
             f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed num_experts ({self.num_experts}); "
             f"lower num_experts_per_tok or add experts")
        if self.layout is not None:
            need(len(self.layout) == self.num_hidden_layers,
                 f"layout has {len(self.layout)} layers but num_hidden_layers is {self.num_hidden_layers}; "
                 f"make the pattern {self.num_hidden_layers} symbols long or change num_hidden_layers")
            need(not any(c.isupper() for c in self.layout) or self.num_experts > 1,
                 "layout has MoE layers (upper case) but num_experts is 1; set num_experts >= 2 "
                 "or use lower-case symbols")
        if any(c.lower() == "w" for c in self.pattern):
            need(self.sliding_window is not None and self.sliding_window >= 1,
                 "layout has local attention layers ('w'/'W') but sliding_window is not set; set sliding_window=N")
        if self.rope_theta is not None:
            need(self.rope_theta > 0 and self.head_size % 2 == 0,
                 f"rope_theta needs a positive value and an even head size (got {self.rope_theta}, {self.head_size})")

    # ---- config.json --------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """config.json contents with transformers' JambaConfig field names and model_type 'jamba'."""
        d = dataclasses.asdict(self)
        d.pop("layout")
        periodic = self.periodic_fields()
        if periodic is not None:
            d.update(periodic)
        else:
            d["layout"] = self.pattern  # transformers cannot express this layout; we can
        for k in ("head_dim", "rope_theta", "sliding_window"):
            if d[k] is None:
                d.pop(k)
        if not self.router_renormalize:
            d.pop("router_renormalize")
        d["hidden_act"] = "silu"
        d["model_type"] = "jamba"
        d["architectures"] = ["JambaForCausalLM"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "HybridConfig":
        mt = d.get("model_type", "jamba")
        if mt != "jamba":
            raise ValueError(f"unsupported model_type {mt!r}: hybridlm reads Jamba checkpoints "
                             f"(model_type 'jamba'); this checkpoint is a {mt!r} model")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}: Jamba uses 'silu'")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "num_local_experts" in d and "num_experts" not in d:
            kwargs["num_experts"] = d["num_local_experts"]
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> "HybridConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_json(self, path: str | Path):
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes) -> "HybridConfig":
        return dataclasses.replace(self, **changes)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


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
}


def preset(name: str, **overrides) -> HybridConfig:
    """The config of a preset, looked up by exact name, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return HybridConfig(**{**PRESETS[name], **overrides})
