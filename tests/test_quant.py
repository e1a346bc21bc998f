"""Weight-only int8 / int4 quantization (quant.py) and the kernels that read it (csrc/decode.cpp, quant.cpp).

A quantized layer multiplies activations quantized to int8 per 32 columns (``quantize_activations``) by
the quantized weights. Reference twins (plain torch): ``QuantLinear.product_ref`` for the decode kernel's
integer dot products (equal up to fp32 summation order), and ``QuantLinear.dequantize_ref`` for the C++
dequantization that the GEMM path multiplies with (equal exactly, up to one fused multiply-add rounding
for asymmetric int4); the two paths compute the same product.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

from hybridlm import HybridLM, preset
from hybridlm.cli import main as cli_main
from hybridlm.kernels import build, decode_cpu
from hybridlm.quant import (QuantLinear, QuantScheme, quantize_activations, quantize_model, scheme_of, tile, untile,
                            unpack_int4)

from .conftest import randomize_

pytestmark = pytest.mark.usefixtures("cpu_kernels")

SCHEMES = ["int8", "int8:g32", "int4:g32", "int4:g64", "int4:g128:fp32", "int4:g64:asym", "int4:g32:asym:fp32"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def layer(k, o, spec, seed=0, bias=False):
    g = gen(seed)
    lin = torch.nn.Linear(k, o, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(o, k, generator=g) * 0.5)
        if bias:
            lin.bias.copy_(torch.randn(o, generator=g))
    return lin, QuantLinear.from_linear(lin, QuantScheme.parse(spec))


def tiny(layout="mMaM", seed=0, **kw):
    cfg = preset("tiny", num_hidden_layers=len(layout), layout=layout, mamba_dt_rank=20, **kw)
    model = HybridLM(cfg).init_weights(seed)
    randomize_(model, seed)
    return model.eval().requires_grad_(False)


# ---- the format ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("o", [13, 24])
def test_tiles_roundtrip_and_byte_order(bits, o):
    """tile / untile are inverses, and the bytes sit where mat.h says (rows past o are zero)."""
    q = (torch.randint(-127, 128, (o, 96), generator=gen(), dtype=torch.int8) if bits == 8 else
         torch.randint(0, 16, (o, 96), generator=gen(), dtype=torch.uint8))
    s = torch.rand(o, 3, generator=gen(1))
    w, ts, tm = tile(q, s, s + 1, bits)
    assert w.shape == (-(-o // 8), 3, 32 * bits) and ts.shape == (-(-o // 8), 3, 8)
    q2, s2, m2 = untile(w, ts, tm, o, bits)
    assert torch.equal(q2, q) and torch.equal(s2, s) and torch.equal(m2, s + 1)
    t, blk, i = 1, 2, 3                                   # row 11, columns 64..95
    for sb, j in [(0, 0), (1, 2), (3, 3)]:
        byte = int(w[t, blk, 32 * sb + 4 * i + j])
        if bits == 8:
            assert byte == int(q[8 * t + i, 32 * blk + 4 * sb + j])
        else:
            assert byte == int(q[8 * t + i, 32 * blk + 8 * sb + j]) | int(q[8 * t + i, 32 * blk + 8 * sb + 4 + j]) << 4
    assert ts[1, 2, 3] == s[11, 2]
    assert not untile(w, ts, tm, w.shape[0] * 8, bits)[0][o:].any()


def test_unpack_int4_q4_0_nibble_order():
    """GGUF's Q4_0 rows (and checkpoints before the tiles): byte j = column j | column j + 16 << 4."""
    p = torch.randint(0, 256, (3, 32), generator=gen(), dtype=torch.uint8)
    q = unpack_int4(p)
    assert q.shape == (3, 64)
    assert int(p[0, 0]) == int(q[0, 0]) | int(q[0, 16]) << 4
    assert int(p[1, 17]) == int(q[1, 33]) | int(q[1, 49]) << 4


@pytest.mark.parametrize("spec", SCHEMES)
def test_quantization_error_within_half_a_step(spec):
    lin, q = layer(100, 24, spec)           # 100 inputs: padded up to the group
    s = QuantScheme.parse(spec)
    w, deq = lin.weight.float(), q.dequantize_ref()
    assert deq.shape == w.shape
    step = q.rows()[1].float().abs().repeat_interleave(q.group, 1)[:, :100]
    err = (deq - w).abs()
    if s.bits == 4 and s.symmetric:
        # the group's largest magnitude maps to -8 exactly; the other side may clip by up to one step
        assert (err <= step * 1.0 + 1e-6).all()
        top = w.view(-1).abs().argmax()
        assert err.view(-1)[top] < 1e-2 * w.abs().max()
    else:
        assert (err <= step * 0.5 + 1e-6).all()


def test_int8_matches_per_channel_recipe():
    lin, q = layer(64, 8, "int8")
    s = lin.weight.abs().amax(1) / 127
    qr, sr, _ = q.rows()
    assert torch.allclose(sr[:, 0], s)
    assert torch.equal(qr, torch.round(lin.weight / s[:, None]).to(torch.int8))


# ---- kernels vs the reference twin -----------------------------------------------------------------------
@pytest.mark.parametrize("spec", SCHEMES)
@pytest.mark.parametrize("k", [32, 100, 160, 512])
@pytest.mark.parametrize("rows,limit", [(r, None) for r in (1, 2, 3, 4, 5, 64, 129, 257)] +
                         [(r, 4) for r in (5, 64, 257)])
def test_linear_kernel_matches_reference(spec, k, rows, limit, monkeypatch):
    if limit is not None:           # the dequantize + GEMM path above the kernel's rows (on CPUs with fast bf16)
        monkeypatch.setattr(decode_cpu, "quant_rows", lambda layer: limit)
    lin, q = layer(k, 37, spec, seed=k + rows, bias=True)
    x = torch.randn(rows, 1, k, generator=gen(rows))
    x[0, 0, :32] = 0                                 # an all-zero block must not divide by zero
    ref = q.product_ref(x) + q.bias                  # the integer recipe
    assert (F.linear(quantize_activations(x), q.dequantize_ref(), q.bias) - ref).abs().max() <= 1e-5 * ref.abs().max()
    with torch.no_grad():
        out = q(x)                                  # the integer kernel up to quant_rows(q) rows, dequantize + GEMM above
    assert out.shape == (rows, 1, 37)
    n = decode_cpu.quant_rows(q)
    assert decode_cpu.applies(x, q, max_rows=n) == (rows <= n)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    # int8 activations cost ~1% of the product's scale (asymmetric int4's q in 0..15 amplifies it)
    exact = F.linear(x, q.dequantize_ref(), q.bias)
    assert (out - exact).abs().max() <= (2e-2 if QuantScheme.parse(spec).symmetric else 5e-2) * exact.abs().max()


_ISA_CHECK = """
import torch
from hybridlm import kernels
from hybridlm.kernels import build
from hybridlm.quant import QuantLinear, QuantScheme
torch.set_num_threads(2)
for spec in {schemes!r}:
    for k, o, rows in [(100, 37, 1), (160, 24, 3), (512, 9, 5)]:
        g = torch.Generator().manual_seed(k + rows)
        lin = torch.nn.Linear(k, o)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(o, k, generator=g))
        q = QuantLinear.from_linear(lin, QuantScheme.parse(spec))
        x = torch.randn(rows, k, generator=g)
        ref = q.product_ref(x) + q.bias
        with torch.no_grad():
            out = kernels.linear_step(x, q, q.bias)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max(), (spec, k, rows)
        assert torch.equal(q.dequantize(torch.float32), q.dequantize_ref()) or not q.scheme.symmetric
        assert (q.dequantize(torch.float32) - q.dequantize_ref()).abs().max() <= 2e-7 * q.dequantize_ref().abs().max()
assert build.info["isa"] == "-march={march}", build.info
assert {path!r} in kernels.report()["quantized weights"], kernels.report()["quantized weights"]
print("path ok")
"""


@pytest.mark.parametrize("march,path,flag", [
    ("x86-64-v2", "portable C++", None),                              # ARM and older x86: the #else paths
    ("x86-64-v3", "AVX2 integer dot products (maddubs)", "avx2"),     # AVX2 CPUs without VNNI (Zen 3, Haswell)
    ("alderlake", "AVX-VNNI integer dot products", "avx_vnni"),       # 256-bit VNNI without AVX-512
])
def test_kernel_isa_paths_match_reference(tmp_path, march, path, flag):
    """The kernels built for another instruction set than this CPU's best (the paths other machines run),
    against the reference; those this CPU cannot run are skipped. The native build (AVX512-VNNI where the CPU
    has it) is what every other test here runs."""
    import os
    import platform
    import subprocess
    import sys
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"builds for -march={march}")
    if flag is not None and flag not in build._cpu_id().split():
        pytest.skip(f"this CPU has no {flag}")
    env = {**os.environ, "HYBRIDLM_KERNEL_MARCH": march, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", _ISA_CHECK.format(schemes=SCHEMES, march=march, path=path)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "path ok" in r.stdout, r.stderr[-3000:]


def test_product_reference_is_the_integer_recipe():
    """product_ref by hand for one row and one 32-column block: x quantized with max|x| / 127."""
    _, q = layer(32, 1, "int8", seed=3)
    x = torch.randn(1, 32, generator=gen(4))
    d = x.abs().max() / 127
    xq = torch.round(x * (1 / d))
    qr, sr, _ = q.rows()
    want = (xq * qr.float()).sum() * d * sr.float()[0, 0]
    assert torch.allclose(q.product_ref(x)[0, 0], want, rtol=1e-6)


@pytest.mark.parametrize("spec", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_kernel_matches_reference(spec, dtype):
    _, q = layer(200, 33, spec, seed=5)
    ref = q.dequantize_ref()
    out = q.dequantize(dtype)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = 0 if QuantScheme.parse(spec).symmetric else 2e-7 * ref.abs().max()   # one fma rounding
    assert (out.float() - ref.to(dtype).float()).abs().max() <= tol + (ref.abs().max() * 2 ** -8 if dtype ==
                                                                      torch.bfloat16 and tol else 0)


def test_prefill_products_share_one_dequantization_buffer(monkeypatch):
    """The dequantize + GEMM path reuses one scratch buffer per thread: each layer's output stays its own,
    and a public dequantize() is never that buffer."""
    from hybridlm import kernels
    monkeypatch.setattr(decode_cpu, "quant_rows", lambda layer: 1)
    (_, q1), (_, q2) = layer(64, 40, "int4:g32", seed=1), layer(96, 24, "int8", seed=2)
    x1, x2 = torch.randn(5, 64, generator=gen(1)), torch.randn(5, 96, generator=gen(2))
    with torch.no_grad():
        y1 = q1(x1)
        w2 = q2.dequantize(torch.float32)
        y2 = q2(x2)
        y1_again = q1(x1)
    assert torch.equal(y1, y1_again) and torch.equal(w2, q2.dequantize_ref())
    for q, x, y in ((q1, x1, y1), (q2, x2, y2)):
        ref = F.linear(quantize_activations(x), q.dequantize_ref(), q.bias)
        assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()
    if kernels._cpu_kernels():
        scratch = kernels._scratch.buf
        assert w2.data_ptr() != scratch.data_ptr()
        assert scratch.numel() >= 40 * 64 and scratch.numel() >= 24 * 96


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [32, 100, 2560])
def test_activation_round_trip_kernel_matches_reference(x_dtype, dtype, k):
    """The C++ int8 round trip of a prefill's activations equals quant.quantize_activations bit for bit
    (partial last block, an all-zero block, values at a rounding tie)."""
    from hybridlm import kernels
    x = (torch.randn(3, 7, k, generator=gen(k)) * 3).to(x_dtype)
    x[0, 0, :32] = 0
    x[1, 2, :32] = torch.arange(32) - 15.5                 # q = x * 127 / 16.5: no tie; next row has ties
    x[1, 3, :32] = torch.arange(32) * 0.5 - 7.5            # max 8: x * 127 / 8 on a 1/16 grid
    want = quantize_activations(x).to(dtype)
    got = kernels.quantize_activations(x, dtype)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, want)


def test_kernels_report_the_quantized_path():
    from hybridlm import kernels
    r = kernels.report()["quantized weights"]
    assert build.info["isa"] in r and "C++ kernels" in r
    flags = build._cpu_id().split()
    want = ("AVX512-VNNI" if {"avx512_vnni", "avx512vl"} <= set(flags) else "AVX-VNNI" if "avx_vnni" in flags
            else "AVX2" if "avx2" in flags else "portable C++")
    assert f"{want} integer dot products" in r or want == "portable C++" and want in r, r   # the best this CPU has
    assert ("bf16 GEMMs" in r) == kernels._FAST_BF16          # which path prompts take


# ---- whole models -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["mMaM", "mmam"])
def test_quantized_model_counts_its_parameters(layout):
    """num_params of a quantized model counts the packed weights as the values they stand for."""
    model = tiny(layout)
    q = quantize_model(tiny(layout), "int4:g32")
    assert q.num_params() == model.num_params() and q.num_params(active=True) == model.num_params(active=True)
    assert q.num_params() > sum(p.numel() for p in q.parameters())


@pytest.mark.parametrize("layout", ["mMaM", "mmam"])
@pytest.mark.parametrize("spec,bound", [("int8", 0.03), ("int4:g32", 0.2), ("int4:g64:asym", 0.2)])
def test_quantized_logits_close_to_float(layout, spec, bound):
    model = tiny(layout)
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=gen())
    ref = model(ids)
    q = quantize_model(tiny(layout), spec)
    assert all(isinstance(q.get_submodule(n), QuantLinear) for n in
               ("lm_head", "model.layers.0.mamba.dt_proj", "model.layers.2.self_attn.q_proj"))
    if layout == "mMaM":
        assert isinstance(q.get_submodule("model.layers.1.feed_forward.experts.0.down_proj"), QuantLinear)
        assert not isinstance(q.get_submodule("model.layers.1.feed_forward.router"), QuantLinear)
    out = q(ids)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < bound


@pytest.mark.parametrize("spec", ["int8", "int4:g64", "int4:g32:asym"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_equals_full_forward(spec, dtype, backend):
    model = quantize_model(tiny("mMaM").to(dtype), spec)
    ids = torch.randint(0, model.config.vocab_size, (2, 14), generator=gen(1))
    full = model(ids).float()

    def decode():
        cache = model.new_cache(2, 32)
        steps = [model(ids[:, :10], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(10, 14)]
        return torch.cat(steps, 1).float()
    dec = decode()
    backend("ref")                                    # every op in torch: QuantLinear.product_ref for decode rows
    ref = decode()
    backend("auto")
    # the kernels compute what the torch ops compute, and decode what the full forward computes (the same
    # int8 activations, the same integers): equal but for the summation order, and for a rare activation
    # rounding flipped by such an fp32 difference upstream (one int8 step, ~1/254 of a block's largest;
    # asymmetric int4 carries it further through its min * sum(x) term: up to 0.7% seen). A real error (a
    # wrong nibble, block or scale) moves the logits by tens of percent.
    tol = 1e-2 if dtype == torch.float32 else 3e-2
    assert (dec - ref).norm() <= tol * ref.norm()
    assert (dec - full).norm() <= tol * full.norm()
    assert torch.equal(dec.argmax(-1), full.argmax(-1)) or dtype == torch.bfloat16


def test_save_load_roundtrip_exact(tmp_path):
    q = quantize_model(tiny("mMaM"), "int4:g64:asym")
    q.save_pretrained(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["bits"] == 4 and cfg["quantization_config"]["quant_method"] == "hybridlm"
    r = HybridLM.from_pretrained(tmp_path / "q")
    assert scheme_of(r) == scheme_of(q)
    sd1, sd2 = q.state_dict(), r.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) and sd1[k].dtype == sd2[k].dtype for k in sd1)
    ids = torch.randint(0, q.config.vocab_size, (1, 12), generator=gen())
    assert torch.equal(q(ids), r(ids))


@pytest.mark.parametrize("spec", ["int8", "int4:g64:asym", "int4:g32"])
def test_checkpoint_in_rows_from_before_the_tiles_loads(tmp_path, spec):
    """A checkpoint written before the tiles (rows: packed int4 [o, ld / 2], scales [o, groups], no "layout")
    loads into the same model; an unknown layout is refused with what to do."""
    from hybridlm.safetensors_io import SafeTensorsFile, save_file
    q = quantize_model(tiny("mMaM"), spec)
    q.save_pretrained(tmp_path / "q")
    sf = SafeTensorsFile(tmp_path / "q" / "model.safetensors")
    tensors = {k: sf.get(k).clone() for k in sf.keys()}
    for name, m in q.named_modules():
        if isinstance(m, QuantLinear):
            rows, scale, mins = m.rows()
            if m.scheme.bits == 4:                    # Q4_0's order: byte j = column j | column j + 16 << 4
                b = rows.view(rows.shape[0], -1, 2, 16)
                rows = (b[:, :, 0] | (b[:, :, 1] << 4)).reshape(rows.shape[0], -1)
            tensors.update({f"{name}.weight": rows.contiguous(), f"{name}.weight_scale": scale.contiguous()})
            if mins is not None:
                tensors[f"{name}.weight_min"] = mins.contiguous()
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    cfg_file = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    assert cfg["quantization_config"].pop("layout") == "tiles8"
    cfg_file.write_text(json.dumps(cfg))
    r = HybridLM.from_pretrained(tmp_path / "q")
    sd1, sd2 = q.state_dict(), r.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    cfg["quantization_config"]["layout"] = "columns4"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="layout 'columns4'.*re-quantize"):
        HybridLM.from_pretrained(tmp_path / "q")


def test_quantize_while_loading_equals_quantize_after(tmp_path):
    model = tiny("mMaM").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "f")
    streamed = HybridLM.from_pretrained(tmp_path / "f", quantize="int4:g32")
    after = quantize_model(HybridLM.from_pretrained(tmp_path / "f"), "int4:g32")
    sd1, sd2 = streamed.state_dict(), after.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_tied_embeddings(tmp_path, caplog):
    model = tiny("mmam", tie_word_embeddings=True)
    model.save_pretrained(tmp_path / "tied")                     # no lm_head.weight stored
    q = HybridLM.from_pretrained(tmp_path / "tied", quantize="int8")
    ref = quantize_model(tiny("mmam", tie_word_embeddings=True), "int8")
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=gen())
    assert torch.equal(q(ids), ref(ids))
    # a tied config that still stores a different lm_head.weight: the stored tensor wins, said once
    from hybridlm.safetensors_io import SafeTensorsFile, save_file
    sf = SafeTensorsFile(tmp_path / "tied" / "model.safetensors")
    tensors = {k: sf.get(k).clone() for k in sf.keys()}
    head = torch.randn(model.config.vocab_size, model.config.hidden_size, generator=gen(9))
    save_file({**tensors, "lm_head.weight": head}, tmp_path / "tied" / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="hybridlm"):
        m = HybridLM.from_pretrained(tmp_path / "tied")
    assert torch.equal(m.lm_head.weight, head) and not m.config.tie_word_embeddings
    assert sum("stores a different lm_head" in r.message for r in caplog.records) == 1


# ---- bad input ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,msg", [("int3", "unknown quantization scheme"), ("int4:g48", "multiple of 32"),
                                      ("int4:g0", "multiple of 32"), ("int8:asym", "symmetric only"),
                                      ("int4:fast", "unknown option")])
def test_bad_schemes(spec, msg):
    with pytest.raises(ValueError, match=msg):
        QuantScheme.parse(spec)


def test_foreign_and_mismatched_quantized_checkpoints(tmp_path):
    q = quantize_model(tiny("mmam"), "int4:g64")
    q.save_pretrained(tmp_path / "q")
    cfg_file = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    with pytest.raises(ValueError, match="gptq"):
        HybridLM.from_pretrained(tmp_path / "q")
    cfg_file.write_text(json.dumps({**cfg, "quantization_config": {**cfg["quantization_config"], "group": 32}}))
    with pytest.raises(ValueError, match="another scheme or group size"):
        HybridLM.from_pretrained(tmp_path / "q")
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="already quantized"):
        HybridLM.from_pretrained(tmp_path / "q", quantize="int8")


def test_quantize_cli_and_generate(tmp_path, capsys):
    model = tiny("mMaM").to(torch.bfloat16)
    model.save_pretrained(tmp_path / "f")
    assert cli_main(["quantize", str(tmp_path / "f"), "--to", "int4", "--group", "32",
                     "--out", str(tmp_path / "q")]) == 0
    assert "int4 g32 sym" in capsys.readouterr().out
    q = HybridLM.from_pretrained(tmp_path / "q")
    assert scheme_of(q) == QuantScheme(4, 32)
    assert cli_main(["quantize", str(tmp_path / "f"), "--out", str(tmp_path / "q")]) == 2     # not empty
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["quantize", str(tmp_path / "f"), "--to", "int4", "--group", "40",
                     "--out", str(tmp_path / "q2")]) == 2
    assert "multiple of 32" in capsys.readouterr().err
    assert cli_main(["generate", "tiny", "--prompt", "1 2 3", "--max-new-tokens", "4", "--quantize", "int8"]) == 0
    assert cli_main(["generate", "tiny", "--prompt", "1 2 3", "--quantize", "int5"]) == 2
    assert "unknown quantization scheme" in capsys.readouterr().err
