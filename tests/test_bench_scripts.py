"""The issue-14 benchmark scripts (benchmarks/speculative.py, benchmarks/multiturn.py): speculative.py runs end
to end with ``--quick`` on a tiny random checkpoint (its results are then meaningless, but every path is taken;
about 15 s); multiturn.py's ``--quick`` run starts two server processes (25 s on a busy 2-core machine), so it
runs only with HYBRIDLM_BENCH_E2E=1, and otherwise its help and the pieces that decide a verdict are checked."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from tests.test_chat import make_chat_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_chat_checkpoint(tmp_path_factory.mktemp("bench") / "ckpt", max_position_embeddings=2048)


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


def test_speculative_quick(ckpt, tmp_path):
    out = tmp_path / "spec"
    r = subprocess.run([sys.executable, str(BENCH / "speculative.py"), "--target", str(ckpt), "--draft", str(ckpt),
                        "--quick", "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "identical to plain greedy" in r.stdout
    res = json.loads(out.with_suffix(".json").read_text())
    assert res["identical"] and res["tokenizer"]["draft_equal"]
    cases = {(s["method"], s["k"]) for s in res["summary"]}
    assert cases == {("lookup", 2), ("lookup", 4), ("lookup", 6), ("draft", 4)}
    assert {t["method"] for t in res["targets"]} == {"lookup", "draft"}
    md = out.with_suffix(".md").read_text()
    assert res["command"] in md and "machine:" in md


def test_speculative_refuses_another_tokenizer(ckpt, tmp_path):
    from tokenizers import Tokenizer
    other = tmp_path / "other"
    other.mkdir()
    for f in ckpt.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    tok = Tokenizer.from_file(str(other / "tokenizer.json"))
    tok.add_tokens(["<|another|>"])
    tok.save(str(other / "tokenizer.json"))
    spec = _bench_module("speculative")
    with pytest.raises(SystemExit, match="not the target's"):
        spec.same_tokenizer(str(ckpt), str(other))
    spec.same_tokenizer(str(ckpt), str(ckpt))


def test_speculative_summary_and_verdicts():
    spec = _bench_module("speculative")

    def row(k, plain_s, spec_s, same=True):
        return {"task": "copy", "method": "lookup", "k": k, "temperature": 0.0, "plain_tokens": 100,
                "plain_decode_s": plain_s, "spec_tokens": 100, "spec_decode_s": spec_s, "identical": same,
                "stats": {"drafted": 10, "accepted": 5, "tokens": 20, "forwards": 10}}
    summary = spec.summarise([row(2, 1.0, 0.5), row(2, 3.0, 1.5), row(4, 1.0, 0.8, same=False)])
    k2 = next(s for s in summary if s["k"] == 2)
    assert k2["speedup"] == pytest.approx(2.0) and k2["identical"] and k2["prompts"] == 2
    assert not next(s for s in summary if s["k"] == 4)["identical"]
    (v,) = spec.verdicts(summary)
    assert v["k"] == 2 and v["met"] and v["target"] == 2.0


def test_speculative_divergence_tells_a_tie_from_a_difference():
    """A greedy run that left plain decoding is a tie only where the two tokens' logits in the full forward
    are within one step of their dtype (bf16 here); otherwise it stays a difference (the benchmark exits 1)."""
    import torch
    spec = _bench_module("speculative")

    def model_with(la, lb):
        def model(ids):
            logits = torch.zeros(1, ids.shape[1], 8, dtype=torch.bfloat16)
            logits[0, -1, 3], logits[0, -1, 5] = la, lb
            return logits
        return model
    plain, other = {"tokens": [1, 2, 3, 4]}, {"tokens": [1, 2, 5, 4]}
    for la, lb, tie in [(6.15625, 6.125, True), (7.21875, 7.21875, True), (6.15625, 6.0, False)]:
        r = spec.divergence(model_with(la, lb), torch.tensor([[9, 9]]), {"identical": False}, plain, other)
        d = r["divergence"]
        assert d["index"] == 2 and (d["plain_token"], d["spec_token"]) == (3, 5) and d["tie"] is tie
        assert spec.same_label(r).startswith("tie in bfloat16 logits at token 2" if tie else "DIFFERENT")
    same = {"identical": True}
    assert spec.divergence(None, None, same, plain, plain) is same and spec.same_label(same) == "identical"


def test_multiturn_help():
    r = subprocess.run([sys.executable, str(BENCH / "multiturn.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--prefix-cache-disk" in r.stdout and "--context-override" in r.stdout


@pytest.mark.skipif(not os.environ.get("HYBRIDLM_BENCH_E2E"), reason="two server starts (~25 s): HYBRIDLM_BENCH_E2E=1")
def test_multiturn_quick(ckpt, tmp_path):
    out = tmp_path / "mt"
    r = subprocess.run([sys.executable, str(BENCH / "multiturn.py"), "--model", str(ckpt), "--quick", "--no-llama",
                        "--threads", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    rows = res["hybridlm"]["rows"]
    assert [x["turn"] for x in rows] == [1, 2, 3, 4] and rows[-1]["after_restart"]
    assert rows[0]["reused_tokens"] == 0 and all(x["reused_tokens"] > 0 for x in rows[1:])
    # the restarted server found the conversation's states on disk
    assert rows[-1]["reused_tokens"] >= rows[-2]["prompt_tokens"]
    assert res["hybridlm"]["cold_reference"]["reused_tokens"] == 0
    assert not res["hybridlm"]["stop"]["killed"]
    assert res["llama_cpp"] == {"skipped": "--no-llama"}
    md = out.with_suffix(".md").read_text()
    assert "not run" in md and res["command"] in md


def test_multiturn_ratios_and_context_override(tmp_path):
    mt = _bench_module("multiturn")
    rows = [{"turn": 1, "ttft_s": 1.0}, {"turn": 2, "ttft_s": 0.1}, {"turn": 3, "ttft_s": 0.25},
            {"turn": 4, "ttft_s": 0.15}, {"turn": 5, "ttft_s": 0.2, "after_restart": True}]
    r = mt.ratios(rows)
    assert r["flat"]["turn"] == 3 and r["flat"]["ratio"] == pytest.approx(2.5)
    assert r["restart"]["ratio"] == pytest.approx(0.2 / 0.15)
    assert any("NOT met" in x for x in mt.target_lines("x", r))
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "jamba", "max_position_embeddings": 4096}))
    (src / "model.safetensors").write_bytes(b"x")
    out = mt.with_context(src, 16384, tmp_path / "work")
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 16384
    assert (out / "model.safetensors").resolve() == (src / "model.safetensors").resolve()
    (src / "config.json").write_text(json.dumps({"model_type": "jamba", "rope_theta": 1e4}))
    with pytest.raises(SystemExit, match="position encoding"):
        mt.with_context(src, 16384, tmp_path / "work2")


def test_load_smoke(tmp_path):
    """benchmarks/load.py for a few seconds with a few clients (its own tiny server): no well-formed request
    fails, every request is answered, each hostile kind gets its expected status (4xx, or 200 where the
    value is clamped), and the work of clients that went away drains."""
    out = tmp_path / "load"
    r = subprocess.run([sys.executable, str(BENCH / "load.py"), "--clients", "8", "--duration", "5", "--hostile",
                        "0.5", "--max-tokens", "8", "--threads", "1", "--read-timeout", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.with_suffix(".json").read_text())
    s = res["summary"]
    assert s["well_formed"] > 0 and s["well_formed_errors"] == 0, s["first_errors"]
    assert s["no_answer"] == 0 and s["drained_after"] and res["server_exit_code"] == 0
    assert res["server_tracebacks"] == 0, res["server_log_tail"]
    assert s["tokens"] > 0 and s["ttft_samples"] > 0 and 0 < s["ttft_p50_s"] <= s["ttft_p99_s"]
    load = _bench_module("load")
    for kind, (_, status) in load.HOSTILE.items():
        assert set(s["hostile_by_kind"][kind]) <= {str(status)}, (kind, s["hostile_by_kind"][kind])
    tried = [k for k, v in s["hostile_by_kind"].items() if v]
    assert len(tried) == len(load.HOSTILE), tried   # the kinds are sent in turn
    refused = sum(sum(v.values()) for k, v in s["hostile_by_kind"].items() if load.HOSTILE[k][1] >= 400)
    assert s["hostile_as_expected"] == s["hostile"] and s["hostile_4xx"] == refused > 0
    assert all(x is not None for x in s["rss_bytes"].values())
    md = out.with_suffix(".md").read_text()
    assert res["command"] in md and "machine:" in md and "errors among well-formed requests" in md


def test_fuzz_smoke(tmp_path):
    """benchmarks/fuzz.py with 10 examples per input class (random seed 1): every class is run and its
    examples are counted, each into one outcome, and none is a failure (a traceback, hang, unbounded
    allocation, wrong result or unclear error)."""
    pytest.importorskip("hypothesis")
    pytest.importorskip("fastapi")
    out = tmp_path / "fuzz"
    r = subprocess.run([sys.executable, str(BENCH / "fuzz.py"), "--examples", "10", "--seed", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    res = json.loads(out.with_suffix(".json").read_text())
    assert list(res["classes"]) == ["safetensors", "snapshots", "config.json", "chat templates", "request bodies"]
    for name, c in res["classes"].items():
        assert 0 < c["tried"] <= 10 and sum(c["outcomes"].values()) == c["tried"], (name, c)
        assert all(c["outcomes"][o] == 0 for o in res["must_be_zero_outcomes"]), (name, c["failures"])
    assert set(res["must_be_zero_outcomes"]) == {"unclear", "wrong", "traceback", "hang", "memory"}
    assert res["must_be_zero"] == 0 and r.returncode == 0, r.stderr[-3000:]
    md = out.with_suffix(".md").read_text()
    assert res["command"] in md and "machine:" in md and res["date"] in md


def test_quant_bench_llama_builds_and_crashes(tmp_path, monkeypatch):
    """quant_bench with two llama.cpp builds: when a combined llama-bench run crashes, each test runs alone
    (the ones that work are kept, the crash is recorded), and the report puts a column per build, the ratio
    against the faster one, and says which tests crashed."""
    qb = _bench_module("quant_bench")
    calls = []

    def fake_bench(paths, gguf, threads, pp, tg, reps):          # the AMX build crashes in any prompt test
        calls.append((paths["root"].name, tuple(pp), tg))
        if paths["root"].name == "amx" and any(pp):
            return {"error": "llama-bench failed (-11): "}
        rows = [{"metric": "prompt", "tokens": n, "tok_s": 10.0} for n in pp if n]
        rows += [{"metric": "decode", "tokens": tg, "tok_s": 4.0 if paths["root"].name == "amx" else 2.0}] if tg else []
        return {"rows": rows, "info": {"build_commit": "x", "backends": "CPU", "cpu_info": "cpu"}}

    monkeypatch.setattr(qb, "run_llama_bench", fake_bench)
    args = type("A", (), {"threads": 2, "pp": [512], "decode_tokens": 8, "llama_reps": 1})()
    got = {name: qb.llama_bench_each(qb.llama_cpp_paths(tmp_path / name), tmp_path / "m.gguf", args)
           for name in ("amx", "noamx")}
    assert got["amx"]["rows"] == [{"metric": "decode", "tokens": 8, "tok_s": 4.0}]
    assert [e["metric"] for e in got["amx"]["errors"]] == ["prompt"]
    assert calls.count(("noamx", (512,), 8)) == 1 and ("amx", (0,), 8) in calls      # one run, or each test alone
    res = {"command": "python benchmarks/quant_bench.py", "wall_seconds": 60, "env": {}, "threads": 2,
           "read_bandwidth": 20e9, "copy_bandwidth": 20e9, "gemm_flops": {"bfloat16": 1e12, "float32": 1e11},
           "roofline_tokens": 512, "pp": [512], "decode_prompt": 128, "decode_tokens": 8, "types": ["int4"],
           "params": 3e9, "plan": {}, "quantize_runs": {}, "llama_info": {k: v["info"] for k, v in got.items()},
           "llama_cpp": {k: {"int4": v} for k, v in got.items()},
           "hybridlm": {"int4": {"rows": [{"metric": "prompt", "tokens": 512, "tok_s": 40.0},
                                          {"metric": "decode", "tokens": 8, "tok_s": 6.0, "gb_s": 10.0}]}}}
    monkeypatch.setattr("hybridlm.bench.environment_md", lambda env: "- machine: test")
    qb.write_report(res, tmp_path / "r")
    md = (tmp_path / "r.md").read_text()
    assert "| int4 | 40.00 | crashed | 10.00 (Q4_0) | 4.00x |" in md          # prompt: only the build that ran
    assert "| int4 | 6.00 | 4.00 (Q4_0) | 2.00 (Q4_0) | 1.50x |" in md       # decode: against the faster build
    assert "`crashed`: llama-bench died" in md and "amx int4" in md


@pytest.mark.skipif(sys.platform != "linux" or not shutil.which("cc"), reason="needs a C compiler (Linux)")
def test_read_bandwidth_probe_builds_and_reports(tmp_path):
    exe = tmp_path / "read_bandwidth"
    subprocess.run(["cc", "-O3", "-fopenmp", str(BENCH / "read_bandwidth.c"), "-o", str(exe)], check=True)
    out = subprocess.run([str(exe), "16", "1"], capture_output=True, text=True, check=True).stdout
    rates = [float(line.split(":")[1].split()[0]) for line in out.splitlines() if line.startswith("prefetch")]
    assert len(rates) == 5 and min(rates) > 0.0
    assert out.splitlines()[-1] == f"read bandwidth, best: {max(rates):.1f} GB/s (threads: 1, buffer: 16 MiB)"
    bad = subprocess.run([str(exe), "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
