"""`hybridlm bench` on a tiny preset (structure only, never timings) and the benchmark scripts' CLIs."""
import json
import subprocess
import sys
from pathlib import Path

from hybridlm.bench import PeakRSS, bench, format_table
from hybridlm.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_bench_tiny_structure(tmp_path, capsys):
    res = bench("tiny", lengths=[16, 32], prompt=16, decode_prompt=8, decode_tokens=3, logits_budget="300KiB",
                out=str(tmp_path / "b"))
    rows = res["rows"]
    want = {(d, m, n) for d in ("float32", "bfloat16")
            for m, n in (("full_forward", 16), ("full_forward", 32), ("prompt", 16), ("decode", 3))}
    assert {(r["dtype"], r["metric"], r["tokens"]) for r in rows} == want
    assert all(r["tok_s"] > 0 and r["seconds"] > 0 and r["peak_rss"] > 0 for r in rows)
    # 16 x 4096 fp32 logits = 256 KiB fit a 300 KiB budget; 32 x 4096 = 512 KiB do not, so 32 tokens are
    # measured as hidden states + the head on the last token, and labelled so
    ff = {(r["dtype"], r["tokens"]): r["logits"] for r in rows if r["metric"] == "full_forward"}
    assert ff[("float32", 16)] == "all" and ff[("float32", 32)].startswith("last")
    assert res["params"]["total"] > res["params"]["active"] > 0
    assert {c["context"] for c in res["cache"]} == {8, 16, 32}
    # bf16 cache bytes: KV halves, SSM state stays fp32
    c32 = {c["dtype"]: c for c in res["cache"] if c["context"] == 32}
    assert c32["bfloat16"]["kv"] * 2 == c32["float32"]["kv"] and c32["bfloat16"]["ssm"] == c32["float32"]["ssm"]
    assert {"cpu", "threads", "torch", "commit", "kernels"} <= set(res["env"])
    out = capsys.readouterr().out
    assert "full forward 32 (last logits*)" in out and "decode 3 steps at ctx 8" in out and "bflo/floa" in out
    saved = json.loads((tmp_path / "b.json").read_text())
    assert len(saved["rows"]) == len(rows)
    assert format_table(saved) in (tmp_path / "b.md").read_text()


def test_bench_cli_one_dtype(capsys):
    assert main(["bench", "tiny", "--lengths", "8", "--prompt", "8", "--decode-prompt", "4", "--decode-tokens", "2",
                 "--dtypes", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16 tok/s" in out and "float32 tok/s" not in out


def test_peak_rss_sees_an_allocation():
    import torch
    with PeakRSS() as base:
        pass
    with PeakRSS() as mem:
        x = torch.ones(64 << 20, dtype=torch.uint8)   # 64 MiB touched
        del x
    assert mem.bytes > 0
    if mem.exact:
        assert mem.bytes - base.bytes > 32 << 20


def test_cpu_bench_help():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_bench.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "--no-llama-cpp" in r.stdout and "--contexts" in r.stdout


def test_cpu_bench_pieces():
    """The synthetic tokenizer has exactly the vocabulary the converter needs, and the pure-transformer
    twin matches bench-88m's parameter count within 2% with attention everywhere."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import cpu_bench
    finally:
        sys.path.pop(0)
    from hybridlm.config import preset
    from hybridlm.summary import param_counts
    tok = cpu_bench.synthetic_tokenizer(32000)
    assert tok.get_vocab_size() == 32000
    assert tok.decode(tok.encode("hello world").ids) == "hello world"
    twin = cpu_bench.equal_params_transformer(preset("bench-88m"))
    assert set(twin.pattern.lower()) == {"a"} and twin.pattern == "aAaAaAaA"
    want, got = param_counts(preset("bench-88m"))["total"], param_counts(twin)["total"]
    assert abs(got - want) / want < 0.02
    rows = [{"context": n, "model": m, "pp_tok_s": v} for n, h, t in ((1, 1.0, 2.0), (4, 1.0, 1.0), (16, 2.0, 1.0))
            for m, v in (("hybrid", h), ("transformer", t))]
    x = cpu_bench.crossover(rows, "pp_tok_s")
    assert x["wins_from"] == 16 and x["estimate"] is not None and 4 <= x["estimate"] <= 16


def test_moe_one_token_path_matches_grouped_path():
    """MoE's single-token shortcut (decode speed) gives what the grouped dispatch gives for that token."""
    import torch

    from hybridlm.config import preset
    from hybridlm.moe import MoE
    torch.manual_seed(0)
    for k, renorm in ((1, False), (2, False), (3, True)):
        moe = MoE(preset("tiny", num_experts_per_tok=k, router_renormalize=renorm)).eval()
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.1)
        x = torch.randn(3, 1, 128)
        with torch.no_grad():
            grouped, logits = moe(x)                              # 3 tokens: sort + per-expert batches
            for i in range(3):
                one, one_logits = moe(x[i:i + 1])                 # 1 token: experts called directly
                torch.testing.assert_close(one[0], grouped[i], rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(one_logits[0], logits[i], rtol=1e-5, atol=1e-6)


def test_bench_logits_are_the_models_own_with_logits_scaling():
    """The last-token-only path of full_forward goes through model.logits (Granite's logits_scaling),
    not lm_head alone."""
    import torch

    from hybridlm import HybridLM, preset
    from hybridlm.bench import forward_logits
    cfg = preset("tiny", layout="SSAS", num_hidden_layers=4, mamba2_n_heads=4, mamba2_head_dim=64,
                 mamba2_d_state=8, mamba2_chunk_size=4, logits_scaling=4.0, embedding_multiplier=2.0,
                 residual_multiplier=0.5, family="granitemoehybrid", router_renormalize=True,
                 shared_expert_intermediate_size=64)
    m = HybridLM(cfg).init_weights(0).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = m(ids)
        last = forward_logits(m, ids, all_logits=False)
        assert torch.equal(forward_logits(m, ids), want)
        assert (last - want[:, -1:]).abs().max().item() <= 1e-5
        assert (m.lm_head(m.hidden(ids)[0][:, -1:]) - last * 4).abs().max().item() <= 1e-4   # scaling mattered
