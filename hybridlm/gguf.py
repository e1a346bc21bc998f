"""GGUF files both ways: load llama.cpp's ``jamba`` GGUF files (AI21's, or any converter's) into hybridlm,
and export hybridlm checkpoints as GGUF files that llama.cpp and everything built on it run.

Reading and writing go through the ``gguf`` package (llama.cpp's own; ``pip install 'hybridlm[gguf]'``).

Names and layouts (llama.cpp's ``jamba`` architecture, learned from its converter and loader):
    ours (model.layers.{i}.)              GGUF (blk.{i}.)          layout difference
    input_layernorm.weight                attn_norm.weight
    pre_ff_layernorm.weight               ffn_norm.weight
    mamba.in_proj / x_proj / dt_proj /    ssm_in / ssm_x / ssm_dt /
      out_proj .weight                      ssm_out .weight
    mamba.conv1d.weight [d_in, 1, conv]   ssm_conv1d.weight        [d_in, conv]: the middle 1 dropped
    mamba.A_log [d_in, n]                 ssm_a                    A = -exp(A_log) is stored, not A_log
    mamba.D, dt/b/c _layernorm            ssm_d, ssm_{dt,b,c}_norm
    self_attn.{q,k,v,o}_proj.weight       attn_{q,k,v,output}.weight
    feed_forward.{gate,up,down}_proj      ffn_{gate,up,down}       (dense layers)
    feed_forward.router.weight            ffn_gate_inp.weight      (its presence makes a layer MoE)
    feed_forward.experts.{e}.gate_proj    ffn_gate_exps.weight[e]  experts stacked in one 3-D tensor
    model.embed_tokens / final_layernorm  token_embd / output_norm; lm_head.weight = output.weight
                                          (absent: tied to token_embd)
GGUF lists dimensions innermost first; the ``gguf`` reader hands them back in torch order, so a
[out, in] weight reads as [out, in]. Which layers are attention comes from ``attention.head_count_kv``
(0 for Mamba layers) and is checked against the tensors present.

Quantized tensors (``load_gguf``'s ``quantize``): one scheme holds all linear layers. By default it follows
the file: all-Q8_0 weights load as int8 g32 and all-Q4_0 as int4 g32 (both with fp32 scales), taking the
file's integers and scales as they are (Q8_0/Q4_0 blocks are our g32 blocks, fp16 scales widen exactly);
other files (K-quants, mixtures) load as int4 g32 when most weights are 4-bit, else int8 g32, each tensor
not of that exact block format dequantized by the ``gguf`` package and requantized (a second rounding,
reported). ``quantize="int8"`` etc. picks the scheme, ``quantize="bf16"`` dequantizes everything.
``gguf_plan`` reports the path each tensor takes (``hybridlm inspect model.gguf``).

Untrusted input: the header's counts and every tensor's extent are checked against the file's size before
anything is read, and the reader's own failures become ValueError naming the file.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import HybridConfig

ARCH = "jamba"
_LAYER_NAMES = {   # ours after "model.layers.{i}." -> GGUF after "blk.{i}."
    "input_layernorm.weight": "attn_norm.weight",
    "pre_ff_layernorm.weight": "ffn_norm.weight",
    "mamba.in_proj.weight": "ssm_in.weight",
    "mamba.conv1d.weight": "ssm_conv1d.weight",
    "mamba.conv1d.bias": "ssm_conv1d.bias",
    "mamba.x_proj.weight": "ssm_x.weight",
    "mamba.dt_proj.weight": "ssm_dt.weight",
    "mamba.dt_proj.bias": "ssm_dt.bias",
    "mamba.dt_layernorm.weight": "ssm_dt_norm.weight",
    "mamba.b_layernorm.weight": "ssm_b_norm.weight",
    "mamba.c_layernorm.weight": "ssm_c_norm.weight",
    "mamba.A_log": "ssm_a",
    "mamba.D": "ssm_d",
    "mamba.out_proj.weight": "ssm_out.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "feed_forward.gate_proj.weight": "ffn_gate.weight",
    "feed_forward.up_proj.weight": "ffn_up.weight",
    "feed_forward.down_proj.weight": "ffn_down.weight",
    "feed_forward.router.weight": "ffn_gate_inp.weight",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.final_layernorm.weight": "output_norm.weight",
                 "lm_head.weight": "output.weight"}
_EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")    # feed_forward.experts.{e}.X.weight <-> ffn_X_exps.weight[e]
_FOUR_BIT = {"Q4_0", "Q4_1", "Q4_K", "Q3_K", "Q2_K", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS",
             "IQ2_XXS", "IQ1_S", "IQ1_M", "TQ1_0", "TQ2_0", "MXFP4", "NVFP4"}
_FLOAT = {"F32", "F16", "BF16"}


def _need_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError("reading or writing GGUF files needs the `gguf` package: pip install 'hybridlm[gguf]'") from None
    return gguf


def is_gguf(path) -> bool:
    return str(path).lower().endswith(".gguf")


def to_gguf_name(name: str) -> tuple[str, int | None]:
    """Our parameter name -> (GGUF tensor name, expert index or None). Raises KeyError for names GGUF has
    no place for."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name], None
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and parts[2].isdigit():
        i, rest = int(parts[2]), ".".join(parts[3:])
        if rest in _LAYER_NAMES:
            return f"blk.{i}.{_LAYER_NAMES[rest]}", None
        if parts[3:5] == ["feed_forward", "experts"] and parts[5].isdigit() and parts[6] in _EXPERT_PROJ \
                and parts[7:] == ["weight"]:
            return f"blk.{i}.ffn_{parts[6][:-5]}_exps.weight", int(parts[5])
    raise KeyError(f"{name} has no GGUF counterpart in llama.cpp's {ARCH} architecture")


def from_gguf_name(name: str, n_experts: int = 0) -> list[str]:
    """GGUF tensor name -> our parameter name(s) (one per expert for stacked expert tensors)."""
    for ours, theirs in _GLOBAL_NAMES.items():
        if name == theirs:
            return [ours]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        i, rest = parts[1], parts[2]
        for ours, theirs in _LAYER_NAMES.items():
            if rest == theirs:
                return [f"model.layers.{i}.{ours}"]
        for proj in _EXPERT_PROJ:
            if rest == f"ffn_{proj[:-5]}_exps.weight":
                return [f"model.layers.{i}.feed_forward.experts.{e}.{proj}.weight" for e in range(n_experts)]
    raise KeyError(f"GGUF tensor {name} is not part of llama.cpp's {ARCH} architecture as hybridlm reads it")


# ---- reading ---------------------------------------------------------------------------------------

@dataclass
class GGUFTensor:
    name: str
    type: str                   # GGML type name: F32, BF16, Q8_0, Q4_K, ...
    shape: tuple[int, ...]      # torch order (outermost first)
    data: object                # the reader's memory-mapped array (bytes for quantized types)
    offset: int = 0             # where the data starts in the file
    path: Path | None = None

    def read(self, expert: int | None = None):
        """The data (one expert's, for stacked experts) read into new memory. Not through the file map:
        pages of a mapped file count toward the process's memory until released, so a 3.4 GB file read
        through its map would hold 3.4 GB beside the model made from it."""
        import numpy as np
        shape, offset, nbytes = self.data.shape, self.offset, self.data.nbytes
        if expert is not None:
            nbytes //= shape[0]
            shape, offset = shape[1:], offset + expert * nbytes
        buf = np.empty(nbytes, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(offset)
            if f.readinto(buf) != nbytes:
                raise ValueError(f"{self.path}: tensor {self.name} ends past the end of the file")
        return buf.view(self.data.dtype).reshape(shape)


class GGUFFile:
    """An opened GGUF file: ``meta`` (key -> python value), ``tensors`` (name -> GGUFTensor), memory-mapped."""

    def __init__(self, path, check_arch: bool = True):
        gguf = _need_gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file {self.path} does not exist")
        _check_header(self.path)
        try:
            reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:   # the reader raises ValueError, IndexError, struct/numpy errors on bad bytes
            raise ValueError(f"{self.path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
        from .gguf_vocab import metadata_dict
        try:
            self.meta = metadata_dict(reader)
        except Exception as e:
            raise ValueError(f"{self.path}: malformed GGUF metadata ({type(e).__name__}: {e})") from None
        size = self.path.stat().st_size
        self.tensors: dict[str, GGUFTensor] = {}
        for t in reader.tensors:
            tname = t.tensor_type.name
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            block, nbytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
            if shape and shape[-1] % block:
                raise ValueError(f"{self.path}: tensor {t.name} ({tname}) has rows of {shape[-1]} values, not a "
                                 f"multiple of the type's block of {block}")
            want = math.prod(shape) // block * nbytes
            if t.n_bytes != want or t.data_offset + want > size or t.data.nbytes != want:
                raise ValueError(f"{self.path}: tensor {t.name} ({tname} {list(shape)}) needs {want} bytes at offset "
                                 f"{t.data_offset}, but the file has {size} bytes: truncated or malformed")
            self.tensors[t.name] = GGUFTensor(t.name, tname, shape, t.data, int(t.data_offset), self.path)
        self.arch = self.meta.get("general.architecture")
        if check_arch:
            self.check_arch()

    def check_arch(self):
        if self.arch != ARCH:
            raise ValueError(f"{self.path} holds a model of architecture {self.arch!r}; hybridlm reads GGUF files "
                             f"of architecture {ARCH!r} (Jamba) only")

    def key(self, name: str, default=None, required: bool = True):
        """``{arch}.name`` from the metadata."""
        v = self.meta.get(f"{ARCH}.{name}", default)
        if v is None and required:
            raise ValueError(f"{self.path}: metadata key {ARCH}.{name} is missing")
        return v


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}   # GGUF value types
_STRING, _ARRAY = 8, 9


def open_gguf(path, check_arch: bool = True) -> GGUFFile:
    """``GGUFFile(path)``, parsed once per file version: a command reads the config, the weights and the
    tokenizer from one file, and parsing a 65k-token vocabulary takes seconds."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"GGUF file {p} does not exist")
    st = p.stat()
    g = _open_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)
    if check_arch:
        g.check_arch()
    return g


@functools.lru_cache(maxsize=2)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path, check_arch=False)


def _check_header(path: Path):
    """Walk the header, metadata and tensor table with every length checked against the file's size before
    the ``gguf`` reader parses them: a corrupted count or length then fails here, at once, instead of
    sending the reader through a loop or an allocation the file's size does not justify."""
    import mmap
    size = path.stat().st_size
    if size < 24:
        raise ValueError(f"{path} is not a GGUF file: {size} bytes is shorter than a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (its first bytes are not the GGUF magic); pass a .gguf "
                             f"file made by llama.cpp's converter or `hybridlm export`")
        pos = 4

        def take(n: int, what: str) -> int:
            nonlocal pos
            if n < 0 or pos + n > size:
                raise ValueError(f"{path}: {what} at byte {pos} runs past the end of the {size}-byte file: "
                                 f"truncated or malformed")
            pos += n
            return pos - n

        def uint(n: int, what: str) -> int:
            o = take(n, what)
            return int.from_bytes(mm[o:o + n], "little")

        version = uint(4, "the version")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 and 3 are; a big-endian file "
                             f"reads as a huge version)")
        n_tensors, n_kv = uint(8, "the tensor count"), uint(8, "the key count")
        if n_tensors * 28 + n_kv * 13 > size:    # a tensor entry takes >= 28 bytes, a key/value >= 13
            raise ValueError(f"{path}: the header claims {n_tensors} tensors and {n_kv} metadata keys, more "
                             f"than a {size}-byte file can hold: truncated or malformed")
        for i in range(n_kv):
            take(uint(8, f"key {i}'s length"), f"key {i}")
            vtype = uint(4, f"key {i}'s type")
            if vtype == _ARRAY:
                sub, count = uint(4, f"key {i}'s array type"), uint(8, f"key {i}'s array length")
                if sub in _SCALAR_BYTES:
                    take(count * _SCALAR_BYTES[sub], f"key {i}'s array of {count}")
                elif sub == _STRING:
                    if count * 8 > size - pos:
                        raise ValueError(f"{path}: key {i} claims {count} strings, more than the file holds")
                    for _ in range(count):
                        take(uint(8, f"a string of key {i}"), f"a string of key {i}")
                else:
                    raise ValueError(f"{path}: key {i} is an array of type {sub}, which GGUF readers here "
                                     f"do not take (numbers or strings only)")
            elif vtype == _STRING:
                take(uint(8, f"key {i}'s string length"), f"key {i}'s string")
            elif vtype in _SCALAR_BYTES:
                take(_SCALAR_BYTES[vtype], f"key {i}'s value")
            else:
                raise ValueError(f"{path}: key {i} has unknown value type {vtype}")
        for i in range(n_tensors):
            take(uint(8, f"tensor {i}'s name length"), f"tensor {i}'s name")
            dims = uint(4, f"tensor {i}'s dimension count")
            if not 1 <= dims <= 4:
                raise ValueError(f"{path}: tensor {i} has {dims} dimensions (GGML tensors have 1 to 4)")
            take(8 * dims + 4 + 8, f"tensor {i}'s shape, type and offset")


def _to_torch(t: GGUFTensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.data`` (memory of our own, as ``_part`` reads it) as a torch tensor of ``dtype``; float
    types are taken as they are, without a copy when the dtype matches."""
    import numpy as np
    if t.type in ("F32", "F16"):
        return torch.from_numpy(t.data).reshape(t.shape).to(dtype)
    if t.type == "BF16":
        return torch.from_numpy(t.data.view(np.int16)).view(torch.bfloat16).reshape(t.shape).to(dtype)
    gguf = _need_gguf()
    kind = gguf.GGMLQuantizationType[t.type]
    try:
        return torch.from_numpy(gguf.quants.dequantize(t.data, kind)).reshape(t.shape).to(dtype)
    except NotImplementedError:
        raise ValueError(f"tensor {t.name} is stored as {t.type}, which the gguf package cannot dequantize; "
                         f"convert the file to Q8_0, Q4_K_M or bf16 with llama-quantize") from None


def config_from_gguf(g: GGUFFile) -> HybridConfig:
    """The model's HybridConfig from the metadata, the layer layout from which tensors each layer has."""
    import numpy as np
    n = int(g.key("block_count"))
    hidden = int(g.key("embedding_length"))
    if "token_embd.weight" not in g.tensors:
        raise ValueError(f"{g.path} has no token_embd.weight")
    vocab = g.tensors["token_embd.weight"].shape[0]
    kv = g.key("attention.head_count_kv")
    heads = g.key("attention.head_count")
    kv_list = list(kv) if isinstance(kv, (list, tuple, np.ndarray)) else [kv] * n
    heads_list = list(heads) if isinstance(heads, (list, tuple, np.ndarray)) else [heads] * n
    if len(kv_list) != n or len(heads_list) != n:
        raise ValueError(f"{g.path}: attention.head_count(_kv) lists {len(heads_list)}/{len(kv_list)} layers, "
                         f"block_count says {n}")
    layout = []
    for i in range(n):
        attn = f"blk.{i}.attn_q.weight" in g.tensors or f"blk.{i}.attn_qkv.weight" in g.tensors
        mamba = f"blk.{i}.ssm_in.weight" in g.tensors
        if attn == mamba or attn != (int(kv_list[i]) > 0):
            raise ValueError(f"{g.path}: layer {i} is neither clearly attention nor Mamba (head_count_kv "
                             f"{kv_list[i]}, attention tensors {attn}, Mamba tensors {mamba})")
        moe = f"blk.{i}.ffn_gate_inp.weight" in g.tensors
        layout.append(("a" if attn else "m").upper() if moe else ("a" if attn else "m"))
    attn_layers = [i for i, c in enumerate(layout) if c.lower() == "a"]
    n_heads = int(max(heads_list))
    n_kv = int(max(kv_list)) if attn_layers else 1
    if attn_layers and any(int(kv_list[i]) != n_kv or int(heads_list[i]) != n_heads for i in attn_layers):
        raise ValueError(f"{g.path}: attention layers with different head counts are not supported")
    head_dim = None
    if attn_layers:
        i = attn_layers[0]
        q = g.tensors.get(f"blk.{i}.attn_q.weight") or g.tensors[f"blk.{i}.attn_qkv.weight"]
        rows = q.shape[0] if q.name.endswith("attn_q.weight") else q.shape[0] * n_heads // (n_heads + 2 * n_kv)
        if rows != hidden:
            head_dim = rows // n_heads
    d_inner = int(g.key("ssm.inner_size"))
    if d_inner % hidden:
        raise ValueError(f"{g.path}: ssm.inner_size {d_inner} is not a multiple of embedding_length {hidden}")
    n_experts = int(g.key("expert_count", 0, required=False) or 1)
    used = int(g.key("expert_used_count", 0, required=False) or 1)
    ids = {f: g.meta[f"tokenizer.ggml.{k}_token_id"] for f, k in
           (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding"))
           if f"tokenizer.ggml.{k}_token_id" in g.meta}
    first_mamba = next((i for i, c in enumerate(layout) if c.lower() == "m"), None)
    conv_bias = first_mamba is None or f"blk.{first_mamba}.ssm_conv1d.bias" in g.tensors
    cfg = HybridConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(g.key("feed_forward_length")),
        num_hidden_layers=n, num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
        rms_norm_eps=float(str(np.float32(g.key("attention.layer_norm_rms_epsilon")))),  # 1e-06, not 9.99...e-07
        tie_word_embeddings="output.weight" not in g.tensors,
        num_experts=n_experts, num_experts_per_tok=min(used, n_experts),
        mamba_d_state=int(g.key("ssm.state_size")), mamba_d_conv=int(g.key("ssm.conv_kernel")),
        mamba_expand=d_inner // hidden, mamba_dt_rank=int(g.key("ssm.time_step_rank")),
        mamba_conv_bias=conv_bias, mamba_proj_bias=False, layout="".join(layout), **ids,
        max_position_embeddings=int(g.key("context_length", 262144, required=False)))
    periodic = cfg.periodic_fields()
    if periodic is not None:     # a Jamba period/offset layout: say it the way config.json does
        cfg = cfg.replace(layout=None, **periodic)
    try:
        cfg.validate()
    except ValueError as e:
        raise ValueError(f"{g.path}: the metadata describes an invalid model: {e}") from None
    return cfg


def _linear_names(model) -> dict[str, torch.nn.Module]:
    from .quant import quantizable, QuantScheme
    probe = QuantScheme(bits=8)
    return {n: m for n, m in model.named_modules() if quantizable(n, m, probe)}


def _source(g: GGUFFile, name: str, cfg: HybridConfig) -> tuple[GGUFTensor, int | None, str | None]:
    """Where our tensor ``name`` lives in the file: (tensor, expert index, which of q/k/v in a fused qkv).
    A tied lm_head reads token_embd."""
    if name == "lm_head.weight" and "output.weight" not in g.tensors:
        name = "model.embed_tokens.weight"
    gname, expert = to_gguf_name(name)
    if gname in g.tensors:
        return g.tensors[gname], expert, None
    block, _, leaf = gname.rpartition(".")[0].rpartition(".")
    if leaf in ("attn_q", "attn_k", "attn_v") and f"{block}.attn_qkv.weight" in g.tensors:
        return g.tensors[f"{block}.attn_qkv.weight"], None, leaf
    raise KeyError(gname)


def _auto_scheme(types: list[tuple[str, int]]):
    """The one scheme for a file's linear weights ((type, elements) each), or None for float files."""
    from .quant import QuantScheme
    kinds = {t for t, _ in types}
    if kinds <= _FLOAT:
        return None
    if kinds == {"Q8_0"}:
        return QuantScheme(bits=8, group=32, scale_dtype="float32")
    if kinds == {"Q4_0"}:
        return QuantScheme(bits=4, group=32, scale_dtype="float32")
    four = sum(n for t, n in types if t in _FOUR_BIT)
    total = sum(n for _, n in types)
    return QuantScheme(bits=4 if four * 2 > total else 8, group=32, scale_dtype="float32")


def _direct(kind: str, scheme) -> bool:
    """Whether a tensor of GGML type ``kind`` maps onto ``scheme``'s blocks without a second rounding."""
    if scheme is None or scheme.group != 32 or scheme.scale_dtype != "float32" or not scheme.symmetric:
        return False
    return (kind, scheme.bits) in (("Q8_0", 8), ("Q4_0", 4))


def gguf_plan(path, quantize=None) -> tuple[HybridConfig, object, list[tuple[str, str, str]]]:
    """What loading ``path`` does, without reading tensor data: (config, scheme or None, rows of
    (GGUF tensor, its type, the path it takes))."""
    return _plan(open_gguf(path), quantize)[:3]


def gguf_meta_model(path, quantize=None):
    """The model ``load_gguf`` would build, on the meta device (shapes and quantized structure only)."""
    return _plan(open_gguf(path), quantize)[3].eval()


def _plan(g: GGUFFile, quantize):
    """``gguf_plan``'s (config, scheme, rows), and the model on the meta device with its linear layers
    swapped for empty QuantLinears under the scheme: built once, for the loader to fill."""
    from .checkpoint import meta_model
    from .quant import QuantScheme, quantize_structure
    cfg = config_from_gguf(g)
    model, _ = meta_model(cfg)
    linears = _linear_names(model)
    try:
        sources = {n: _source(g, n + ".weight", cfg)[0].name for n in linears}
    except KeyError as e:
        raise ValueError(f"{g.path}: tensor {e.args[0]} is missing (the metadata's layer layout needs it)") from None
    types = [(g.tensors[sources[n]].type, m.in_features * m.out_features) for n, m in linears.items()
             if n != "lm_head" or not cfg.tie_word_embeddings]
    if quantize in (None, "", "auto"):
        scheme = _auto_scheme(types)
    elif str(quantize).lower() in ("bf16", "float"):
        scheme = None
    else:
        scheme = QuantScheme.parse(quantize)
    quantized = {sources[n] for n in linears if scheme is not None and (n != "lm_head" or scheme.lm_head)}
    rows = []
    for t in g.tensors.values():
        stored = t.type in _FLOAT
        if t.name in quantized:
            if _direct(t.type, scheme):
                how = f"{scheme}: the file's blocks as they are (no second rounding)"
            elif stored:
                how = f"quantized -> {scheme}"
            else:
                how = f"dequantized, requantized -> {scheme} (a second rounding)"
            if t.name == "token_embd.weight":   # tied: the embeddings themselves stay float
                how = ("embeddings as stored" if stored else "embeddings dequantized") + "; tied lm_head " + how
        elif t.name.endswith(".ssm_a"):
            how = "A_log = log(-A)"
        else:
            how = "as stored" if stored else "dequantized -> float"
        rows.append((t.name, t.type, how))
    if scheme is not None:
        quantize_structure(model, scheme)
    return cfg, scheme, rows, model


def load_gguf(path, dtype: torch.dtype | None = None, device="cpu", quantize=None, progress: bool = False):
    """A HybridLM from a ``jamba`` GGUF file (see the module docstring for ``quantize``). ``dtype`` is the
    dtype of every float parameter; default: the file's (BF16 -> bfloat16, F32/F16 -> float32, quantized
    files -> bfloat16). The tokenizer: ``hybridlm.tokenizer.load_tokenizer(path)``."""
    from .checkpoint import _assign, expected_tensors
    from .quant import QuantLinear, _progress
    g = open_gguf(path)
    cfg, scheme, _, model = _plan(g, quantize)
    if dtype is None:
        sizes: dict[str, int] = {}
        for t in g.tensors.values():
            sizes[t.type] = sizes.get(t.type, 0) + math.prod(t.shape)
        dtype = torch.bfloat16 if max(sizes, key=sizes.get) not in ("F32", "F16") else torch.float32
    expected = expected_tensors(model)
    tie = cfg.tie_word_embeddings and not isinstance(model.lm_head, QuantLinear)
    names = [n for n in expected if not n.endswith((".weight_scale", ".weight_min"))
             and not (tie and n == "lm_head.weight")]
    bar = _progress(len(names), f"loading {Path(path).name}", progress)
    for name in names:
        owner, _, leaf = name.rpartition(".")
        layer = model.get_submodule(owner)
        try:
            t, expert, qkv = _source(g, name, cfg)
        except KeyError as e:
            raise ValueError(f"{path}: tensor {e.args[0]} is missing (needed for {name})") from None
        part = _part(t, expert, qkv, cfg)
        if isinstance(layer, QuantLinear) and leaf == "weight":
            _fill_quant(layer, part, name, path)
            bar.update(1)
            continue
        want = tuple(expected[name].shape)
        value = _to_torch(part, torch.float32 if leaf == "A_log" else dtype)
        if leaf == "A_log":
            value = a_log_from_a(value, dtype, f"{path}: {t.name}")
        if name.endswith("conv1d.weight") and tuple(value.shape) == (want[0], want[-1]):
            value = value.reshape(want)          # GGUF drops the conv's middle dimension of 1
        if tuple(value.shape) != want:
            raise ValueError(f"{path}: tensor {t.name} has shape {list(value.shape)}; the model the metadata "
                             f"describes needs {list(want)} for {name}")
        _assign(model, name, value.to(device=device, dtype=dtype))
        bar.update(1)
    bar.close()
    if tie:
        model.lm_head.weight = model.model.embed_tokens.weight
    elif cfg.tie_word_embeddings:        # lm_head quantized from token_embd: its own copy now
        model.config.tie_word_embeddings = False
    return model.to(device).eval()


def _part(t: GGUFTensor, expert: int | None, qkv: str | None, cfg: HybridConfig) -> GGUFTensor:
    """The part of ``t`` one of our tensors takes (one expert; one of q, k, v of a fused qkv), read into
    memory of our own (raw bytes for quantized types)."""
    data = t.read(expert)
    shape = t.shape if expert is None else t.shape[1:]
    if qkv is not None:
        q = cfg.num_attention_heads * cfg.head_size
        kv = cfg.num_key_value_heads * cfg.head_size
        start, n = {"attn_q": (0, q), "attn_k": (q, kv), "attn_v": (q + kv, kv)}[qkv]
        data, shape = data[start:start + n], (n, *shape[1:])
    return GGUFTensor(t.name, t.type, tuple(shape), data)


def _fill_quant(layer, part: GGUFTensor, name: str, path):
    """Set a QuantLinear from its part of the file: Q8_0/Q4_0 blocks copied as they are where its scheme
    matches, else dequantized and requantized (or quantized, for float tensors)."""
    import numpy as np
    o, k = layer.out_features, layer.in_features
    if part.shape != (o, k):
        raise ValueError(f"{path}: tensor {part.name} has shape {list(part.shape)}; {name} needs {[o, k]}")
    if not _direct(part.type, layer.scheme):
        layer.quantize_(_to_torch(part, torch.float32))
        return
    qbytes = 32 if part.type == "Q8_0" else 16
    blocks = np.ascontiguousarray(part.data).reshape(o, k // 32, 2 + qbytes)
    scale = torch.from_numpy(blocks[..., :2].copy().view(np.float16)[..., 0]).float()
    q = torch.from_numpy(blocks[..., 2:].copy()).reshape(o, k // 32 * qbytes)
    layer.set_packed_rows(q.view(torch.int8) if part.type == "Q8_0" else q, scale)


def a_log_from_a(A: torch.Tensor, dtype: torch.dtype, what: str = "ssm_a") -> torch.Tensor:
    """GGUF stores A = -exp(A_log); our mixer (like transformers') holds A_log and computes -exp(A_log.float()).
    Returns A_log in ``dtype`` for which that computation gives back the stored A exactly whenever some
    value does (log(-A) rounded, then its neighbours a few units in the last place either side tried), so a
    model written to GGUF and read back has bit-identical A."""
    A = A.float()
    if not bool((A < 0).all()):
        raise ValueError(f"{what}: A must be negative everywhere (it is -exp(A_log)); found {int((A >= 0).sum())} "
                         f"entries >= 0")
    best = torch.log(-A.double()).to(dtype)
    err = (-torch.exp(best.float()) - A).abs()
    ints = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[dtype]
    bits = best.view(ints)
    for step in (-1, 1, -2, 2, -3, 3):
        cand = (bits + step).view(dtype)
        e = (-torch.exp(cand.float()) - A).abs()
        better = e < err
        best, err = torch.where(better, cand, best), torch.where(better, e, err)
    return best


# ---- writing ---------------------------------------------------------------------------------------

EXPORT_TYPES = ("bf16", "f16", "q8_0", "q4_0")


def check_exportable(cfg: HybridConfig):
    """llama.cpp's jamba graph computes a subset of what hybridlm's configs express; refuse the rest."""
    problems = []
    if cfg.rope_theta is not None:
        problems.append("rotary position embeddings (rope_theta): llama.cpp's Jamba has no positional encoding")
    if any(c.lower() == "w" for c in cfg.pattern):
        problems.append("sliding-window attention layers: llama.cpp's Jamba has full attention only")
    other = sorted({c for c in cfg.pattern if c not in "mMaAwW"})
    if other:
        problems.append(f"layout symbols {other} (Mamba-2 layers, layers without a mixer or without a "
                        f"feed-forward): llama.cpp's Jamba graph has Mamba-1 ('m'/'M') and attention ('a'/'A') "
                        f"layers, each with a feed-forward, only")
    scaled = [f"{k} {getattr(cfg, k)}" for k in ("embedding_multiplier", "residual_multiplier", "logits_scaling")
              if getattr(cfg, k) != 1]
    if cfg.attention_multiplier is not None:
        scaled.append(f"attention_multiplier {cfg.attention_multiplier}")
    if scaled:
        problems.append(f"multipliers ({', '.join(scaled)}): llama.cpp's Jamba applies none")
    if cfg.shared_expert_intermediate_size:
        problems.append("a shared expert (shared_expert_intermediate_size): llama.cpp's Jamba has none")
    if cfg.router_scoring != "softmax" or cfg.moe_intermediate_size not in (None, cfg.intermediate_size):
        problems.append("a sigmoid router or experts of their own width (moe_intermediate_size): llama.cpp's Jamba "
                        "has softmax-routed experts as wide as its MLPs")
    if getattr(cfg, "mlp_hidden_act", "silu") != "silu":
        problems.append(f"mlp_hidden_act {cfg.mlp_hidden_act!r}: llama.cpp's Jamba MLPs are SwiGLU ('silu')")
    if cfg.mamba_expand != 2:
        problems.append(f"mamba_expand {cfg.mamba_expand}: llama.cpp's Jamba supports 2 only")
    if cfg.mamba_proj_bias:
        problems.append("mamba_proj_bias: llama.cpp's Jamba has no bias on the Mamba projections")
    if not cfg.mamba_conv_bias:
        problems.append("mamba_conv_bias False: llama.cpp's Jamba needs the conv1d bias")
    if cfg.router_renormalize:
        problems.append("router_renormalize: llama.cpp's Jamba does not renormalise the top-k router weights")
    if cfg.head_dim is not None and cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size:
        problems.append(f"head_dim {cfg.head_dim} x {cfg.num_attention_heads} heads != hidden_size "
                        f"{cfg.hidden_size}: llama.cpp's Jamba needs them equal")
    if problems:
        raise ValueError("this model cannot be exported for llama.cpp: " + "; ".join(problems))


def _ggml_type(gname: str, shape, kind: str) -> str:
    """The GGML type a tensor is written in (llama.cpp's rules: 1-D tensors, norms, the router, conv1d, A and
    D stay F32 — llama.cpp's kernels for them read F32; Q8_0 needs rows of whole 32-value blocks)."""
    if len(shape) <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight") \
            or ".ffn_gate_inp." in gname or ".ssm_conv1d." in gname:
        return "F32"
    if kind in ("q8_0", "q4_0"):
        return kind.upper() if shape[-1] % 32 == 0 else "F16"
    return kind.upper()


def _gguf_tensors(model):
    """(GGUF name, producer of its data) for every tensor, experts stacked, in llama.cpp's order."""
    from .quant import QuantLinear
    sd: dict[str, object] = {}
    for n, m in model.named_modules():
        if isinstance(m, QuantLinear):
            sd[n + ".weight"] = m      # dequantized when written
            if m.bias is not None:
                sd[n + ".bias"] = m.bias
    for n, p in model.named_parameters():
        sd.setdefault(n, p)
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    groups: dict[str, list] = {}
    unmapped = []
    for n in sd:
        try:
            gname, expert = to_gguf_name(n)
        except KeyError:
            unmapped.append(n)
            continue
        groups.setdefault(gname, []).append((-1 if expert is None else expert, n))
    if unmapped:
        raise ValueError(f"these parameters have no place in llama.cpp's {ARCH} GGUF: {', '.join(unmapped[:5])}")

    def value(n):
        v = sd[n]
        v = v.dequantize(torch.float32) if isinstance(v, QuantLinear) else v.detach()
        if n.endswith(".A_log"):
            return -torch.exp(v.float())
        if n.endswith("conv1d.weight"):
            return v.reshape(v.shape[0], v.shape[-1])
        return v

    for gname in sorted(groups, key=_gguf_order):
        members = [n for _, n in sorted(groups[gname])]
        if len(members) == 1 and not gname.endswith("_exps.weight"):
            yield gname, (lambda n=members[0]: value(n))
        else:
            yield gname, (lambda ms=members: torch.stack([value(n) for n in ms]))


def _gguf_order(gname: str):
    """Tensors in llama.cpp's usual order: embeddings, then layer by layer, then the output."""
    if gname.startswith("blk."):
        return (1, int(gname.split(".")[1]), gname)
    return (0 if gname.startswith("token_embd") else 2, 0, gname)


def export_gguf(model, out, tokenizer, kind: str = "bf16", name: str = "", progress: bool = True,
                exact_tokenizer: bool = True) -> Path:
    """Write ``model`` as a llama.cpp ``jamba`` GGUF file with the tokenizer (and its chat template) in the
    metadata (``tokenizer`` None writes weights only: hybridlm reads such a file, llama.cpp does not). ``kind``: bf16, f16, q8_0 or q4_0 (the bulk of the weights; see _ggml_type). A quantized model
    is dequantized first (q8_0/q4_0 then round once more). Written under a temporary name, then renamed."""
    import numpy as np
    gguf = _need_gguf()
    kind = kind.lower()
    if kind not in EXPORT_TYPES:
        raise ValueError(f"unknown GGUF type {kind!r}; use one of {', '.join(EXPORT_TYPES)}")
    cfg = model.config
    check_exportable(cfg)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(tmp, ARCH)
    ftype = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind]
    if name:
        w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv([cfg.num_key_value_heads if cfg.mixer(i) != "mamba" else 0
                         for i in range(cfg.num_hidden_layers)])
    w.add_ssm_conv_kernel(cfg.mamba_d_conv)
    w.add_ssm_inner_size(cfg.d_inner)
    w.add_ssm_state_size(cfg.mamba_d_state)
    w.add_ssm_time_step_rank(cfg.mamba_dt_rank)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok if cfg.num_experts > 1 else 1)
    w.add_file_type(int(ftype))
    if kind in ("q8_0", "q4_0"):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is not None:
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                             f"{cfg.vocab_size}")
        from .gguf_vocab import write_tokenizer_metadata
        # llama.cpp sizes its vocabulary by the token list: padded to the embedding's rows
        write_tokenizer_metadata(w, tokenizer, vocab_size=cfg.vocab_size, exact=exact_tokenizer)
    with torch.no_grad():
        for gname, make in _gguf_tensors(model):
            v = make()
            typ = _ggml_type(gname, tuple(v.shape), kind)
            if typ == "F32":
                w.add_tensor(gname, v.float().contiguous().numpy())
            elif typ == "F16":
                w.add_tensor(gname, v.to(torch.float16).contiguous().numpy())
            elif typ == "BF16":
                w.add_tensor(gname, v.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16),
                             raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                qtype = gguf.GGMLQuantizationType[typ]
                w.add_tensor(gname, gguf.quants.quantize(v.float().contiguous().numpy(), qtype), raw_dtype=qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
    finally:
        w.close()
    os.replace(tmp, out)
    return out


def export_cli(model: str, gguf: str = "", type: str = "bf16", tokenizer: str = "", name: str = "",
               approximate_tokenizer: bool = False, overwrite: bool = False) -> int:
    """Export a model as a GGUF file that llama.cpp (llama-cli, llama-server, llama-bench) and the tools built
    on it (Ollama, LM Studio) load: llama.cpp's ``jamba`` architecture, with the tokenizer and chat template
    in its metadata.

    Args:
        model: checkpoint directory (float or quantized) or .gguf file
        gguf: the GGUF file to write (required)
        type: bf16, f16, q8_0 or q4_0 for the weight matrices (norms, conv, A, D, biases and the router stay
            F32; a matrix whose rows are not whole blocks of 32 is written f16)
        tokenizer: tokenizer to embed (default: the checkpoint's own)
        name: general.name in the metadata (default: the checkpoint directory's name)
        approximate_tokenizer: write a tokenizer that llama.cpp would tokenize differently (a BPE trained
            by `tokenizers` as a 'llama' vocabulary), with a warning, instead of refusing
        overwrite: replace an existing file

    Examples:
        hybridlm export runs/tiny --gguf tiny-bf16.gguf
        hybridlm export ./jamba-3b --gguf jamba-3b-Q8_0.gguf --type q8_0
        llama-cli -m tiny-bf16.gguf -p "Hello" -n 32
    """
    import time

    from .checkpoint import load_model
    from .cli import CLIError
    from .summary import fmt_bytes
    from .tokenizer import load_tokenizer
    if not gguf:
        raise CLIError("give --gguf OUT.gguf, the file to write")
    out = Path(gguf)
    if not is_gguf(out):
        raise CLIError(f"--gguf {gguf}: the output file's name must end in .gguf")
    if out.exists() and not overwrite:
        raise CLIError(f"{gguf} exists; choose another name or pass --overwrite")
    if type.lower() not in EXPORT_TYPES:
        raise CLIError(f"--type {type}: use one of {', '.join(EXPORT_TYPES)}")
    try:
        tok = load_tokenizer(tokenizer or model)
    except FileNotFoundError as e:
        raise CLIError(f"{e}. llama.cpp needs the tokenizer inside the GGUF: pass --tokenizer PATH") from None
    t0 = time.perf_counter()
    m = load_model(model)
    try:
        path = export_gguf(m, out, tok, type, name=name or Path(model).name.removesuffix(".gguf"),
                           exact_tokenizer=not approximate_tokenizer)
    except ValueError as e:
        hint = " (CLI: --approximate-tokenizer)" if "exact=False" in str(e) else ""
        raise CLIError(f"{e}{hint}") from None
    print(f"exported {model} -> {path} ({type.lower()}, {fmt_bytes(path.stat().st_size)}) in "
          f"{time.perf_counter() - t0:.1f} s")
    return 0
