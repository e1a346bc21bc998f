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
