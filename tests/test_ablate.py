"""The ablation runner: spec parsing, equal-parameter matching, claim verdicts, and a seconds-long sweep
that writes CSV, markdown and PNGs and skips finished runs when rerun."""
import csv

import pytest

from hybridlm.cli import main
from hybridlm.eval.ablate import Claim, count_params, load_spec, match_variants, parse_spec, verdict

SPEC = """
name = "mini"
seeds = [0]

[model]
hidden_size = 32
intermediate_size = 64
num_attention_heads = 2
num_key_value_heads = 1
mamba_d_state = 4
num_experts = 2
num_experts_per_tok = 1

[match]
reference = "hybrid"
tolerance = 0.05

[train]
steps = 3
batch_size = 4
warmup = 1

[vocab]
size = 64
n_keys = 16
n_values = 16

[variants]
attention = "aa"
hybrid = "ma"

[tasks.mqar]
seq_len = 24
num_pairs = 4
eval_size = 16

[tasks.passkey]
seq_len = 16
key_len = 2
eval_at = [16, 32]
eval_size = 8
variants = ["hybrid"]
seeds = [1]

[tasks.lm]
corpus = "{corpus}"
cache_dir = "{cache}"
vocab_size = 300
seq_len = 16
eval_windows = 4
val_fraction = 0.3

[[claims]]
id = "x"
text = "hybrid beats attention on MQAR"
task = "mqar"
metric = "acc"
a = "hybrid"
b = "attention"
expect = ">"

[context]
variants = ["attention", "hybrid"]
lengths = [8, 16]
decode_tokens = 2
"""


@pytest.fixture
def spec_file(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):   # a few small "documents" so the validation split is not empty
        (corpus / f"doc{i}.py").write_text("".join(f"def f{i}_{j}(x, y):\n    return x * {j} + y\n\n"
                                                   for j in range(40)))
    path = tmp_path / "spec.toml"
    path.write_text(SPEC.format(corpus=corpus.as_posix(), cache=(tmp_path / "cache").as_posix()))
    return path


def test_sweep_writes_results_and_resumes(spec_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["ablate", str(spec_file), "--out", str(out), "--threads", "1"]) == 0
    log = capsys.readouterr().out
    assert "5 runs, 0 already done, 5 to do" in log
    with open(out / "mini.csv") as f:
        rows = list(csv.DictReader(f))
    runs = {(r["variant"], r["seed"], r["task"]) for r in rows}
    assert runs == {("attention", "0", "mqar"), ("hybrid", "0", "mqar"), ("hybrid", "1", "passkey"),
                    ("attention", "0", "lm"), ("hybrid", "0", "lm")}   # a task's own seeds replace the spec's
    metrics = {(r["variant"], r["task"], r["metric"]) for r in rows}
    assert ("hybrid", "passkey", "acc@32") in metrics and ("attention", "lm", "val_loss") in metrics
    assert all(int(r["tokens"]) > 0 and int(r["params"]) > 0 for r in rows)
    md = (out / "mini_tables.md").read_text()
    assert "| attention | `aa` |" in md and "mqar acc" in md and "lm val_loss" in md
    assert "| x | hybrid beats attention on MQAR |" in md and "inconclusive" in md   # one seed: no interval
    assert "Context scaling" in md
    for png in ("mini_mqar.png", "mini_passkey.png", "mini_lm.png", "mini_curves.png", "mini_context.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    before = (out / "mini.csv").read_text()

    # rerun: nothing to train, the CSV is untouched
    assert main(["ablate", str(spec_file), "--out", str(out), "--threads", "1"]) == 0
    assert "5 runs, 5 already done, 0 to do" in capsys.readouterr().out
    assert (out / "mini.csv").read_text() == before

    # a changed setting reruns exactly the runs it affects (here: the MQAR budget)
    spec_file.write_text(spec_file.read_text().replace("eval_size = 16", "eval_size = 16\nsteps = 2"))
    assert main(["ablate", str(spec_file), "--out", str(out), "--threads", "1"]) == 0
    assert "5 runs, 3 already done, 2 to do" in capsys.readouterr().out


def test_parameters_matched_within_tolerance():
    spec = parse_spec({
        "model": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "num_experts": 4, "num_experts_per_tok": 2},
        "match": {"reference": "hybrid", "tolerance": 0.02},
        "variants": {"attention": "aaaaaaaa", "mamba": "mmmmmmmm", "hybrid": "mmmmammm",
                     "moe": {"layout": "mMmMaMmM", "match": "active"}},
        "tasks": {"mqar": {}}})
    m = match_variants(spec, 256)
    ref = m["hybrid"]["params"]
    assert m["hybrid"]["field_value"] == 128
    assert m["attention"]["field_value"] > 128 > m["mamba"]["field_value"]   # attention layers are smaller
    for name in ("attention", "mamba"):
        assert abs(m[name]["params"] / ref - 1) < 0.02
        assert m[name]["params"] == count_params(m[name]["config"])
    # MoE: equal *active* parameters, more in total
    assert abs(m["moe"]["active_params"] / ref - 1) < 0.02 and m["moe"]["params"] > 1.2 * ref

    spec.match_field, spec.match_tolerance = "hidden_size", 0.05    # a coarser knob: multiples of 2 x heads
    m = match_variants(spec, 256)
    assert m["attention"]["config"].hidden_size > 64 and m["attention"]["config"].hidden_size % 8 == 0

    spec.match_tolerance = 1e-6
    with pytest.raises(ValueError, match="tolerance"):
        match_variants(spec, 256)


def test_spec_errors_say_what_to_fix(tmp_path):
    base = {"variants": {"a": "aa"}, "tasks": {"mqar": {}}}
    with pytest.raises(ValueError, match="no \\[variants\\]"):
        parse_spec({"tasks": {"mqar": {}}})
    with pytest.raises(ValueError, match="unknown top-level"):
        parse_spec({**base, "variant": {}})
    with pytest.raises(ValueError, match="unknown variant 'b'"):
        parse_spec({**base, "match": {"reference": "b"}})
    with pytest.raises(ValueError, match="expect must be one of"):
        parse_spec({**base, "claims": [{"task": "mqar", "metric": "acc", "a": "a", "b": "a", "expect": "=>"}]})
    with pytest.raises(ValueError, match="unknown \\[train\\]"):
        parse_spec({**base, "train": {"step": 3}})
    bad = tmp_path / "bad.toml"
    bad.write_text("[variants\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_spec(bad)
    with pytest.raises(FileNotFoundError, match="examples/ablation.toml"):
        load_spec(tmp_path / "missing.toml")


def test_example_spec_parses_and_matches():
    spec = load_spec("examples/ablation.toml")
    assert {"attention", "mamba", "hybrid-1:1", "hybrid-1:3", "hybrid-1:7", "attn-start", "attn-end",
            "hybrid-1:7-moe"} == {v.name for v in spec.variants}
    assert spec.claims and set(spec.tasks) == {"mqar", "induction", "passkey", "lm"}
    m = match_variants(spec, spec.vocab.size)
    assert all(abs(x["deviation"]) <= spec.match_tolerance for x in m.values())


def test_verdicts():
    c = Claim("c", "", "t", "acc", "a", "b", ">")
    assert verdict(c, [0.9, 0.92, 0.91], [0.1, 0.12, 0.11])[0] == "confirmed"
    assert verdict(c, [0.1, 0.12, 0.11], [0.9, 0.92, 0.91])[0] == "refuted"
    assert verdict(c, [0.5, 0.9, 0.1], [0.4, 0.8, 0.2])[0] == "inconclusive"
    assert verdict(c, [0.9], [0.1])[0] == "inconclusive"                 # one seed: no interval
    lower = Claim("c", "", "t", "loss", "a", "b", "<=", margin=0.05)     # a matches or beats b (a loss)
    assert verdict(lower, [2.00, 2.01, 2.02], [2.00, 2.01, 2.02])[0] == "confirmed"
    assert verdict(lower, [2.50, 2.51, 2.52], [2.00, 2.01, 2.02])[0] == "refuted"
    same = Claim("c", "", "t", "loss", "a", "b", "==", margin=0.05)
    assert verdict(same, [2.00, 2.01, 2.02], [2.01, 2.02, 2.00])[0] == "confirmed"
    assert verdict(same, [2.00, 2.30, 1.70], [2.01, 2.02, 2.00])[0] == "inconclusive"
    assert verdict(same, [3.00, 3.01, 3.02], [2.01, 2.02, 2.00])[0] == "refuted"


def test_dry_run_trains_nothing(spec_file, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(["ablate", str(spec_file), "--out", str(out), "--dry-run"]) == 0
    assert "hybrid" in capsys.readouterr().out and not (out / "mini.csv").exists()


def test_help_documents_the_spec(capsys):
    with pytest.raises(SystemExit):
        main(["ablate", "--help"])
    text = capsys.readouterr().out
    assert "examples/ablation.toml" in text and "--workers" in text and "--dry-run" in text
