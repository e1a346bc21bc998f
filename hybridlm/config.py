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
import numbers
import re
from dataclasses import dataclass
from pathlib import Path

MIXERS = {"m": "mamba", "a": "attention", "w": "local"}
MIXER_SYMBOL = {v: k for k, v in MIXERS.items()}

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
        bad = sorted({c for c in block if c.lower() not in MIXERS})
        if bad:
            raise ValueError(f"layout pattern {shown!r}: unknown symbol(s) {bad}; use m/M (Mamba), a/A (attention), "
                             f"w/W (local attention); lower case = dense MLP, upper case = MoE")
        if len(digits) > len(str(max_layers)):
            raise too_long
        total += len(block) * int(digits)
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
        self._check_fields()     # types and ranges first: the derivations below compute with them
        if self.mamba_dt_rank == "auto":
            self.mamba_dt_rank = math.ceil(self.hidden_size / 16)
        if self.layout is not None:
            self.layout = expand_pattern(self.layout)
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
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or \
                    not (v > 0 if positive else v >= 0):
                raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")
            if type(v) not in (int, float):
                setattr(self, name, float(v))

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "mamba_d_state", "mamba_d_conv", "mamba_expand", "num_experts_per_tok",
                     "max_position_embeddings"):
            integer(name, getattr(self, name), 1)
        integer("num_hidden_layers", self.num_hidden_layers, 1, MAX_LAYERS)
        integer("num_experts", self.num_experts, 1, MAX_EXPERTS)
        integer("attn_layer_period", self.attn_layer_period, 1)
        integer("expert_layer_period", self.expert_layer_period, 1)
        integer("attn_layer_offset", self.attn_layer_offset, 0)
        integer("expert_layer_offset", self.expert_layer_offset, 0)
        if self.mamba_dt_rank != "auto":
            integer("mamba_dt_rank", self.mamba_dt_rank, 1)
        for name in ("head_dim", "sliding_window"):
            if getattr(self, name) is not None:
                integer(name, getattr(self, name), 1)
        real("rms_norm_eps", self.rms_norm_eps, positive=True)
        real("initializer_range", self.initializer_range, positive=False)
        real("router_aux_loss_coef", self.router_aux_loss_coef, positive=False)
        if self.rope_theta is not None:
            real("rope_theta", self.rope_theta, positive=True)
        for name in ("tie_word_embeddings", "router_renormalize", "mamba_conv_bias", "mamba_proj_bias"):
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
        d, v, p = self.hidden_size, self.vocab_size, self.pattern
        d_in, r, n, k = self.d_inner, self.mamba_dt_rank, self.mamba_d_state, self.mamba_d_conv
        h, h_kv, d_h = self.num_attention_heads, self.num_key_value_heads, self.head_size
        mamba = (d * 2 * d_in + d_in * k + d_in * (r + 2 * n) + r * d_in + d_in + d_in * n + d_in + d_in * d
                 + r + 2 * n + self.mamba_proj_bias * (2 * d_in + d) + self.mamba_conv_bias * d_in)
        attention = d * (h + 2 * h_kv) * d_h + h * d_h * d
        mlp = 3 * d * self.intermediate_size
        n_moe = sum(c.isupper() for c in p)
        n_mamba = p.lower().count("m")
        return (v * d * (1 if self.tie_word_embeddings else 2) + d + len(p) * 2 * d + n_mamba * mamba
                + (len(p) - n_mamba) * attention + (len(p) - n_moe) * mlp
                + n_moe * (self.num_experts * mlp + d * self.num_experts))

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
            need(self.head_size % 2 == 0,
                 f"rope_theta needs an even head size (got {self.rope_theta}, {self.head_size})")
        need(self.num_params() <= MAX_PARAMS,
             f"this config describes a model of {self.num_params():.3g} parameters, more than the {MAX_PARAMS:.0e} "
             f"hybridlm accepts (vocab_size {self.vocab_size}, hidden_size {self.hidden_size}, intermediate_size "
             f"{self.intermediate_size}, {self.num_hidden_layers} layers, {self.num_experts} experts): is it corrupt?")

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
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object of fields, got {_json_type(d)}")
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
}


def preset(name: str, **overrides) -> HybridConfig:
    """The config of a preset, looked up by exact name, with optional field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return HybridConfig(**{**PRESETS[name], **overrides})
