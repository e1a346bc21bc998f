"""GGUF both ways (hybridlm/gguf.py): the name map, round trips through bf16 / Q8_0 / Q4_0 files, K-quants,
the config from metadata, and malformed files."""
import copy
import os

import pytest
import torch

gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")

from hybridlm.config import HybridConfig                       # noqa: E402
from hybridlm.gguf import (GGUFFile, a_log_from_a, config_from_gguf, export_gguf, from_gguf_name,  # noqa: E402
                           gguf_plan, load_gguf, to_gguf_name)
from hybridlm.model import HybridLM                             # noqa: E402
from hybridlm.quant import QuantLinear, quantize_model          # noqa: E402

LAYOUTS = {
    # Jamba's own: MoE every other layer, attention mid-block
    "moe": dict(num_hidden_layers=4, attn_layer_period=4, attn_layer_offset=1, num_experts=4, num_experts_per_tok=2,
                expert_layer_period=2, expert_layer_offset=1),
    # Jamba 3B's: dense, one attention layer, tied embeddings
    "dense-tied": dict(num_hidden_layers=3, attn_layer_period=3, attn_layer_offset=2, num_experts=1,
                       num_experts_per_tok=1, tie_word_embeddings=True),
    # a research layout no period/offset expresses
    "pattern": dict(num_hidden_layers=5, layout="amMAm", num_experts=3, num_experts_per_tok=2),
}


def tiny(layout="moe", dt_rank=32, **kw) -> HybridConfig:
    # rows of whole 32-blocks everywhere (dt_rank 32), so Q8_0/Q4_0 apply to every matrix; dt_rank 4 gives F16
    return HybridConfig(**{**dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                  num_key_value_heads=2, mamba_dt_rank=dt_rank), **LAYOUTS[layout], **kw})


def model_of(cfg, dtype=torch.float32, seed=0):
    m = HybridLM(cfg).init_weights(seed).to(dtype).eval()
    with torch.no_grad():   # a decisive model: logits spread wider than random init gives
        m.lm_head.weight.mul_(8) if not cfg.tie_word_embeddings else m.model.embed_tokens.weight.mul_(4)
    return m


def logits(m, ids):
    with torch.no_grad():
        return m(ids).float()


IDS = torch.tensor([[5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 12, 50]])


def test_name_map_both_ways():
    m = HybridLM(tiny("moe"))
    seen = set()
    for name in m.state_dict():
        gname, expert = to_gguf_name(name)
        back = from_gguf_name(gname, n_experts=4)
        assert name in back
        assert (expert is None) == (len(back) == 1)
        seen.add(gname)
    assert {"token_embd.weight", "output.weight", "blk.0.ssm_a", "blk.1.ffn_gate_exps.weight",
            "blk.1.attn_q.weight", "blk.0.ssm_conv1d.weight", "blk.1.ffn_gate_inp.weight"} <= seen
    with pytest.raises(KeyError):
        to_gguf_name("model.layers.0.mamba.in_proj.bias")
    with pytest.raises(KeyError):
        from_gguf_name("blk.0.attn_rot_embd")


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bf16_round_trip_is_exact(tmp_path, layout):
    """our model -> GGUF bf16 -> hybridlm: the same parameters bit for bit, so the same logits."""
    cfg = tiny(layout, dt_rank=4)
    m = model_of(cfg, torch.bfloat16)
    path = export_gguf(m, tmp_path / "m.gguf", None, "bf16", progress=False)
    types = {t.name: t.type for t in GGUFFile(path).tensors.values()}
    mamba = cfg.pattern.lower().index("m")
    assert types[f"blk.{mamba}.ssm_a"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["token_embd.weight"] == "BF16"
    back = load_gguf(path)
    periods = ("attn_layer_period", "attn_layer_offset", "expert_layer_period", "expert_layer_offset")
    same = lambda c: {k: v for k, v in c.to_dict().items() if k not in periods}   # noqa: E731
    assert same(back.config) == same(m.config) and back.config.pattern == m.config.pattern
    sd, sd2 = m.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    assert torch.equal(logits(m, IDS), logits(back, IDS))
    if cfg.tie_word_embeddings:
        assert "output.weight" not in types and back.lm_head.weight is back.model.embed_tokens.weight


def test_a_log_recovers_exact_bits():
    """GGUF holds A = -exp(A_log); reading picks the A_log whose -exp gives A back exactly."""
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        a_log = (torch.rand(512, 16) * 6 - 2).to(dtype)
        A = -torch.exp(a_log.float())
        back = a_log_from_a(A, dtype)
        assert torch.equal(-torch.exp(back.float()), A)
    with pytest.raises(ValueError, match="negative"):
        a_log_from_a(torch.tensor([[-1.0, 0.5]]), torch.float32)


def test_q8_0_file_maps_onto_int8_without_second_rounding(tmp_path):
    cfg = tiny("moe", dt_rank=4)          # dt_proj rows of 4: written F16, quantized when loaded
    m = model_of(cfg)
    path = export_gguf(m, tmp_path / "q8.gguf", None, "q8_0", progress=False)
    g = GGUFFile(path)
    assert g.tensors["blk.0.ssm_in.weight"].type == "Q8_0" and g.tensors["blk.0.ssm_dt.weight"].type == "F16"
    q = load_gguf(path, dtype=torch.float32)
    layer = q.model.layers[0].mamba.in_proj
    assert isinstance(layer, QuantLinear) and layer.scheme.bits == 8 and layer.scheme.group == 32
    # the file's integers and fp16 scales, as they are: our dequantization equals gguf's exactly
    ref = gguf.quants.dequantize(g.tensors["blk.0.ssm_in.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(layer.dequantize_ref(), torch.from_numpy(ref))
    experts = gguf.quants.dequantize(g.tensors["blk.1.ffn_down_exps.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(q.model.layers[1].feed_forward.experts[2].down_proj.dequantize_ref(),
                       torch.from_numpy(experts[2]))
    # within the format's error of our own int8 g32 path (fp16 vs fp32 scales; Q8_0 embeddings)
    ours = quantize_model(copy.deepcopy(m), "int8:g32:fp32")
    ref_logits, a, b = logits(m, IDS), logits(ours, IDS), logits(q, IDS)
    err_ours = (a - ref_logits).abs().max().item()
    assert (a - b).abs().max().item() <= 2 * err_ours + 1e-3
    assert (b - ref_logits).abs().max().item() <= 3 * err_ours + 1e-3
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9


def test_q4_0_file_maps_onto_int4_g32(tmp_path):
    cfg = tiny("dense-tied")
    m = model_of(cfg)
    path = export_gguf(m, tmp_path / "q4.gguf", None, "q4_0", progress=False)
    g = GGUFFile(path)
    q = load_gguf(path, dtype=torch.float32)
    layer = q.model.layers[0].feed_forward.up_proj
    assert layer.scheme.bits == 4 and layer.scheme.group == 32 and layer.scheme.symmetric
    ref = gguf.quants.dequantize(g.tensors["blk.0.ffn_up.weight"].data, gguf.GGMLQuantizationType.Q4_0)
    assert torch.equal(layer.dequantize_ref(), torch.from_numpy(ref))
    # tied: lm_head takes token_embd's Q4_0 blocks as they are, the embeddings their exact dequantization
    emb = torch.from_numpy(gguf.quants.dequantize(g.tensors["token_embd.weight"].data,
                                                  gguf.GGMLQuantizationType.Q4_0))
    assert torch.equal(q.lm_head.dequantize_ref(), emb)
    assert torch.equal(q.model.embed_tokens.weight, emb)
    assert not q.config.tie_word_embeddings


def test_requested_scheme_and_float_on_request(tmp_path):
    m = model_of(tiny("moe"))
    path = export_gguf(m, tmp_path / "q8.gguf", None, "q8_0", progress=False)
    g = GGUFFile(path)
    f = load_gguf(path, quantize="bf16")
    assert not any(isinstance(x, QuantLinear) for x in f.modules())
    assert f.model.layers[0].mamba.in_proj.weight.dtype == torch.bfloat16
    deq = gguf.quants.dequantize(g.tensors["blk.0.ssm_in.weight"].data, gguf.GGMLQuantizationType.Q8_0)
    assert torch.equal(f.model.layers[0].mamba.in_proj.weight, torch.from_numpy(deq).bfloat16())
    i4 = load_gguf(path, quantize="int4:g64")
    assert i4.model.layers[0].mamba.in_proj.scheme.group == 64
    _, scheme, rows = gguf_plan(path, "int4:g64")
    how = dict((n, h) for n, _, h in rows)
    assert "second rounding" in how["blk.0.ssm_in.weight"]
    _, scheme, rows = gguf_plan(path)
    assert "no second rounding" in dict((n, h) for n, _, h in rows)["blk.0.ssm_in.weight"]


def _copy_metadata(writer, path):
    """Every key of ``path`` but the architecture (the writer has it) into ``writer``, with its GGUF type."""
    for k, field in gguf.GGUFReader(path).fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        vtype = field.types[0]
        writer.add_key_value(k, field.contents(), vtype,
                             sub_type=field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)


def _kquant_bytes(rows: int, cols: int, qtype, seed=0):
    """Random but valid blocks of a K-quant (finite fp16 scales): the gguf package cannot quantize to
    K-quants, so the file is made of raw blocks."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, cols // block, nbytes), dtype=np.uint8)
    # the fp16 super-block scales: Q4_K/Q5_K start with d, dmin; Q6_K ends with d
    offsets = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (nbytes - 2,)}[qtype.name]
    for off in offsets:
        data[..., off:off + 2] = np.frombuffer(np.float16(rng.uniform(1e-4, 2e-3)).tobytes(), np.uint8)
    return data.reshape(rows, -1)


def test_k_quants_dequantized_then_requantized(tmp_path):
    """A file of K-quants (as AI21's Q4_K_M): each matrix dequantized by the gguf package and requantized to
    the one scheme; asked for bf16, the dequantized values themselves."""
    cfg = tiny("dense-tied", hidden_size=256, intermediate_size=256, dt_rank=256, num_attention_heads=4)
    m = model_of(cfg)
    path = export_gguf(m, tmp_path / "bf16.gguf", None, "bf16", progress=False)
    g = GGUFFile(path)
    w = gguf.GGUFWriter(tmp_path / "k.gguf", "jamba")
    _copy_metadata(w, path)
    kinds = {}
    for t in g.tensors.values():
        if t.type == "BF16":
            qtype = [gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q6_K,
                     gguf.GGMLQuantizationType.Q5_K][len(kinds) % 3]
            kinds[t.name] = qtype
            w.add_tensor(t.name, _kquant_bytes(t.shape[0], t.shape[1], qtype, seed=len(kinds)), raw_dtype=qtype)
        else:
            w.add_tensor(t.name, np.ascontiguousarray(t.data).reshape(t.shape))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    kpath = tmp_path / "k.gguf"
    _, scheme, rows = gguf_plan(kpath)
    assert scheme.group == 32
    assert all("second rounding" in h for n, typ, h in rows if typ.endswith("_K") and n != "token_embd.weight")
    f = load_gguf(kpath, quantize="bf16", dtype=torch.float32)
    kg = GGUFFile(kpath)
    deq = lambda name: torch.from_numpy(gguf.quants.dequantize(kg.tensors[name].data, kinds[name]))  # noqa: E731
    assert torch.equal(f.model.layers[0].mamba.in_proj.weight, deq("blk.0.ssm_in.weight"))
    q = load_gguf(kpath, quantize="int8:g32:fp32", dtype=torch.float32)
    w8 = q.model.layers[0].mamba.in_proj.dequantize_ref()
    exact = deq("blk.0.ssm_in.weight")
    # requantized once: within half an int8 step of each block's scale
    step = exact.view(exact.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
    assert ((w8 - exact).view_as(step.expand(-1, -1, 32)).abs() <= step / 2 + 1e-7).all()
    x = logits(f, IDS)
    assert torch.isfinite(x).all() and torch.isfinite(logits(q, IDS)).all()


def test_config_from_metadata_checks_layers(tmp_path):
    cfg = tiny("pattern")
    path = export_gguf(model_of(cfg, torch.bfloat16), tmp_path / "p.gguf", None, "bf16", progress=False)
    got = config_from_gguf(GGUFFile(path))
    assert got.pattern == cfg.pattern == "amMAm"
    assert got.mamba_dt_rank == 32 and got.num_key_value_heads == 2 and got.num_experts == 3


def test_export_refuses_what_llama_cpp_cannot_run(tmp_path):
    for bad, why in [(dict(mamba_expand=1), "mamba_expand"), (dict(rope_theta=10000.0), "rotary"),
                     (dict(router_renormalize=True), "renormalise")]:
        m = HybridLM(tiny("moe", **bad)).init_weights(0)
        with pytest.raises(ValueError, match=why):
            export_gguf(m, tmp_path / "x.gguf", None, progress=False)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("bad, why", [
    (dict(layout="msaM", mamba2_n_heads=4, mamba2_head_dim=16, mamba2_d_state=8), r"layout symbols \['s'\]"),
    (dict(embedding_multiplier=2.0, logits_scaling=3.0), "multipliers .embedding_multiplier 2.0, logits_scaling 3.0"),
    (dict(attention_multiplier=0.1), "multipliers .attention_multiplier 0.1"),
    (dict(shared_expert_intermediate_size=32), "shared expert"),
])
def test_export_refuses_mamba2_layers_multipliers_and_shared_experts(tmp_path, bad, why):
    """These layouts once exported silently wrong (a Mamba-2 layer written as attention): now refused."""
    cfg = HybridConfig(**{**dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                 num_key_value_heads=2, mamba_dt_rank=32), **LAYOUTS["moe"], **bad})
    m = HybridLM(cfg).init_weights(0)
    with pytest.raises(ValueError, match="cannot be exported for llama.cpp: .*" + why):
        export_gguf(m, tmp_path / "x.gguf", None, progress=False)
    assert not (tmp_path / "x.gguf").exists()


# ---- malformed and foreign files ---------------------------------------------------------------------

TEXTS = ["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
         "The quick brown fox jumps over the lazy dog. " * 3, "Ünïcödé  ✓ 12345 — emoji 🚀 and tabs\tend"] * 20


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """A saved checkpoint with a trained byte-level BPE (what `hybridlm train` makes) and a chat template."""
    from hybridlm.tokenizer import train_tokenizer
    tok = train_tokenizer(TEXTS, vocab_size=300, show_progress=False)
    tok.config["chat_template"] = "{% for m in messages %}<|bos|>{{ m.content }}<|eos|>{% endfor %}"
    d = tmp_path_factory.mktemp("ckpt")
    m = model_of(tiny("moe", vocab_size=320), torch.bfloat16)
    m.save_pretrained(d)
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def small_file(tmp_path_factory, trained_dir):
    from hybridlm.tokenizer import load_tokenizer
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    return export_gguf(HybridLM.from_pretrained(trained_dir), path, load_tokenizer(trained_dir), "q8_0",
                       progress=False)


def test_other_architecture_is_refused_by_name(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="'llama'"):
        load_gguf(tmp_path / "llama.gguf")


def test_truncated_files_give_clear_errors(tmp_path, small_file):
    data = small_file.read_bytes()
    for cut in [0, 3, 10, 23, 40, 200, len(data) // 3, len(data) // 2, len(data) - 100, len(data) - 1]:
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=str(p.name)):
            load_gguf(p)


def test_header_counts_beyond_the_file_are_refused(tmp_path, small_file):
    data = bytearray(small_file.read_bytes())
    data[8:16] = (1 << 60).to_bytes(8, "little")          # tensor count
    p = tmp_path / "huge.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="more than"):
        GGUFFile(p)
    p.write_bytes(b"NOPE" + bytes(data[4:]))
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFFile(p)


def test_corrupted_bytes_never_crash(tmp_path, small_file):
    """Single-byte corruptions across the header, metadata and tensor table: a model, or ValueError."""
    data = small_file.read_bytes()
    rng = np.random.default_rng(0)
    header = gguf.GGUFReader(small_file).data_offset          # magic .. end of the tensor table
    for i, pos in enumerate(rng.integers(4, header, 200)):
        bad = bytearray(data)
        bad[pos] = (bad[pos] + int(rng.integers(1, 256))) % 256
        p = tmp_path / f"bad{i}.gguf"
        p.write_bytes(bytes(bad))
        try:
            load_gguf(p)
        except ValueError:
            pass
        p.unlink()


def test_unknown_tensor_type_is_named(tmp_path, small_file):
    g = GGUFFile(small_file)
    w = gguf.GGUFWriter(tmp_path / "i8.gguf", "jamba")
    _copy_metadata(w, small_file)
    for t in g.tensors.values():
        if t.name == "blk.0.ssm_in.weight":
            w.add_tensor(t.name, np.zeros(t.shape, np.int32))
        else:
            w.add_tensor(t.name, np.ascontiguousarray(t.data), raw_dtype=gguf.GGMLQuantizationType[t.type])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ValueError, match="I32"):
        load_gguf(tmp_path / "i8.gguf")


def test_cli_export_then_every_command_reads_the_file(tmp_path, trained_dir, capsys):
    from hybridlm.chat_template import ChatFormat
    from hybridlm.cli import main
    from hybridlm.tokenizer import load_tokenizer
    out = tmp_path / "m.gguf"
    assert main(["export", str(trained_dir), "--gguf", str(out)]) == 0
    assert main(["export", str(trained_dir), "--gguf", str(out)]) == 2           # exists: refused
    assert "--overwrite" in capsys.readouterr().err
    # the tokenizer from the file's metadata: same ids, same specials, the chat template
    a, b = load_tokenizer(trained_dir), load_tokenizer(out)
    for text in TEXTS[:3] + ["  leading and trailing  ", "<|eos|> inside", "never seen: \u4e2d\u6587"]:
        assert b.encode(text) == a.encode(text)
        assert b.decode(b.encode(text)) == text
    assert (b.bos_id, b.eos_id, b.vocab_size) == (a.bos_id, a.eos_id, 320)      # padded to the model's vocabulary
    fmt = ChatFormat.from_dir(out)
    assert fmt.template.render([{"role": "user", "content": "hi"}]) == "<|bos|>hi<|eos|>"
    assert a.eos_id in fmt.stop_ids
    # the model: bf16 in, bf16 out, bit for bit
    src, back = HybridLM.from_pretrained(trained_dir), HybridLM.from_pretrained(out)
    assert torch.equal(logits(src, IDS), logits(back, IDS))
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "def fib", "--max-new-tokens", "4"]) == 0
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "GGUF tensors" in shown and "blk.*.ssm_a" in shown and "A_log = log(-A)" in shown
    assert main(["plan", str(out), "--context", "1024"]) == 0
    # quantized export, loaded back into int8 without a second rounding
    q8 = tmp_path / "m-q8.gguf"
    assert main(["export", str(trained_dir), "--gguf", str(q8), "--type", "q8_0"]) == 0
    assert main(["inspect", str(q8)]) == 0
    assert "no second rounding" in capsys.readouterr().out
    assert main(["quantize", str(q8), "--to", "int4:g32", "--out", str(tmp_path / "int4")]) == 0
    assert (tmp_path / "int4" / "tokenizer.json").exists()
    assert HybridLM.from_pretrained(tmp_path / "int4").model.layers[0].mamba.in_proj.scheme.bits == 4
    assert main(["export", str(trained_dir), "--gguf", str(tmp_path / "x.gguf"), "--type", "q3"]) == 2
    assert main(["generate", str(tmp_path / "missing.gguf"), "--prompt", "x"]) == 2


def _converter():
    from .test_gguf_vocab import LLAMA_CPP
    return LLAMA_CPP / "convert_hf_to_gguf.py"


@pytest.mark.skipif(not _converter().exists(), reason=f"llama.cpp's convert_hf_to_gguf.py is not at {_converter()} "
                    f"(benchmarks/build_llama_cpp.sh puts it there; HYBRIDLM_LLAMA_CPP overrides the place)")
def test_file_from_llama_cpp_converter_matches_transformers(tmp_path):
    """transformers' JambaForCausalLM -> llama.cpp's convert_hf_to_gguf.py (bf16) -> hybridlm: the logits of
    transformers' model with the same bf16 rounding the converter applies, to fp32 accuracy."""
    import json
    import subprocess
    import sys
    transformers = pytest.importorskip("transformers")
    from .test_gguf_vocab import llama_style, trained_vocab
    tok = llama_style(trained_vocab(), prefix=False)
    cfg = tiny("moe", vocab_size=tok.vocab_size)
    d = cfg.to_dict()
    d.pop("architectures"), d.pop("model_type")
    torch.manual_seed(0)
    hf = transformers.JambaForCausalLM(transformers.JambaConfig(**d)).eval()
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    tok.backend.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({**tok.config, "tokenizer_class": "PreTrainedTokenizerFast"}))
    out = tmp_path / "converted.gguf"
    run = subprocess.run([sys.executable, str(_converter()), str(src), "--outtype", "bf16", "--outfile", str(out)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    ours = load_gguf(out, dtype=torch.float32)
    with torch.no_grad():   # the converter's rounding: matrices to bf16; norms, conv, router, A, D, biases F32
        for name, p in hf.named_parameters():
            if p.dim() == 2 and not name.endswith(("A_log", "router.weight")):
                p.copy_(p.bfloat16().float())
        want = hf(IDS).logits.float()
    got = logits(ours, IDS)
    # fp32 op-order differences only (measured 2e-4 of the largest logit; a wrong map or layout is O(1))
    assert (got - want).abs().max().item() <= 1e-3 * want.abs().max().item()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_fused_qkv_is_split(tmp_path):
    """Some converters write attention as one attn_qkv tensor (q rows, then k, then v): read as q, k, v."""
    m = model_of(tiny("moe"), torch.bfloat16)
    path = export_gguf(m, tmp_path / "m.gguf", None, "bf16", progress=False)
    g = GGUFFile(path)
    w = gguf.GGUFWriter(tmp_path / "qkv.gguf", "jamba")
    _copy_metadata(w, path)
    for t in g.tensors.values():
        if t.name.endswith(("attn_k.weight", "attn_v.weight")):
            continue
        data, name = np.ascontiguousarray(t.data), t.name
        if t.name.endswith("attn_q.weight"):
            block = t.name.rsplit(".", 2)[0]
            data = np.concatenate([np.ascontiguousarray(g.tensors[f"{block}.attn_{x}.weight"].data)
                                   for x in "qkv"])
            name = f"{block}.attn_qkv.weight"
        w.add_tensor(name, data.view(np.uint16) if t.type == "BF16" else data,
                     raw_dtype=gguf.GGMLQuantizationType[t.type])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    assert "blk.1.attn_qkv.weight" in GGUFFile(tmp_path / "qkv.gguf").tensors
    assert torch.equal(logits(load_gguf(tmp_path / "qkv.gguf"), IDS), logits(m, IDS))
