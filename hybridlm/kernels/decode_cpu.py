"""The fused decode kernels (csrc/decode.cpp): a whole Mamba mixer step, a SwiGLU MLP, a mixture of
experts with its router, attention of one query over the cache, an RMSNorm and a matrix-vector linear,
one C++ call each, for a few rows of one token.

A bench-88m decode step done op by op is ~70 small matmuls and ~2,500 other torch calls; at one
token their dispatch costs as much as the arithmetic, and torch's bf16 matrix-vector product reads
the lm_head at a third of the memory bandwidth. These kernels read each weight once per call,
compute in fp32 (rounding only the output to the model dtype) and split rows/channels over torch's
thread count. The op-by-op modules stay the reference; tests/test_kernels.py compares the two.

They take a call when ``applies``: CPU, fp32 or bf16 activations, fp32/bf16 weights or quantized layers
(quant.QuantLinear: int8/int4, read packed), at most MAX_ROWS rows, and no gradient wanted. Each weight
reaches C++ as a ``Mat`` (csrc/mat.h): its kind, data, scales and layout.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from . import build
from ..config import MIXER_SYMBOL
from .build import ptr
from .elementwise_cpu import rmsnorm_cpu

MAX_ROWS = 4   # rows per call; more rows reuse each weight enough for torch's matmul to win
# rows per call for a quantized linear layer alone: up to these the integer kernel, above them dequantization
# + GEMM. Where torch's GEMMs run in fp32 (CPUs without fast bf16 GEMMs: kernels.gemm_dtype) the kernel's
# 8-row tiles win at every size (8192 x 2560 weight, 2 threads, Zen 3: int4 g32 at 64 / 256 / 512 rows 171 /
# 230 / 202 GOP/s, dequantize + fp32 GEMM 36 / 91 / 115; int8 99 / 174 / 154 against 44 / 103 / 120), so there
# is no limit. With AMX (Sapphire Rapids, 2 threads, the 3B shapes 8192 x 2560, 2560 x 5120, 10240 x 2560;
# the weights dequantized into a reused buffer): int4 g32 at 16 / 32 / 64 / 128 rows 402 / 436 / 442 / 437
# GOP/s against 166 / 327 / 525 / 844 for dequantize + bf16 GEMM, int8 269 / 300 / 310 / 319 against 152 /
# 299 / 511 / 684: the crossover is ~48 and ~32 rows. With AVX512-BF16 but no AMX (Zen 4) it is not measured
# yet: the limits are those the row-by-row kernel had before the tiles against fp32 GEMMs (int8 ~200 rows,
# int4 ~400 on Zen 3).
QUANT_ROWS = {8: 128, 4: 256}
QUANT_ROWS_AMX = {8: 32, 4: 48}


def quant_rows(layer) -> int:
    """The most rows the integer kernel takes for this quantized layer (see QUANT_ROWS)."""
    from . import _AMX, _FAST_BF16
    if not _FAST_BF16:
        return 1 << 40
    return (QUANT_ROWS_AMX if _AMX else QUANT_ROWS)[layer.scheme.bits]


_DTYPES = (torch.float32, torch.bfloat16)


class Mat(ctypes.Structure):
    """csrc/mat.h's Mat: one weight matrix as the kernels read it."""
    _fields_ = [("data", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("min", ctypes.c_void_p),
                ("kind", ctypes.c_int64), ("ld", ctypes.c_int64), ("group", ctypes.c_int64),
                ("scale_bf16", ctypes.c_int64)]


def _is_quant(w) -> bool:
    return hasattr(w, "weight_scale")        # quant.QuantLinear (not imported: quant.py imports kernels)


def _weight(w):
    """A weight tensor, or a QuantLinear, from a tensor or a linear layer."""
    return w if isinstance(w, torch.Tensor) or _is_quant(w) else w.weight


def tensors_of(w) -> tuple:
    """The tensors a weight's Mat points into."""
    w = _weight(w)
    return tuple(t for t in (w.weight, w.weight_scale, w.weight_min) if t is not None) if _is_quant(w) else (w,)


def mat(w) -> Mat:
    """The Mat of a weight [o, k]: an fp32/bf16 tensor, a linear layer, or a QuantLinear. The caller keeps
    the weight alive while the Mat is in use."""
    w = _weight(w)
    if not _is_quant(w):
        return Mat(w.data_ptr(), None, None, _is16(w), w.shape[1], 0, 0)
    s, m = w.weight_scale, w.weight_min
    return Mat(w.weight.data_ptr(), s.data_ptr(), None if m is None else m.data_ptr(),
               2 if w.scheme.bits == 8 else 3, w.ld, w.group, _is16(s))


def applies(x: torch.Tensor, *weights, max_rows: int = MAX_ROWS) -> bool:
    """Whether the decode kernels can compute ``x`` [..., d] with these weights (see module doc)."""
    if x.device.type != "cpu" or x.dtype not in _DTYPES or x.numel() > max_rows * x.shape[-1]:
        return False
    grad = torch.is_grad_enabled() and x.requires_grad
    for w in map(_weight, weights):
        if _is_quant(w):
            if w.weight.device.type != "cpu":
                return False
            continue
        if w.dtype not in _DTYPES or not w.is_contiguous():
            return False
        grad = grad or (torch.is_grad_enabled() and w.requires_grad)
    return not grad


def _is16(t: torch.Tensor) -> int:
    return int(t.dtype == torch.bfloat16)


def _small_params(module: torch.nn.Module, sources: tuple, make) -> tuple:
    """fp32 contiguous tensors ``make(*sources)`` derived from a module's small parameters ``sources``,
    kept on the module and rebuilt when any source is replaced or updated in place (``_version``)."""
    key = tuple(None if p is None else (id(p), p.data_ptr(), p._version) for p in sources)
    hit = module.__dict__.get("_decode_params")
    if hit is None or hit[0] != key:
        with torch.no_grad():
            hit = (key, tuple(None if t is None else t.detach().float().contiguous() for t in make(*sources)))
        module.__dict__["_decode_params"] = hit
    return hit[1]


def linear_step(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a few rows: x [..., k] -> [..., o] in x's dtype; weight [o, k] as ``mat`` takes it."""
    x = x.contiguous()
    w = _weight(weight)
    o, k = (w.out_features, w.in_features) if _is_quant(w) else w.shape
    out = torch.empty(*x.shape[:-1], o, dtype=x.dtype)
    bf = None if bias is None else bias.detach().float().contiguous()
    m = mat(w)
    build.load().hybridlm_linear_step(ptr(x), _is16(x), ctypes.byref(m), ptr(bf), ptr(out),
                                      x.numel() // k, k, o, torch.get_num_threads())
    return out


def dequantize_cpu(layer, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """A QuantLinear's weight as an fp32/bf16 tensor [out, in], in one threaded C++ pass (into ``out``, a
    contiguous tensor of that shape and dtype, when given)."""
    if out is None:
        out = torch.empty(layer.out_features, layer.in_features, dtype=dtype)
    m = mat(layer)
    build.load().hybridlm_dequantize(ctypes.byref(m), ptr(out), _is16(out), layer.out_features,
                                     layer.in_features, build.threads_for(out.numel()))
    return out


def quantize_act_cpu(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """quant.quantize_activations(x).to(dtype) (x fp32/bf16 [..., k], dtype fp32/bf16) in one threaded C++ pass."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=dtype)
    k = x.shape[-1]
    build.load().hybridlm_quantize_act(ptr(x), _is16(x), ptr(out), _is16(out), x.numel() // max(k, 1), k,
                                       build.threads_for(x.numel()))
    return out


def mlp_step(mlp, x: torch.Tensor) -> torch.Tensor:
    """moe.MLP's forward for a few rows: down(silu(gate(x)) * up(x)), x [..., d]."""
    x = x.contiguous()
    f, d = mlp.gate_proj.out_features, mlp.gate_proj.in_features
    out = torch.empty_like(x)
    g, u, dn = mat(mlp.gate_proj), mat(mlp.up_proj), mat(mlp.down_proj)
    build.load().hybridlm_mlp_step(ptr(x), ptr(out), _is16(x), ctypes.byref(g), ctypes.byref(u), ctypes.byref(dn),
                                   x.numel() // d, d, f, torch.get_num_threads())
    return out


def _state_buffers(state, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A Mamba or Mamba-2 layer's (conv, ssm) buffers, checked to be what the step kernels write in place."""
    conv, ssm = state.conv, state.ssm
    if not (conv.is_contiguous() and ssm.is_contiguous() and ssm.dtype == torch.float32 and conv.dtype in _DTYPES):
        raise ValueError(f"the decode kernels need a contiguous {kind} state (conv fp32/bf16, ssm fp32) as "
                         "HybridLM.new_cache allocates it")
    return conv, ssm


def _mamba_sources(m) -> tuple:
    """The mixer's small parameters, in _mamba_small's order."""
    return (m.in_proj.bias, m.out_proj.bias, m.conv1d.weight, m.conv1d.bias, m.dt_layernorm.weight,
            m.b_layernorm.weight, m.c_layernorm.weight, m.dt_proj.bias, m.A_log, m.D)


def _mamba_small(in_b, out_b, conv_w, conv_b, dt_ln, b_ln, c_ln, dt_b, A_log, D) -> tuple:
    """What the kernel reads of them: the conv weight as [d_in, k], A = -exp(A_log)."""
    return in_b, out_b, conv_w[:, 0], conv_b, dt_ln, b_ln, c_ln, dt_b, -torch.exp(A_log.float()), D


def mamba_step(m, x: torch.Tensor, state) -> torch.Tensor:
    """mamba.MambaMixer's forward for one token per row: x [b, 1, d] -> [b, 1, d]; ``state``
    (a cache.MambaState, contiguous) is updated in place."""
    conv, ssm = _state_buffers(state, "Mamba")
    x = x.contiguous()
    b, _, d = x.shape
    out = torch.empty_like(x)
    in_b, out_b, conv_w, conv_b, dt_ln, b_ln, c_ln, dt_b, A, D = _small_params(m, _mamba_sources(m), _mamba_small)
    w_in, w_x, w_dt, w_out = (mat(p) for p in (m.in_proj, m.x_proj, m.dt_proj, m.out_proj))
    build.load().hybridlm_mamba_step(
        ptr(x), ptr(out), _is16(x), ctypes.byref(w_in), ctypes.byref(w_x), ctypes.byref(w_dt), ctypes.byref(w_out),
        ptr(in_b), ptr(out_b), ptr(conv_w), ptr(conv_b), ptr(dt_ln), ptr(b_ln), ptr(c_ln),
        m.dt_layernorm.eps, ptr(dt_b), ptr(A), ptr(D), ptr(conv), _is16(conv), ptr(ssm),
        b, d, m.d_in, m.n, m.r, m.k, torch.get_num_threads())
    return out


def _mamba2_sources(m) -> tuple:
    """The Mamba-2 mixer's small parameters, in _mamba2_small's order."""
    return (m.in_proj.bias, m.out_proj.bias, m.conv1d.weight, m.conv1d.bias, m.dt_bias, m.A_log, m.D, m.norm.weight)


def _mamba2_small(in_b, out_b, conv_w, conv_b, dt_b, A_log, D, norm_w) -> tuple:
    return in_b, out_b, conv_w[:, 0], conv_b, dt_b, -torch.exp(A_log.float()), D, norm_w


def mamba2_step(m, x: torch.Tensor, state) -> torch.Tensor:
    """mamba2.Mamba2Mixer's forward for one token per row: x [b, 1, d] -> [b, 1, d]; ``state`` (a
    cache.Mamba2State, contiguous) is updated in place. fp32 between the projections (the op-by-op path
    rounds y to the model dtype before out_proj)."""
    conv, ssm = _state_buffers(state, "Mamba-2")
    x = x.contiguous()
    b, _, d = x.shape
    out = torch.empty_like(x)
    in_b, out_b, conv_w, conv_b, dt_b, A, D, norm_w = _small_params(m, _mamba2_sources(m), _mamba2_small)
    w_in, w_out = mat(m.in_proj), mat(m.out_proj)
    lo, hi = m.dt_limit
    build.load().hybridlm_mamba2_step(
        ptr(x), ptr(out), _is16(x), ctypes.byref(w_in), ctypes.byref(w_out), ptr(in_b), ptr(out_b), ptr(conv_w),
        ptr(conv_b), ptr(dt_b), float(lo), float(hi), ptr(A), ptr(D), ptr(norm_w), m.norm.group, m.norm.eps,
        ptr(conv), _is16(conv), ptr(ssm), b, d, m.h, m.p, m.g, m.n, m.k, torch.get_num_threads())
    return out


def attn_step(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, valid: torch.Tensor | None,
              slots: int, heads: int) -> torch.Tensor:
    """Attention of one query token per row over cache slots [0, slots): q [b, 1, heads * d_h] (the q_proj
    output; any RoPE applied), k_cache/v_cache [b, h_kv, s_max, d_h], valid [b, s_max] bool or None.
    Returns [b, 1, heads * d_h] in q's dtype, scaled by 1/sqrt(d_h) like SDPA."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.dtype == v_cache.dtype in _DTYPES):
        raise ValueError("the decode attention kernel needs contiguous fp32/bf16 K/V buffers as "
                         "HybridLM.new_cache allocates them")
    q = q.contiguous()
    b, h_kv, s_max, d_h = k_cache.shape
    out = torch.empty_like(q)
    if valid is not None and valid.stride(-1) != 1:
        valid = valid.contiguous()
    build.load().hybridlm_attn_step(ptr(q), ptr(out), _is16(q), ptr(k_cache), ptr(v_cache), _is16(k_cache),
                                    ptr(valid), 0 if valid is None else valid.stride(0), b, heads, h_kv, s_max,
                                    slots, d_h, d_h ** -0.5, torch.get_num_threads())
    return out


def _pointer_array(pointers: list[int]) -> ctypes.Array:
    """A C array of pointers (an argument of type ``const void* const*``)."""
    return (ctypes.c_void_p * len(pointers))(*pointers)


def _mat_array(layers) -> tuple[ctypes.Array, list[Mat]]:
    """A C array of pointers to the layers' Mats (``const Mat* const*``), and the Mats it points to (keep
    them alive while the array is in use)."""
    mats = [mat(layer) for layer in layers]
    return _pointer_array([ctypes.addressof(m) for m in mats]), mats


def moe_step(moe, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """moe.MoE's forward for a few rows, router included: x [..., d] -> (out like x, router logits
    [rows, e] fp32)."""
    x = x.contiguous()
    d = x.shape[-1]
    rows, e = x.numel() // d, len(moe.experts)
    f = moe.experts[0].gate_proj.out_features
    out = torch.empty_like(x)
    logits = torch.empty(rows, e, dtype=torch.float32)
    (gate, gm), (up, um), (down, dm) = (_mat_array([getattr(ex, proj) for ex in moe.experts])
                                        for proj in ("gate_proj", "up_proj", "down_proj"))
    router = mat(moe.router)
    build.load().hybridlm_moe_step(ptr(x), ptr(out), _is16(x), ctypes.byref(router), gate, up, down,
                                   ptr(logits), rows, d, f, e, moe.top_k, int(moe.renormalize),
                                   torch.get_num_threads())
    return out, logits


# ---- the whole step in one call -----------------------------------------------------------------------
# Record fields of csrc/decode.cpp's hybridlm_decode_layers, in its order; attention layers put their
# fields where the Mamba ones start.
_HEAD = ("mixer", "ffn", "norm1", "norm2", "norm_bf16", "consts")
_MAMBA = ("w_in", "w_x", "w_dt", "w_out", "in_b", "out_b", "conv_w", "conv_b", "dt_ln", "b_ln", "c_ln", "dt_b", "A",
          "D", "conv", "conv_bf16", "ssm", "d_in", "n", "r", "k")
_ATTN = ("wq", "wk", "wv", "wo", "kc", "vc", "kv_bf16", "h", "h_kv", "s", "dh")
_FFN = ("f_a", "f_b", "f_c", "f_d", "ff", "e", "topk", "renorm", "sh_a", "sh_b", "sh_c", "sh_ff")
_MAMBA2 = tuple("m2_" + k for k in ("w_in", "w_out", "in_b", "out_b", "conv_w", "conv_b", "dt_b", "lims", "A", "D",
                                     "norm_w", "group", "conv", "conv_bf16", "ssm", "h", "p", "g", "n", "k"))
_INDEX = {**{k: i for i, k in enumerate(_HEAD + _MAMBA + _FFN)}, **{k: len(_HEAD) + i for i, k in enumerate(_ATTN)},
          **{k: len(_HEAD) + i for i, k in enumerate(_MAMBA2)}}
_REC = len(_HEAD + _MAMBA + _FFN)


# tokens x rows the whole step takes at once: a decode step of up to MAX_ROWS rows, or a speculative verify
# chunk (k + 1 tokens of a row; the projections read each weight once per 4 rows, the recurrences and the
# attention go token by token). Past this a chunk is a prompt, and the layer-by-layer path's GEMMs win.
PLAN_ROWS = 8
# With AMX tiles (csrc/decode.cpp: gemv_rows_amx) bf16 weights times 8 rows cost what one row does (at the read
# bandwidth: benchmarks/results/quant_gemv.md), so a model computing in bf16 takes up to AMX_ROWS rows per
# one-call step and verify chunks of up to AMX_PLAN_ROWS rows x tokens. Through the engine (2-core Sapphire
# Rapids, the 93M model of benchmarks/results/speculative_spr.md, bf16, `python benchmarks/engine_speculative.py
# --model M --dtype bfloat16`): 8 requests decode at 244-255 tok/s instead of 102-108 layer by layer; with
# prompt lookup 2 / 4 / 8 requests reach 266-305 / 225-234 / 286-288 tok/s with chunks of 32 (two runs; 16:
# 296 / 208 / 253; 8: 201 / 153 / 192). benchmarks/results/engine_speculative_spr.md.
AMX_ROWS, AMX_PLAN_ROWS = 8, 32


@functools.cache
def _amx_tiles() -> bool:
    try:
        return bool(build.load().hybridlm_amx_tiles(-1))
    except build.KernelUnavailable:
        return False


def row_limits(dtype: torch.dtype) -> tuple[int, int]:
    """(rows of a one-call decode step, rows x tokens of a one-call verify chunk) for a model computing in
    ``dtype``: MAX_ROWS / PLAN_ROWS, larger for bf16 where the CPU has AMX tiles."""
    return (AMX_ROWS, AMX_PLAN_ROWS) if dtype == torch.bfloat16 and _amx_tiles() else (MAX_ROWS, PLAN_ROWS)


def plan_applies(model, cache, input_ids: torch.Tensor, mask) -> bool:
    """Whether ``DecodePlan`` can run this forward: rows x tokens <= PLAN_ROWS (one token per row: at most
    MAX_ROWS rows; both larger for bf16 on AMX, ``row_limits``; a multi-token chunk only without Mamba-2
    layers), no mask, no gradient, CPU, fp32/bf16, and only layers the records describe (``jamba_layers``)."""
    w = model.model.embed_tokens.weight
    b, l = input_ids.shape
    cfg = model.config
    rows, plan_rows = row_limits(w.dtype)
    return (mask is None and (b <= rows if l == 1 else
                              b * l <= plan_rows and MIXER_SYMBOL["mamba2"] not in cfg.pattern.lower())
            and input_ids.device.type == "cpu" and w.dtype in _DTYPES and jamba_layers(model.config) is None
            and not (torch.is_grad_enabled() and w.requires_grad))


def verify_tokens(model, cache, rows: int) -> int | None:
    """The most tokens per row a speculative verify chunk of ``rows`` rows may hold to run as one call
    (rows x tokens <= PLAN_ROWS), where a plain step of those rows is one call; None where it is not (the
    chunk goes layer by layer either way)."""
    probe = model.model.embed_tokens.weight.new_zeros(rows, 1, dtype=torch.long)
    if not (plan_applies(model, cache, probe, None) and plan_applies(model, cache, probe.new_zeros(1, 2), None)):
        return None
    return row_limits(model.model.embed_tokens.weight.dtype)[1] // rows


def jamba_layers(cfg) -> str | None:
    """None when every layer is one csrc/decode.cpp's whole-step record describes (Mamba-1, Mamba-2 and full
    attention without positional encoding as mixers, SwiGLU MLPs or softmax-routed MoE with or without a
    shared expert, Granite's multipliers); else what is not."""
    p = cfg.pattern.lower()
    if cfg.single_sublayer:
        return "layers with a mixer alone or a feed-forward alone"
    if cfg.mlp_hidden_act != "silu":
        return f"{cfg.mlp_hidden_act} MLPs"
    if cfg.router_scoring != "softmax":
        return f"a {cfg.router_scoring} router"
    if MIXER_SYMBOL["local"] in p:
        return "local attention"
    if cfg.rope_theta is not None:
        return "RoPE"
    return None


class DecodePlan:
    """Pointers to every weight (as a Mat) and cache buffer a decode step reads, laid out for
    ``hybridlm_decode_layers``; built once per (model, cache) and rebuilt when a parameter or buffer is
    replaced, moved or updated in place, or a cache buffer is replaced."""

    def __init__(self, model, cache):
        if build.load().hybridlm_decode_rec_len() != _REC:
            raise RuntimeError("kernels/csrc/decode.cpp and decode_cpu.py disagree on the decode record layout")
        self.model_id = id(model)
        self.keep: list = []                              # what the records point into
        self.watch: dict = {}                             # (id(owner dict), key) -> (owner, key, tensor, ptr, version)
        self.states: list = []                            # (layer, buffer name, data_ptr) of the cache
        cfg = model.config
        recs = torch.zeros(cfg.num_hidden_layers, _REC, dtype=torch.int64)
        # the residual multiplier and the attention score scale (0: 1/sqrt(d_h)), read by every record
        consts = torch.tensor([cfg.residual_multiplier, cfg.attention_multiplier or 0.0], dtype=torch.float32)
        self.keep.append(consts)
        for i, layer in enumerate(model.model.layers):
            rec = {"norm1": self._p(layer.input_layernorm, "weight"), "norm2": self._p(layer.pre_ff_layernorm, "weight"),
                   "norm_bf16": _is16(layer.input_layernorm.weight), "consts": consts.data_ptr()}
            state = cache.kernel_view()[0][i]
            if layer.kind == "mamba2":
                m = layer.mamba
                small = self._small(m, _mamba2_small(*_mamba2_sources(m)))
                lims = torch.tensor(m.dt_limit, dtype=torch.float32)
                self.keep.append(lims)
                rec.update(mixer=2, m2_w_in=self._m(m.in_proj), m2_w_out=self._m(m.out_proj), m2_lims=lims.data_ptr(),
                           m2_group=m.norm.group, m2_conv=self._state(i, state, "conv"), m2_conv_bf16=_is16(state.conv),
                           m2_ssm=self._state(i, state, "ssm"), m2_h=m.h, m2_p=m.p, m2_g=m.g, m2_n=m.n, m2_k=m.k,
                           **{"m2_" + k: ptr(t) or 0 for k, t in zip(("in_b", "out_b", "conv_w", "conv_b", "dt_b", "A",
                                                                      "D", "norm_w"), small)})
            elif layer.kind == "mamba":
                m = layer.mamba
                small = self._small(m, _mamba_small(*_mamba_sources(m)))
                rec.update(mixer=0, w_in=self._m(m.in_proj), w_x=self._m(m.x_proj), w_dt=self._m(m.dt_proj),
                           w_out=self._m(m.out_proj),
                           conv=self._state(i, state, "conv"), conv_bf16=_is16(state.conv),
                           ssm=self._state(i, state, "ssm"),
                           d_in=m.d_in, n=m.n, r=m.r, k=m.k,
                           **{k: ptr(t) or 0 for k, t in zip(("in_b", "out_b", "conv_w", "conv_b", "dt_ln", "b_ln",
                                                              "c_ln", "dt_b", "A", "D"), small)})
            else:
                a = layer.self_attn
                rec.update(mixer=1, wq=self._m(a.q_proj), wk=self._m(a.k_proj), wv=self._m(a.v_proj), wo=self._m(a.o_proj),
                           kc=self._state(i, state, "k"), vc=self._state(i, state, "v"), kv_bf16=_is16(state.k),
                           h=a.h, h_kv=a.h_kv, s=state.k.shape[2], dh=a.d_h)
            ff = layer.feed_forward
            if hasattr(ff, "experts"):
                arrays = [_pointer_array([self._m(getattr(ex, proj)) for ex in ff.experts])
                          for proj in ("gate_proj", "up_proj", "down_proj")]
                self.keep += arrays
                rec.update(ffn=1, f_a=self._m(ff.router), f_b=ctypes.addressof(arrays[0]),
                           f_c=ctypes.addressof(arrays[1]), f_d=ctypes.addressof(arrays[2]),
                           ff=ff.experts[0].gate_proj.out_features, e=len(ff.experts), topk=ff.top_k,
                           renorm=int(ff.renormalize))
            else:
                rec.update(ffn=0, f_a=self._m(ff.gate_proj), f_b=self._m(ff.up_proj), f_c=self._m(ff.down_proj),
                           ff=ff.gate_proj.out_features)
            sh = layer.shared_mlp
            if sh is not None:
                rec.update(sh_a=self._m(sh.gate_proj), sh_b=self._m(sh.up_proj), sh_c=self._m(sh.down_proj),
                           sh_ff=sh.gate_proj.out_features)
            for k, v in rec.items():
                recs[i, _INDEX[k]] = v
        self.recs = recs

    def _p(self, module, name: str) -> int:
        """Watch a parameter (or buffer) of a module; its data pointer."""
        owner = module._parameters if name in module._parameters else module._buffers
        t = owner[name]
        if t is not None:
            self.watch[id(owner), name] = (owner, name, t, t.data_ptr(), t._version)
            if not t.is_contiguous():
                raise ValueError(f"the decode plan needs contiguous weights; {name} of {type(module).__name__} is not")
        return 0 if t is None else t.data_ptr()

    def _small(self, mixer, tensors) -> list:
        """fp32 contiguous copies of a mixer's small parameters (``tensors``, derived from them), kept alive
        for the records; every parameter of the mixer is watched, as the copies derive from them."""
        small = [None if t is None else t.detach().float().contiguous() for t in tensors]
        self.keep += small
        for mod in mixer.modules():
            for name in mod._parameters:
                self._p(mod, name)
        return small

    def _m(self, layer) -> int:
        """Watch a linear or quantized layer's weight tensors; the address of its Mat."""
        if not applies(torch.empty(1, 1), layer):
            raise ValueError(f"the decode plan cannot read a {type(layer).__name__} weight of dtype "
                             f"{tensors_of(layer)[0].dtype}; it reads fp32, bf16, int8 and int4")
        for name in ("weight", "weight_scale", "weight_min"):
            if name in layer._parameters or name in layer._buffers:
                self._p(layer, name)
        m = mat(layer)
        self.keep.append(m)
        return ctypes.addressof(m)

    def _state(self, i: int, state, name: str) -> int:
        t = getattr(state, name)
        if not t.is_contiguous() or t.dtype not in _DTYPES:
            raise ValueError("the decode plan needs the contiguous fp32/bf16 cache buffers HybridLM.new_cache "
                             "allocates")
        self.states.append((i, name, t.data_ptr()))
        return t.data_ptr()

    def current(self, model, cache) -> bool:
        """False when the model's weights or the cache's buffers are no longer the ones planned."""
        if id(model) != self.model_id:
            return False
        for owner, key, t, p, v in self.watch.values():
            if owner.get(key) is not t or t.data_ptr() != p or t._version != v:
                return False
        layers = cache.kernel_view()[0]
        return all(getattr(layers[i], name).data_ptr() == p for i, name, p in self.states)


def _trails(layers, b: int, l: int) -> tuple[torch.Tensor | None, list]:
    """The Mamba trails a speculative verify asked for (``Cache.checkpoint(trail=True)``): per layer the
    two buffers the kernel fills (conv inputs [b, l, d_in], SSM states before each token [b, l, d_in, n],
    fp32) as a [layers, 2] pointer table, or None when no layer records; and the (trail, ssm) pairs whose
    ``last`` is the state the call leaves."""
    pointers, pending = [0] * (2 * len(layers)), []
    for i, s in enumerate(layers):
        trail = getattr(s, "trail", None)
        if trail is not None and trail.u is None:
            trail.u = torch.empty(b, l, s.ssm.shape[1], dtype=torch.float32)
            trail.ssm = torch.empty(b, l, *s.ssm.shape[1:], dtype=torch.float32)
            pointers[2 * i: 2 * i + 2] = trail.u.data_ptr(), trail.ssm.data_ptr()
            pending.append((trail, s.ssm))
    return (torch.tensor(pointers, dtype=torch.int64) if pending else None), pending


def plan_step(model, cache, input_ids: torch.Tensor) -> torch.Tensor:
    """HybridLM.forward through one C++ call for all layers, for l tokens of each of b rows with a cache
    (``plan_applies``): input_ids [b, l] -> logits [b, l, v] in the model's dtype; the cache advances by l
    positions. l > 1 is a speculative verify chunk: the tokens of a row go through the recurrences in order,
    and a trail the cache asked for is recorded."""
    plan = cache.kernel_plan
    if plan is None or not plan.current(model, cache):
        plan = cache.kernel_plan = DecodePlan(model, cache)
    b, l = input_ids.shape
    layers, valid, start = cache.kernel_view()
    table, pending = _trails(layers, b, l)
    cache.advance(l)
    emb = model.model.embed_tokens
    x = emb(input_ids).reshape(b * l, -1).float()                                     # [b * l, d] fp32 residual
    cfg = model.config
    if cfg.embedding_multiplier != 1:
        x = x * cfg.embedding_multiplier
    x = x.contiguous()
    d = x.shape[1]
    final = model.model.final_layernorm
    build.load().hybridlm_decode_layers(ptr(plan.recs), plan.recs.shape[0], ptr(x), ptr(valid),
                                        valid.stride(0), start, b, l, ptr(table), d, final.eps,
                                        torch.get_num_threads())
    for trail, ssm in pending:
        trail.last = ssm.clone()
    h = rmsnorm_cpu(final, x)
    logits = linear_step(h, model.lm_head)
    if cfg.logits_scaling != 1:
        logits = logits / cfg.logits_scaling
    return logits.to(emb.weight.dtype).view(b, l, -1)
