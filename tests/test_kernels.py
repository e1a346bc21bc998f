"""The fast kernels against their reference twins (kernels/ref.py), and the dispatch that picks them.

Sizes are chosen to reach the kernels' corners: channel counts that are not a multiple of the 16-lane
block, sequences longer than the backward's 64-token checkpoint interval, and more OpenMP threads
than work items in some loops (``threads`` fixture).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from hybridlm import HybridLM, kernels, preset
from hybridlm.kernels import build, conv_cpu, scan_cpu
from hybridlm.kernels.ref import causal_conv1d_ref, selective_scan_ref

from .conftest import randomize_


pytestmark = pytest.mark.usefixtures("cpu_kernels")


@pytest.fixture
def threads(monkeypatch):
    """Three OpenMP threads whatever the size, so partial sums and work splits are exercised."""
    monkeypatch.setattr(build, "threads_for", lambda work: 3)


def scan_inputs(b, l, d_in, n, seed=0, h0=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    u, B, C = r(b, l, d_in).to(dtype), r(b, l, n).to(dtype), r(b, l, n).to(dtype)
    delta = F.softplus(r(b, l, d_in) - 1)                       # typical step sizes, 0.05 .. 3
    A = -(torch.rand(d_in, n, generator=g) * 4 + 0.1)
    return [u, delta, A, B, C, r(d_in), r(b, d_in, n) if h0 else None]


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


# ---- selective scan --------------------------------------------------------------------------------
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("shape", [(2, 70, 37, 5), (1, 130, 64, 16)])
def test_scan_forward_matches_ref_fp32(threads, shape, with_h0):
    args = scan_inputs(*shape, h0=with_h0)
    y, h = scan_cpu.selective_scan_cpu(*args)
    y_ref, h_ref = selective_scan_ref(*args)
    assert y.dtype == h.dtype == torch.float32
    assert rel(y, y_ref) < 1e-5 and rel(h, h_ref) < 1e-5


def test_scan_forward_bf16_inputs(threads):
    """bf16 u/B/C: computed in fp32 from the same bf16 values as the reference, so still close."""
    args = scan_inputs(2, 50, 40, 16, dtype=torch.bfloat16)
    y, h = scan_cpu.selective_scan_cpu(*args)
    y_ref, h_ref = selective_scan_ref(*args)
    assert y.dtype == torch.float32
    assert rel(y, y_ref) < 1e-4 and rel(h, h_ref) < 1e-4
    # and against the fp32 originals the difference is bf16 rounding, not a kernel error
    y32, _ = selective_scan_ref(*[a.float() if a is not None else None for a in args])
    assert rel(y, y32) < 1e-5


def within_one_rounding(out, oracle, dtype):
    """out is the fp32 oracle rounded once to dtype: within half a bf16 ulp (<= 2^-8 relative) of each value,
    plus fp32 summation-order differences (1e-5 of the largest value)."""
    tol = 2.0 ** -8 if dtype == torch.bfloat16 else 0.0
    return bool(((out.float() - oracle).abs() <= oracle.abs() * tol + 1e-5 * oracle.abs().max()).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,with_h0", [((2, 70, 37, 5), True), ((1, 130, 64, 16), False)])
def test_scan_inference_fuses_softplus_and_gate(threads, shape, with_h0, dtype):
    """The inference forward (no autograd): delta = softplus(dt + bias) and y * silu(z) inside the
    kernel, bf16 read and written in place, z a column slice of a wider tensor (in_proj's output)."""
    b, l, d_in, n = shape
    u, _, A, B, C, D, h0 = scan_inputs(*shape, h0=with_h0, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    dt = (torch.randn(b, l, d_in, generator=g) * 3 - 2).to(dtype)
    bias = torch.randn(d_in, generator=g)
    z = torch.randn(b, l, 2 * d_in, generator=g).to(dtype)[..., d_in:]
    y, h = scan_cpu.selective_scan_infer(u, dt, A, B, C, D, h0, bias, z)
    delta = F.softplus(dt.float() + bias)                                   # Mamba's torch ops, in fp32
    y_ref, h_ref = selective_scan_ref(u, delta, A, B, C, D, h0)
    y_ref = y_ref * F.silu(z.float())
    assert y.dtype == dtype and h.dtype == torch.float32 and y.is_contiguous()
    assert rel(h, h_ref) < 1e-5
    assert within_one_rounding(y, y_ref, dtype)
    y_plain, _ = scan_cpu.selective_scan_infer(u, delta, A, B, C, D, h0)   # no bias, no gate: fp32 y
    assert y_plain.dtype == torch.float32 and rel(y_plain, selective_scan_ref(u, delta, A, B, C, D, h0)[0]) < 1e-5


def test_scan_softplus_matches_torch_over_the_whole_range():
    """One step with u = B = C = 1, D = 0 returns delta itself: the kernel's softplus, value by value."""
    dt = torch.cat([torch.linspace(-100, 100, 4001), torch.tensor([-88.0, -87.0, 0.0, 19.99, 20.0, 20.01, 1e-6])])
    d_in = dt.numel()
    one = torch.ones(1, 1, d_in)
    y, _ = scan_cpu.selective_scan_infer(one, dt.view(1, 1, d_in), -torch.ones(d_in, 1), torch.ones(1, 1, 1),
                                         torch.ones(1, 1, 1), torch.zeros(d_in), None, torch.zeros(d_in))
    ref = F.softplus(dt.double())
    err = (y[0, 0].double() - ref).abs()
    assert bool((err <= ref.abs() * 1e-6 + 1e-37).all()), dt[err.argmax()].item()   # vexp flushes below e^-87.3


def test_scan_dispatch_fused_without_grad_and_autograd_with(threads, monkeypatch):
    """kernels.selective_scan takes the fused inference kernel only when no gradient is wanted; with
    one it runs the autograd kernel plus torch ops for softplus and gate, and both agree."""
    u, _, A, B, C, D, h0 = scan_inputs(2, 40, 24, 8)
    dt, bias, z = torch.randn(2, 40, 24), torch.randn(24), torch.randn(2, 40, 24)
    calls = []
    real = kernels.selective_scan_infer
    monkeypatch.setattr(kernels, "selective_scan_infer", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y0, h0_ = kernels.selective_scan(u, dt, A, B, C, D, h0, delta_bias=bias, z=z)
    assert calls == [1] and y0.grad_fn is None
    dt.requires_grad_()
    y1, h1 = kernels.selective_scan(u, dt, A, B, C, D, h0, delta_bias=bias, z=z)
    assert calls == [1] and y1.grad_fn is not None
    assert rel(y0, y1) < 1e-5 and rel(h0_, h1) < 1e-5


def test_scan_exp_accuracy_over_the_whole_range():
    """One step from h0 = 1 with no input reads exp(delta * A) straight out: relative error ~1e-7
    where exp is a normal float, exactly 0 once it would underflow."""
    x = torch.cat([torch.linspace(-87.0, 0.0, 4001), torch.tensor([-87.5, -100.0, -1e4])])
    d_in = x.numel()
    u, delta = torch.zeros(1, 1, d_in), torch.ones(1, 1, d_in)
    A, B, C = x[:, None], torch.zeros(1, 1, 1), torch.ones(1, 1, 1)
    y, _ = scan_cpu.selective_scan_cpu(u, delta, A, B, C, torch.zeros(d_in), torch.ones(1, d_in, 1))
    normal = x > -87.0
    assert ((y[0, 0, normal] - torch.exp(x[normal])).abs() / torch.exp(x[normal])).max() < 1e-6
    assert (y[0, 0, ~normal] < 1e-37).all()


def test_scan_chunked_equals_one_shot(threads):
    """Prefill in pieces with the state carried (cuts off the 64-token checkpoint grid) == one call."""
    u, delta, A, B, C, D, _ = scan_inputs(2, 150, 48, 16, h0=False)
    y_all, h_all = scan_cpu.selective_scan_cpu(u, delta, A, B, C, D)
    h, ys = None, []
    for lo, hi in [(0, 67), (67, 68), (68, 150)]:
        y, h = scan_cpu.selective_scan_cpu(u[:, lo:hi], delta[:, lo:hi], A, B[:, lo:hi], C[:, lo:hi], D, h)
        ys.append(y)
    assert rel(torch.cat(ys, 1), y_all) < 1e-6 and rel(h, h_all) < 1e-6


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("shape", [(2, 150, 37, 5), (1, 70, 300, 16)])
def test_scan_gradients_match_ref(threads, shape, with_h0):
    """Gradients of all inputs, through both outputs (y and h_last), vs autograd through the reference.
    l > 64 puts several checkpoints in the backward; d_in = 300 makes partial blocks and groups."""
    args = scan_inputs(*shape, h0=with_h0)
    fast = [a.clone().requires_grad_() if a is not None else None for a in args]
    ref = [a.clone().requires_grad_() if a is not None else None for a in args]
    y, h = scan_cpu.selective_scan_cpu(*fast)
    y_ref, h_ref = selective_scan_ref(*ref)
    gy, gh = torch.randn_like(y_ref), torch.randn_like(h_ref)
    ((y * gy).sum() + (h * gh).sum()).backward()
    ((y_ref * gy).sum() + (h_ref * gh).sum()).backward()
    for name, a, r in zip(["u", "delta", "A", "B", "C", "D", "h0"], fast, ref):
        if r is not None:
            assert rel(a.grad, r.grad) < 1e-4, name


def test_scan_gradients_bf16_dtypes(threads):
    args = scan_inputs(1, 80, 32, 16, dtype=torch.bfloat16)
    fast = [a.clone().requires_grad_() for a in args]
    ref = [a.clone().requires_grad_() for a in args]
    (scan_cpu.selective_scan_cpu(*fast)[0] ** 2).sum().backward()
    (selective_scan_ref(*ref)[0] ** 2).sum().backward()
    for a, r in zip(fast, ref):
        assert a.grad.dtype == a.dtype
        assert rel(a.grad, r.grad) < 2e-2   # both rounded to bf16 at the end


def test_scan_decode_step_matches_ref():
    args = scan_inputs(3, 1, 40, 16, dtype=torch.bfloat16)
    for h0 in (args[6], None):
        y, h = scan_cpu.selective_scan_step(*args[:6], h0)
        y_ref, h_ref = selective_scan_ref(*args[:6], h0)
        assert y.shape == (3, 1, 40) and y.dtype == h.dtype == torch.float32
        assert rel(y, y_ref) < 1e-6 and rel(h, h_ref) < 1e-6


# ---- causal conv -----------------------------------------------------------------------------------
def conv_inputs(b, l, d, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, l, d, generator=g).to(dtype), torch.randn(d, k, generator=g) * 0.5,
            torch.randn(d, generator=g), torch.randn(b, d, k - 1, generator=g).to(dtype))


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("shape", [(2, 37, 40, 4), (1, 2, 33, 4), (3, 50, 16, 2)])
def test_conv_prefill_matches_ref(threads, shape, with_state):
    """Output, state update (also when l < k-1 keeps part of the old window) and gradients."""
    x, w, bias, state = conv_inputs(*shape)
    s_fast, s_ref = (state.clone(), state.clone()) if with_state else (None, None)
    fast = [t.clone().requires_grad_() for t in (x, w, bias)]
    ref = [t.clone().requires_grad_() for t in (x, w, bias)]
    out = conv_cpu.causal_conv1d_cpu(*fast, s_fast)
    out_ref = causal_conv1d_ref(*ref, s_ref)
    assert rel(out, out_ref) < 1e-5
    if with_state:
        assert torch.equal(s_fast, s_ref)
    g = torch.randn_like(out_ref)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    for name, a, r in zip(["x", "weight", "bias"], fast, ref):
        assert rel(a.grad, r.grad) < 1e-5, name


def test_conv_without_bias_and_bf16(threads):
    x, w, _, state = conv_inputs(2, 30, 24, 4, dtype=torch.bfloat16)
    s_fast, s_ref = state.clone(), state.clone()
    out = conv_cpu.causal_conv1d_cpu(x, w, None, s_fast)
    out_ref = causal_conv1d_ref(x, w, None, s_ref)
    assert out.dtype == torch.bfloat16 and torch.equal(s_fast, s_ref)
    assert rel(out, out_ref) < 2e-2   # the reference convolves in bf16, the kernel in fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_state", [False, True])
def test_conv_inference_reads_strided_input_in_its_dtype(threads, dtype, with_state):
    """The inference forward reads x as a column slice of a wider tensor (u of in_proj's output), in
    bf16 or fp32, and writes the conv in x's dtype: the fp32 result rounded once; state as the reference."""
    x, w, bias, state = conv_inputs(2, 37, 40, 4, dtype=dtype)
    wide = torch.cat([x, torch.randn(2, 37, 40).to(dtype)], -1)[..., :40]
    assert not wide.is_contiguous()
    s_fast, s_ref = state.clone(), state.float().clone()
    out = conv_cpu.causal_conv1d_infer(wide, w, bias, s_fast if with_state else None)
    oracle = causal_conv1d_ref(x.float(), w, bias, s_ref if with_state else None)
    assert out.dtype == dtype and within_one_rounding(out, oracle, dtype)
    if with_state:
        assert torch.equal(s_fast.float(), s_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_fused_without_grad(threads, dtype):
    g0, u = torch.randn(37, 53).to(dtype), torch.randn(37, 53).to(dtype)    # 1961 values: a partial vector
    oracle = F.silu(g0.float()) * u.float()
    g = g0.clone()
    with torch.no_grad():
        out = kernels.silu_mul(g, u)
    assert out.data_ptr() == g.data_ptr() and out.dtype == dtype           # written in place
    assert within_one_rounding(out, oracle, dtype)
    g = g0.clone().requires_grad_()
    out = kernels.silu_mul(g, u)                                            # with grad: torch ops
    assert out.grad_fn is not None and torch.equal(out, F.silu(g0) * u)


@pytest.mark.parametrize("rows", [3, 300])
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16)])
def test_rmsnorm_kernel_rounds_as_the_torch_ops(threads, rows, x_dtype, w_dtype, backend):
    """RMSNorm without gradients (one C++ pass) against its own torch ops: fp32 to rounding-order
    differences; bf16 where both round the normalised row and the product, so at most one bf16 ulp
    apart (where the fp32 sums fall either side of a rounding boundary)."""
    from hybridlm.norm import RMSNorm
    norm = RMSNorm(100)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(100, generator=torch.Generator().manual_seed(0)))
    norm = norm.to(w_dtype)
    x = (torch.randn(rows, 100, generator=torch.Generator().manual_seed(1)) * 5).to(x_dtype)
    with torch.no_grad():
        assert kernels.fused_rmsnorm(x, norm.weight)
        out = norm(x)
        backend("ref")
        ref = norm(x)
    assert out.dtype == ref.dtype == x_dtype
    ulp = 2.0 ** -7 if x_dtype == torch.bfloat16 else 1e-6
    assert bool(((out.float() - ref.float()).abs() <= ref.float().abs() * ulp + 1e-6).all())
    if x_dtype == torch.bfloat16:
        assert (out != ref).float().mean() < 0.02                         # and almost always equal
    assert not kernels.fused_rmsnorm(x.requires_grad_(), norm.weight)      # training: the torch ops


def test_conv_decode_steps_continue_prefill():
    """Prefill 5 tokens, then decode one at a time: equals the reference over all tokens, and the
    state is rolled in place (same tensor, same values as the reference's)."""
    x, w, bias, _ = conv_inputs(2, 9, 40, 4)
    state = torch.zeros(2, 40, 3)
    ref_state = state.clone()
    ptr = state.data_ptr()
    outs = [kernels.causal_conv1d(x[:, :5], w, bias, state)]
    outs += [conv_cpu.causal_conv1d_step(x[:, t:t + 1], w, bias, state) for t in range(5, 9)]
    out_ref = causal_conv1d_ref(x, w, bias, ref_state)
    assert rel(torch.cat(outs, 1), out_ref) < 1e-5
    assert state.data_ptr() == ptr and torch.allclose(state, ref_state)


# ---- prefill attention -----------------------------------------------------------------------------
def attention_oracle(q, k, v, valid, start):
    """fp32 SDPA with the engine's mask (causal by slot, padding, a query that sees nothing sees itself)."""
    b, h, l, dh = q.shape
    s, g = k.shape[2], h // k.shape[1]
    q_slots, k_slots = torch.arange(start, start + l), torch.arange(s)
    mask = (k_slots[None, :] <= q_slots[:, None])[None, None]
    if valid is not None:
        mask = mask & valid[:, None, None, :]
    none = ~mask.any(-1, keepdim=True)
    mask = mask | (none & (k_slots[None, None, None, :] == q_slots[None, None, :, None]))
    return F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(g, 1),
                                          v.float().repeat_interleave(g, 1), attn_mask=mask)


@pytest.mark.skipif(not kernels.flash_attn_available(), reason="the flash kernel needs AVX512-BF16")
@pytest.mark.parametrize("b,h,h_kv,l,start,dh,pad", [
    (1, 8, 2, 100, 0, 64, False),     # a plain causal prefill, GQA 4, l not a multiple of the blocks
    (2, 4, 4, 37, 50, 32, True),      # a chunk after 50 cached slots, left padding in row 0
    (1, 8, 2, 70, 200, 128, True),    # padding covers some queries entirely (they attend to themselves)
    (2, 6, 2, 5, 3, 16, True),        # GQA 3, a few queries
    (1, 3, 1, 130, 64, 64, False)])   # MQA, keys exactly two blocks before the chunk
def test_flash_attention_matches_fp32_sdpa(threads, b, h, h_kv, l, start, dh, pad):
    """bf16 in and out, fp32 softmax, P rounded to bf16 for P V: within 1% of the largest output of
    fp32 SDPA on the same bf16 inputs (a causal or padding mistake is off by tens of percent). q is the
    transposed view the projections give; k, v slices of a longer cache."""
    g = torch.Generator().manual_seed(0)
    s = start + l
    q = torch.randn(b, l, h, dh, generator=g).to(torch.bfloat16).transpose(1, 2)
    k = torch.randn(b, h_kv, s + 7, dh, generator=g).to(torch.bfloat16)[:, :, :s]
    v = torch.randn(b, h_kv, s + 7, dh, generator=g).to(torch.bfloat16)[:, :, :s]
    valid = None
    if pad:
        valid = torch.ones(b, s, dtype=torch.bool)
        valid[0, :min(s, 60)] = False
    out = kernels.flash_attn_cpu(q, k, v, valid, start)
    ref = attention_oracle(q, k, v, valid, start)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    assert (out.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.skipif(not kernels.flash_attn_available(), reason="the flash kernel needs AVX512-BF16")
def test_attention_prefill_takes_the_flash_kernel_only_without_grad(monkeypatch):
    from hybridlm.attention import Attention
    attn = Attention(preset("tiny")).to(torch.bfloat16)
    x = torch.randn(2, 9, attn.q_proj.in_features).to(torch.bfloat16)
    from hybridlm.model import StepContext
    ctx = StepContext(0, torch.arange(9).expand(2, 9), None, None)
    calls = []
    real = kernels.flash_attn_cpu
    monkeypatch.setattr("hybridlm.attention.flash_attn_cpu", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        fused = attn(x, None, ctx)
    assert calls == [1]
    torch_ops = attn(x, None, ctx)                                  # parameters require grad: SDPA
    assert calls == [1] and torch_ops.grad_fn is not None
    assert (fused.float() - torch_ops.float()).abs().max() <= 2e-2 * torch_ops.abs().max()
    assert "flash" in kernels.report()["attention (prefill)"]


# ---- dispatch --------------------------------------------------------------------------------------
def test_dispatch_auto_uses_the_kernels_and_ref_forces_the_reference(backend):
    assert "C++ kernel" in kernels.report()["selective_scan"]
    backend("ref")
    r = kernels.report()
    assert r["backend"] == "ref" and r["selective_scan"].startswith("ref") and r["causal_conv1d"].startswith("ref")
    with pytest.raises(ValueError, match="auto"):
        kernels.set_backend("fast")


def test_env_var_forces_the_reference():
    env = {**os.environ, "HYBRIDLM_SCAN": "ref"}
    out = subprocess.run([sys.executable, "-c", "from hybridlm import kernels; print(kernels.report()['backend'])"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ref"


def test_failed_build_is_reported_and_runs_the_reference(monkeypatch, caplog):
    """A compiler that fails: a warning with the reason, report() says so, results stay right."""
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setattr(build, "_lib", None)
    monkeypatch.setattr(kernels, "_cpu_tried", False)
    monkeypatch.setattr(kernels, "_cpu_error", None)
    args = scan_inputs(1, 5, 8, 4)
    with caplog.at_level(logging.WARNING, logger="hybridlm"):
        y, _ = kernels.selective_scan(*args)
        kernels.selective_scan(*args)
    assert [r.levelname for r in caplog.records] == ["WARNING"]           # once, not per call
    assert "compiling csrc/ with false failed" in caplog.text
    assert "unavailable" in kernels.report()["selective_scan"] and "false" in kernels.report()["cpu_kernels"]
    assert torch.equal(y, selective_scan_ref(*args)[0])


def test_other_devices_take_the_torch_paths():
    """Tensors off the CPU never reach the C++ kernels (checked on 'meta', as CI has no GPU)."""
    u, delta, A, B, C, D, h0 = (a.to("meta") for a in scan_inputs(1, 3, 8, 4))
    y, h = kernels.selective_scan(u, delta, A, B, C, D, h0)
    assert y.device.type == "meta" and y.shape == (1, 3, 8) and h.shape == (1, 8, 4)
    y, h = kernels.selective_scan(u[:, :1], delta[:, :1], A, B[:, :1], C[:, :1], D, h0)
    assert y.device.type == "meta" and y.shape == (1, 1, 8)
    x, w, bias, state = (t.to("meta") for t in conv_inputs(1, 3, 8, 4))
    assert kernels.causal_conv1d(x, w, bias, state).shape == (1, 3, 8)


# ---- end to end ------------------------------------------------------------------------------------
def test_bf16_inference_at_least_as_close_to_fp32_as_torch_ops(backend):
    """A bf16 forward without gradients (fused scan/conv/SwiGLU kernels, one rounding each) is at
    least as close to the fp32 model as the same bf16 model through torch ops (ref backend)."""
    model = HybridLM(preset("tiny")).init_weights(0)
    randomize_(model, seed=0)
    ids = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        oracle = model(ids).float()
        m16 = model.to(torch.bfloat16)
        fused = m16(ids).float()
        backend("ref")
        ops = m16(ids).float()
    err_fused, err_ops = (fused - oracle).abs().max().item(), (ops - oracle).abs().max().item()
    assert err_fused <= 1.25 * err_ops, (err_fused, err_ops)
    assert rel(fused, oracle) < 0.2                     # bf16 through 8 layers: ~0.1 here


def test_tiny_model_same_with_ref_and_auto(backend):
    """Logits and parameter gradients of the tiny preset agree between the backends, and a cached
    prefill (in two chunks) + decode with 'auto' reproduces the reference's full forward."""
    model = HybridLM(preset("tiny")).init_weights(0)
    randomize_(model, seed=0)          # A_log, D, norms and biases away from their constants
    ids = torch.randint(0, model.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    results = {}
    for name in ("ref", "auto"):
        backend(name)
        model.zero_grad()
        model.loss(ids[:, :-1], ids[:, 1:])["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        with torch.no_grad():
            results[name] = (model(ids), grads)
    (logits_ref, grads_ref), (logits, grads) = results["ref"], results["auto"]
    assert rel(logits, logits_ref) < 1e-5
    assert grads.keys() == grads_ref.keys() and any("A_log" in n for n in grads)
    for n in grads_ref:
        assert rel(grads[n], grads_ref[n]) < 1e-4, n
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        pieces = [model(ids[:, :5], cache=cache), model(ids[:, 5:9], cache=cache)]
        pieces += [model(ids[:, t:t + 1], cache=cache) for t in range(9, 13)]
    assert rel(torch.cat(pieces, 1), logits_ref) < 1e-5


def test_bf16_gemm_upcast_where_the_cpu_lacks_bf16(monkeypatch):
    """On CPUs without AVX512-BF16/AMX, inference GEMMs on bf16 multiply in fp32 (exact products): the result is
    the fp32 product rounded once, within bf16 rounding of torch's own bf16 GEMM."""
    from hybridlm import kernels
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(9, 64, generator=g).bfloat16(), torch.randn(48, 64, generator=g).bfloat16()
    monkeypatch.setattr(kernels, "_FAST_BF16", False)
    assert kernels.gemm_dtype(x) == torch.float32 and kernels.gemm_dtype(x.float()) == torch.float32
    out = kernels.linear(x, w)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.nn.functional.linear(x.float(), w.float()).bfloat16())
    ref = torch.nn.functional.linear(x, w)
    assert (out.float() - ref.float()).abs().max() <= ref.float().abs().max() * 2 ** -7
    monkeypatch.setattr(kernels, "_FAST_BF16", True)
    assert kernels.gemm_dtype(x) == torch.bfloat16
    assert "bf16 GEMMs (prefill)" in kernels.report()
