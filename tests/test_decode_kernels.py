"""The fused decode kernels (kernels/decode_cpu.py, csrc/decode.cpp) against the modules' own torch ops.

fp32: the two paths compute the same sums in a different order, so they agree to ~1e-6.
bf16: the op-by-op path rounds to bf16 after every op while the kernels keep fp32 between ops, so
both are compared with an fp32 computation on the same (bf16) weights, and the kernels must be at least
as close to it. Sizes reach the corners: widths that are not a multiple of the 16/32-lane vectors,
d_state above one vector, GQA groups of 1, 2 and 4, and slot runs split between threads.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hybridlm import HybridLM, kernels, preset
from hybridlm.cache import Cache
from hybridlm.generate import decode_step, prefill
from hybridlm.kernels import decode_cpu
from hybridlm.mamba import MambaMixer
from hybridlm.moe import MLP, MoE
from hybridlm.norm import RMSNorm

from .conftest import randomize_


pytestmark = pytest.mark.usefixtures("cpu_kernels")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def err(a, b):
    return (a.float() - b.float()).abs().max().item()


# ---- matrix-vector products, norms ---------------------------------------------------------------------
@pytest.mark.parametrize("k", [16, 48, 100, 512])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 8, 11])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_step_fp32(k, rows, bias):
    g = gen(k + rows)
    x, w = torch.randn(rows, 1, k, generator=g), torch.randn(37, k, generator=g)
    b = torch.randn(37, generator=g) if bias else None
    out = decode_cpu.linear_step(x, w, b)
    assert out.shape == (rows, 1, 37) and out.dtype == torch.float32
    assert err(out, F.linear(x, w, b)) < 1e-4


@pytest.mark.parametrize("k", [16, 100, 512])
@pytest.mark.parametrize("rows", [1, 3, 7])
def test_linear_step_bf16_within_output_rounding(k, rows):
    g = gen(k)
    x, w = torch.randn(rows, k, generator=g).bfloat16(), torch.randn(70, k, generator=g).bfloat16()
    exact = F.linear(x.float(), w.float())
    out = decode_cpu.linear_step(x, w)
    assert out.dtype == torch.bfloat16
    # one bf16 rounding of the output (relative 2^-8), as torch's own bf16 matmul has
    assert err(out, exact) <= exact.abs().max().item() * 2 ** -8 * 1.01
    assert err(out, exact) <= err(F.linear(x, w), exact) * 1.01 + 1e-6


@pytest.mark.parametrize("rows", [2, 5, 8, 16, 19])
@pytest.mark.parametrize("o, k", [(70, 100), (130, 512), (64, 40), (200, 33), (48, 16)])
def test_bf16_rows_on_amx_tiles_match_row_dots(rows, o, k):
    """Where the CPU has AMX, bf16 weights times 2+ rows run on tiles (64 / 16 weight rows at a time, the
    last k % 32 columns and the rows past a 16-row block by row dots); both paths compute the products of the
    same bf16-rounded x, so both agree with the exact fp32 product of those to fp32 rounding."""
    from hybridlm.kernels import build
    lib = build.load()
    if not lib.hybridlm_amx_tiles(-1):
        pytest.skip("no AMX tiles on this CPU (or not granted by the OS): row dots only")
    g = gen(rows * o + k)
    x, w = torch.randn(rows, k, generator=g), torch.randn(o, k, generator=g).bfloat16()
    bias = torch.randn(o, generator=g)
    exact = F.linear(x.bfloat16().float(), w.float(), bias)
    # row_dot_bf16 rounds x to bf16 in whole 32-column blocks only; the tail stays fp32 in both paths
    tail = k % 32
    if tail:
        exact += F.linear(x[:, k - tail:] - x[:, k - tail:].bfloat16().float(), w[:, k - tail:].float())
    tiles = decode_cpu.linear_step(x, w, bias)
    try:
        assert lib.hybridlm_amx_tiles(1) == 0
        dots = decode_cpu.linear_step(x, w, bias)
    finally:
        assert lib.hybridlm_amx_tiles(0) == 1
    scale = exact.abs().max().item()
    assert err(tiles, exact) < 2e-6 * scale * k ** 0.5
    assert err(dots, exact) < 2e-6 * scale * k ** 0.5
    assert "AMX tiles" in kernels.report()["decode"]


def test_linear_dispatch_rules():
    w = torch.randn(8, 16)
    few, many = torch.randn(4, 16), torch.randn(5, 16)
    assert kernels.decode_kernels(few, w) and not kernels.decode_kernels(many, w)
    assert not kernels.decode_kernels(few.half(), w.half())              # fp16: torch ops
    assert not kernels.decode_kernels(few, w.t().contiguous().t())       # non-contiguous weight
    assert kernels.decode_kernels(few.bfloat16(), w)                     # activation and weight dtypes may differ
    wg = torch.nn.Parameter(w)
    assert not kernels.decode_kernels(few, wg)                           # a gradient is wanted: autograd ops
    with torch.no_grad():
        assert kernels.decode_kernels(few, wg)
    assert "decode" in kernels.report()


def test_mixed_weight_dtypes():
    """Each weight reaches the kernel with its own kind, so one call may mix fp32 and bf16 weights."""
    g = gen(3)
    x = torch.randn(2, 1, 16, generator=g)
    mlp = MLP(16, 24)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    mlp.up_proj.bfloat16().requires_grad_(False)
    mlp.requires_grad_(False)
    assert decode_cpu.applies(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    ref = mlp.down_proj(F.silu(mlp.gate_proj(x.view(2, 16)).float()) * F.linear(x.view(2, 16), mlp.up_proj.weight.float()))
    assert err(decode_cpu.mlp_step(mlp, x).view(2, 16), ref) < 1e-4


def test_grad_enabled_parameters_take_the_autograd_path():
    """A training forward of a few rows must not enter the kernels (they have no backward)."""
    model = HybridLM(preset("tiny")).init_weights(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 3), generator=gen())
    model.loss(ids[:, :-1], ids[:, 1:])["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None and "experts" not in n]
    assert not missing


# ---- MLP --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 4])
def test_mlp_step(dtype, rows, backend):
    mlp = MLP(72, 50)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen(p.numel())) * 0.2)
    x = torch.randn(rows, 1, 72, generator=gen(7))
    backend("ref")
    with torch.no_grad():
        mlp_d, xd = mlp.to(dtype), x.to(dtype)
        ref = mlp_d(xd)
        backend("auto")
        fast = mlp_d(xd)
        assert kernels.decode_kernels(xd, mlp_d.gate_proj.weight)
    assert fast.dtype == dtype
    if dtype == torch.float32:
        assert err(fast, ref) < 1e-5
    else:
        exact_bf = MLP(72, 50)
        exact_bf.load_state_dict({k: v.float() for k, v in mlp_d.state_dict().items()})
        with torch.no_grad():
            backend("ref")
            exact = exact_bf(xd.float())
        assert err(fast, exact) <= err(ref, exact) * 1.01 + 1e-6


# ---- MoE with its router --------------------------------------------------------------------------
@pytest.mark.parametrize("experts,top_k,renorm", [(4, 2, False), (5, 3, True), (3, 1, False)])
@pytest.mark.parametrize("rows", [1, 3])
def test_moe_step_matches_grouped_dispatch(experts, top_k, renorm, rows, backend):
    """Same experts chosen, same weights (not renormalised unless asked), same sum; router logits too."""
    cfg = preset("tiny", num_experts=experts, num_experts_per_tok=top_k, router_renormalize=renorm,
                 hidden_size=72, intermediate_size=50)
    moe = MoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen(p.numel() + experts)) * 0.3)
    x = torch.randn(rows, 1, 72, generator=gen(rows))
    with torch.no_grad():
        backend("ref")
        want, want_logits = moe(x)
        backend("auto")
        assert kernels.decode_kernels(x, moe.router.weight)
        out, logits = moe(x)
    assert out.shape == want.shape and logits.shape == (rows, experts)
    assert err(logits, want_logits) < 1e-5
    assert err(out, want) < 1e-5 * max(1.0, want.abs().max().item())


# ---- attention over the cache -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,h_kv,d_h", [(4, 4, 16), (4, 2, 24), (8, 2, 64), (3, 1, 5)])
@pytest.mark.parametrize("slots", [1, 37, 700])
def test_attn_step_matches_sdpa(dtype, h, h_kv, d_h, slots):
    b, s_max = 2, 768
    g = gen(slots + h)
    q = torch.randn(b, 1, h * d_h, generator=g).to(dtype)
    k = torch.randn(b, h_kv, s_max, d_h, generator=g).to(dtype)
    v = torch.randn(b, h_kv, s_max, d_h, generator=g).to(dtype)
    valid = torch.rand(b, s_max, generator=g) > 0.3
    valid[:, slots - 1] = True                           # the newest token is always visible
    out = decode_cpu.attn_step(q, k, v, valid, slots, h)
    qh = q.view(b, 1, h, d_h).transpose(1, 2).float()
    want = F.scaled_dot_product_attention(qh, k[:, :, :slots].float(), v[:, :, :slots].float(),
                                          attn_mask=valid[:, None, None, :slots], enable_gqa=h != h_kv)
    want = want.transpose(1, 2).reshape(b, 1, h * d_h)
    assert out.dtype == dtype
    assert err(out, want) < (1e-5 if dtype == torch.float32 else 2 ** -8 * want.abs().max().item() + 1e-6)


def test_attn_step_without_mask_and_threads(monkeypatch):
    """valid=None reads every slot; one thread and several give the same result."""
    g = gen(3)
    q, k, v = torch.randn(1, 1, 128, generator=g), torch.randn(1, 2, 1024, 32, generator=g), \
        torch.randn(1, 2, 1024, 32, generator=g)
    want = F.scaled_dot_product_attention(q.view(1, 1, 4, 32).transpose(1, 2), k, v, enable_gqa=True)
    outs = []
    for t in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda t=t: t)
        outs.append(decode_cpu.attn_step(q, k, v, None, 1024, 4))
    for o in outs:
        assert err(o, want.transpose(1, 2).reshape(1, 1, 128)) < 1e-5


# ---- the Mamba mixer step -----------------------------------------------------------------------------
MIXERS = [dict(),
          dict(mamba_dt_rank=5, mamba_d_state=5, mamba_d_conv=2, mamba_proj_bias=True, mamba_conv_bias=False),
          dict(mamba_d_state=20, mamba_d_conv=3, hidden_size=40, mamba_dt_rank=3)]


def check_mixer_steps(cls, cfg, state_cfg, dtype, rows, backend, spy: str):
    """Eight decode steps of one mixer (``cls``) from a prefilled state, three ways: an fp32 copy
    ("exact"), torch ops in ``dtype`` ("ref") and the fused kernel in ``dtype`` ("auto", which must call the
    step ``spy``, the dotted path the mixer's module calls it by). Outputs and both states: fp32 kernel ==
    torch ops to ~1e-5; bf16: the kernel keeps fp32 between ops, so it is at least as close to the fp32
    computation as the op-by-op path."""
    mixer = cls(cfg)
    randomize_(mixer, seed=1)
    mixer = mixer.to(dtype)
    x = torch.randn(rows, 12, cfg.hidden_size, generator=gen(2)).to(dtype)
    runs = {}
    for name, model_dtype in (("exact", torch.float32), ("ref", dtype), ("auto", dtype)):
        backend("ref" if name != "auto" else "auto")
        m = mixer if model_dtype == dtype else cls(cfg)
        if m is not mixer:
            m.load_state_dict({k: v.float() for k, v in mixer.state_dict().items()})
        state = Cache.allocate(state_cfg, rows, 16, model_dtype).layers[0]
        calls = []
        real = getattr(decode_cpu, spy.split(".")[-1])
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(spy, lambda *a: calls.append(1) or real(*a))
            with torch.no_grad():
                m(x[:, :4].to(model_dtype), state)           # prefill (torch ops / C++ scan)
                ys = [m(x[:, t:t + 1].to(model_dtype), state) for t in range(4, 12)]
        assert len(calls) == (8 if name == "auto" else 0)
        runs[name] = (torch.cat(ys, 1), state.ssm.clone(), state.conv.float().clone())
    if dtype == torch.float32:
        for a, b in zip(runs["auto"], runs["ref"]):
            assert err(a, b) < 1e-5 * max(1.0, b.abs().max().item())
    else:
        for a, r, e in zip(runs["auto"], runs["ref"], runs["exact"]):
            assert err(a, e) <= err(r, e) * 1.05 + 1e-3 * e.abs().max().item()


@pytest.mark.parametrize("over", MIXERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_step_matches_op_by_op(over, dtype, backend):
    """Eight decode steps of one mixer from a prefilled state: outputs and both states, kernel vs torch ops."""
    cfg = preset("tiny", **over)
    check_mixer_steps(MambaMixer, cfg, cfg.replace(layout="m", num_hidden_layers=1), dtype, 3, backend,
                      "hybridlm.mamba.mamba_step")


MAMBA2 = dict(layout="s", num_hidden_layers=1, mamba2_n_heads=6, mamba2_head_dim=5, mamba2_n_groups=1,
              mamba2_d_state=20, hidden_size=40)


@pytest.mark.parametrize("over", [dict(), dict(mamba2_n_groups=3, mamba2_d_state=7, mamba_proj_bias=True),
                                  dict(mamba2_norm_grouped=False, mamba2_dt_limit=(0.01, 0.4), mamba_conv_bias=False),
                                  dict(mamba2_n_heads=4, mamba2_head_dim=16, mamba2_n_groups=2, mamba2_d_state=32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
def test_mamba2_step_matches_op_by_op(over, dtype, rows, backend):
    """The same for a Mamba-2 mixer: groups of B/C, d_state across and below a vector, dt clamped, biases,
    the norm over groups or the whole width."""
    from hybridlm.mamba2 import Mamba2Mixer
    cfg = preset("tiny", **{**MAMBA2, **over})
    check_mixer_steps(Mamba2Mixer, cfg, cfg, dtype, rows, backend, "hybridlm.mamba2.mamba2_step")


# ---- whole model --------------------------------------------------------------------------------------
LAYOUTS = [dict(), dict(layout="mAmA", num_hidden_layers=4, rope_theta=10000.0),
           dict(layout="mWmW", num_hidden_layers=4, sliding_window=5)]


@pytest.mark.parametrize("over", LAYOUTS)
def test_decode_steps_fp32_same_as_reference(over, backend):
    """Prefill then greedy decode with left-padded rows: logits and tokens equal the torch-op path."""
    model = HybridLM(preset("tiny", **over)).init_weights(0)
    randomize_(model, seed=4)
    model.eval()
    ids = torch.randint(3, model.config.vocab_size, (3, 9), generator=gen(5))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, :4] = False                                  # a left-padded row
    out = {}
    for name in ("ref", "auto"):
        backend(name)
        cache = model.new_cache(3, 24)
        logits = [prefill(model, cache, ids, mask)]
        for _ in range(6):
            logits.append(decode_step(model, cache, logits[-1].argmax(-1)))
        out[name] = torch.stack(logits)
    assert err(out["auto"], out["ref"]) < 1e-4
    assert torch.equal(out["auto"].argmax(-1), out["ref"].argmax(-1))


def test_decode_bf16_closer_to_fp32_than_op_by_op(backend):
    """bench-88m widths, dense MLPs (an MoE router near a tie may flip either path's expert choice): the
    fused bf16 decode stays within bf16 error of an fp32 run on the same weights."""
    cfg = preset("bench-88m", num_hidden_layers=4, layout="mmam", num_experts=1, num_experts_per_tok=1,
                 vocab_size=512)
    model = HybridLM(cfg).init_weights(0)
    randomize_(model, seed=6, scale=0.1)
    bf = HybridLM(cfg)
    bf.load_state_dict(model.state_dict())
    bf = bf.to(torch.bfloat16).eval()
    f32 = HybridLM(cfg).eval()
    f32.load_state_dict({k: v.float() for k, v in bf.state_dict().items()})
    ids = torch.randint(0, cfg.vocab_size, (1, 16), generator=gen(8))

    def run(m, name):
        backend(name)
        cache = m.new_cache(1, 32)
        logits = [prefill(m, cache, ids[:, :8])]
        logits += [decode_step(m, cache, ids[:, t]) for t in range(8, 16)]
        return torch.stack(logits).float()
    exact = run(f32, "ref")
    fast, ref = run(bf, "auto"), run(bf, "ref")
    scale = exact.abs().max().item()
    assert err(fast, exact) < 0.05 * scale
    # the mean error, not the max: one logit's max over the prefill step (the same GEMMs either way, rounded
    # once to bf16) decided the old max-based comparison by luck; over all steps the fused path is ~2x closer
    assert (fast - exact).abs().mean() <= (ref - exact).abs().mean() * 1.05


# ---- the whole step in one call (DecodePlan) -----------------------------------------------------------
def decode_run(model, ids, steps=6, mask=None):
    cache = model.new_cache(ids.shape[0], ids.shape[1] + steps + 1)
    logits = [prefill(model, cache, ids, mask)]
    for _ in range(steps):
        logits.append(decode_step(model, cache, logits[-1].argmax(-1)))
    return torch.stack(logits), cache


@pytest.mark.parametrize("over", [dict(), dict(router_renormalize=True, num_experts=3, num_experts_per_tok=2),
                                  dict(layout="aMmA", num_hidden_layers=4, mamba_proj_bias=True)])
def test_plan_step_equals_layer_by_layer(over, monkeypatch):
    """The one-call step and the per-layer kernels give the same logits, tokens and cache states (fp32),
    left-padded batch included; and the plan really ran."""
    model = HybridLM(preset("tiny", **over)).init_weights(0)
    randomize_(model, seed=9)
    model.eval()
    ids = torch.randint(3, model.config.vocab_size, (3, 7), generator=gen(10))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[2, :3] = False
    calls = []
    real = decode_cpu.plan_step
    monkeypatch.setattr(decode_cpu, "plan_step", lambda *a: calls.append(1) or real(*a))
    fast, cache_fast = decode_run(model, ids, mask=mask)
    assert len(calls) == 6
    monkeypatch.setattr(decode_cpu, "plan_applies", lambda *a: False)
    slow, cache_slow = decode_run(model, ids, mask=mask)
    assert len(calls) == 6
    assert err(fast, slow) < 1e-4 and torch.equal(fast.argmax(-1), slow.argmax(-1))
    for (k, a), b in zip(cache_fast.tensors().items(), cache_slow.tensors().values()):
        assert err(a, b) < 1e-4, k


def chunk_and_spy(model, b: int, l: int, monkeypatch):
    """A seeded prompt [b, 9] and verify chunk [b, l], and the input shapes of every one-call step from now."""
    prompt = torch.randint(3, model.config.vocab_size, (b, 9), generator=gen(12))
    chunk = torch.randint(3, model.config.vocab_size, (b, l), generator=gen(13))
    calls = []
    real = decode_cpu.plan_step
    monkeypatch.setattr(decode_cpu, "plan_step", lambda *a: calls.append(a[2].shape) or real(*a))
    return prompt, chunk, calls


@pytest.mark.parametrize("over", [dict(), dict(router_renormalize=True, num_experts=3, num_experts_per_tok=2),
                                  dict(layout="aMmA", num_hidden_layers=4, mamba_proj_bias=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, "int8", "int4:g32"])
@pytest.mark.parametrize("b, l", [(1, 2), (1, 5), (1, 8), (2, 3)])
def test_plan_takes_a_verify_chunk(over, dtype, b, l, monkeypatch):
    """A speculative verify chunk (l tokens per row, rows x l <= PLAN_ROWS) through the one-call step: the
    same logits, cache states and Mamba trails (the state before each token, the conv inputs) as the
    layer-by-layer path, and a rollback to any prefix leaves the same cache. Quantized layers included."""
    from hybridlm.quant import quantize_model
    model = HybridLM(preset("tiny", **over)).init_weights(0)
    randomize_(model, seed=9)
    model.eval()
    if isinstance(dtype, str):
        quantize_model(model, dtype)
    else:
        model.to(dtype)
    prompt, chunk, calls = chunk_and_spy(model, b, l, monkeypatch)

    def run(keep):
        cache = model.new_cache(b, 20)
        prefill(model, cache, prompt)
        ck = cache.checkpoint(l, trail=True)
        with torch.no_grad():
            logits = model(chunk, cache)
        trails = {i: (t.u.float(), t.ssm, t.last) for i, t in ck.trails.items()}
        after = {k: v.clone() for k, v in cache.tensors().items()}
        cache.rollback(ck, keep)
        return logits, trails, after, cache.tensors()

    for keep in sorted({1, l // 2, l}):
        calls.clear()
        fast = run(keep)
        assert (b, l) in calls
        with monkeypatch.context() as m:
            m.setattr(decode_cpu, "plan_applies", lambda *a: False)
            slow = run(keep)
        scale = slow[0].float().abs().max().item()
        tol = 1e-4 if dtype == torch.float32 else 0.05
        assert err(fast[0], slow[0]) < tol * scale
        assert torch.equal(fast[0].argmax(-1), slow[0].argmax(-1)) or dtype != torch.float32
        assert fast[1].keys() == slow[1].keys() and fast[1]
        for i in slow[1]:
            for a, c in zip(fast[1][i], slow[1][i]):
                assert a.shape == c.shape and err(a, c) < tol * max(1.0, c.abs().max().item()), i
        for states_fast, states_slow in ((fast[2], slow[2]), (fast[3], slow[3])):
            for k, c in states_slow.items():
                assert err(states_fast[k], c) < tol * max(1.0, c.float().abs().max().item()), k


@pytest.mark.parametrize("b, l", [(8, 1), (2, 8), (4, 8), (8, 4), (1, 16)])
def test_bf16_on_amx_tiles_takes_more_rows_in_one_call(b, l, monkeypatch):
    """Where bf16 products of several rows run on AMX tiles, a bf16 model's plain step of up to 8 rows and its
    verify chunks of up to 32 rows x tokens go through the one-call step (decode_cpu.row_limits), its logits and
    cache at least as close to fp32 as the layer path's; fp32 models, and CPUs without AMX, keep 4 rows / 8."""
    assert decode_cpu.row_limits(torch.float32) == (decode_cpu.MAX_ROWS, decode_cpu.PLAN_ROWS)
    if not decode_cpu._amx_tiles():
        assert decode_cpu.row_limits(torch.bfloat16) == (decode_cpu.MAX_ROWS, decode_cpu.PLAN_ROWS)
        pytest.skip("no AMX tiles here: the one-call step keeps 4 rows / 8 rows x tokens")
    model = HybridLM(preset("tiny")).init_weights(0)
    randomize_(model, seed=9)
    model.eval().to(torch.bfloat16)
    prompt, chunk, calls = chunk_and_spy(model, b, l, monkeypatch)

    def run(m):
        cache = m.new_cache(b, 32)
        prefill(m, cache, prompt)
        with torch.no_grad():
            return m(chunk, cache).float(), cache.tensors()
    fast = run(model)
    assert (b, l) in calls
    with monkeypatch.context() as m:
        m.setattr(decode_cpu, "plan_applies", lambda *a: False)
        slow, exact = run(model), run(copy.deepcopy(model).float())   # torch's bf16 ops; fp32 on the same weights
    # the one call keeps fp32 between ops where torch's bf16 ops round after each: at least as close to fp32
    # (a bf16 rounding may send a token to other experts in either path: a few large differences, so the mean too)
    assert err(fast[0], exact[0]) <= err(slow[0], exact[0]) * 1.05 + 1e-3
    mean = lambda a: (a - exact[0]).abs().mean().item()  # noqa: E731
    assert mean(fast[0]) <= mean(slow[0]) * 1.05 + 1e-4 and mean(fast[0]) < 0.01 * exact[0].abs().max().item()
    for k, c in exact[1].items():
        e_fast, e_slow = ((a.float() - c.float()).abs().mean().item() for a in (fast[1][k], slow[1][k]))
        assert e_fast <= e_slow * 1.1 + 1e-3, k


def test_plan_follows_weight_and_cache_changes():
    """Weights loaded in place, a dtype change, and a restored cache: the plan is rebuilt or reused so the
    step always reads the current weights and state."""
    model = HybridLM(preset("tiny")).init_weights(0).eval()
    other = HybridLM(preset("tiny")).init_weights(1).eval()
    ids = torch.randint(3, 4096, (1, 5), generator=gen(11))
    cache = model.new_cache(1, 16)
    logits = prefill(model, cache, ids)
    snap = cache.snapshot(logits)
    first = decode_step(model, cache, ids[:, -1])
    plan = cache.kernel_plan
    cache.restore(snap)
    assert torch.equal(decode_step(model, cache, ids[:, -1]), first) and cache.kernel_plan is plan
    with torch.no_grad():
        model.load_state_dict(other.state_dict())          # in place: versions change
    cache.restore(snap)
    changed = decode_step(model, cache, ids[:, -1])
    assert cache.kernel_plan is not plan and not torch.allclose(changed, first)
    ref_cache = other.new_cache(1, 16)
    prefill(other, ref_cache, ids)
    kernels.set_backend("ref")
    try:
        want = decode_step(other, ref_cache, ids[:, -1])    # other's own state after other's prefill
    finally:
        kernels.set_backend("auto")
    cache2 = model.new_cache(1, 16)
    prefill(model, cache2, ids)
    assert err(decode_step(model, cache2, ids[:, -1]), want) < 1e-4


def test_plan_refuses_what_it_cannot_describe_once_and_layers_still_run(caplog):
    """A non-contiguous weight (torch ops take it, the plan does not): one warning, then the same logits
    as the reference path."""
    model = HybridLM(preset("tiny")).init_weights(0).eval()
    w = model.model.layers[0].mamba.out_proj.weight
    w.data = w.data.t().contiguous().t()
    ids = torch.randint(3, 4096, (1, 4), generator=gen(12))
    cache = model.new_cache(1, 8)
    logits = prefill(model, cache, ids)
    with caplog.at_level("WARNING", logger="hybridlm"):
        for _ in range(2):
            logits = decode_step(model, cache, logits.argmax(-1))
    assert len([r for r in caplog.records if "whole-step decode unavailable" in r.getMessage()]) == 1
    kernels.set_backend("ref")
    try:
        want, _ = decode_run(model, ids, steps=2)
    finally:
        kernels.set_backend("auto")
    assert err(logits, want[-1]) < 1e-4
