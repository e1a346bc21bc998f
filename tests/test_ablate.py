"""The ablation runner: spec parsing, equal-parameter matching, claim verdicts, and a seconds-long sweep
that writes CSV, markdown and PNGs and skips finished runs when rerun."""
import csv

import pytest

from hybridlm.cli import main
from hybridlm.eval.matching import count_params, match_variants
from hybridlm.eval.spec import load_spec, parse_spec
from hybridlm.eval.stats import compare, decide, paired_interval, stability, t_quantile, welch_interval

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
    assert {"attention", "mamba", "hybrid-1:3", "hybrid-1:7", "attn-start", "attn-end", "local-global",
            "hybrid-1:7-moe", "attention-nope", "hybrid-1:7-mamba2"} == {v.name for v in spec.variants}
    assert set(spec.tasks) == {"mqar", "format", "lm"} and len(spec.seeds) >= 5
    assert {c.id for c in spec.claims} >= {"a1", "a2", "b1", "b2", "b4", "c1", "c3", "d1", "f1", "f2", "m1", "moe"}
    m = match_variants(spec, spec.vocab.size)
    assert all(abs(x["deviation"]) <= spec.match_tolerance for n, x in m.items() if n != "attention-nope")
    assert m["local-global"]["config"].sliding_window == 16


def test_a_task_sweep_expands_into_one_task_per_value():
    spec = parse_spec({"variants": {"a": "aa"}, "tasks": {"mqar": {"sweep": "num_pairs", "num_pairs": [2, 4],
                                                                  "seq_len": 32}},
                       "claims": [{"task": "mqar-4", "metric": "acc", "a": "a", "b": "a", "expect": ">"}]})
    assert spec.tasks == {"mqar-2": {"kind": "mqar", "num_pairs": 2, "seq_len": 32},
                          "mqar-4": {"kind": "mqar", "num_pairs": 4, "seq_len": 32}}
    assert spec.sweeps == {"mqar": ("num_pairs", {"mqar-2": 2, "mqar-4": 4})}
    with pytest.raises(ValueError, match="must be a non-empty list"):
        parse_spec({"variants": {"a": "aa"}, "tasks": {"mqar": {"sweep": "num_pairs", "num_pairs": 4}}})
    with pytest.raises(ValueError, match="does not run it"):
        parse_spec({"variants": {"a": "aa", "b": "mm"}, "tasks": {"mqar": {"variants": ["a"]}},
                    "claims": [{"task": "mqar", "metric": "acc", "a": "a", "b": "b", "expect": ">"}]})


def test_quick_spec_runs_every_piece(tmp_path, capsys):
    """examples/ablation_quick.toml (what CI runs): a mixture-trained MQAR evaluated per number of pairs,
    format following, accumulation (micro_batch), validation curves, claims with paired intervals and the
    leave-one-seed-out column, context scaling with its verdict, plots."""
    out = tmp_path / "q"
    assert main(["ablate", "examples/ablation_quick.toml", "--out", str(out), "--threads", "1"]) == 0
    md = (out / "ablation_quick_tables.md").read_text()
    assert "mqar acc@pairs=2" in md and "mqar acc@pairs=8" in md and "format acc" in md
    assert "| b | one attention layer beats pure Mamba on MQAR |" in md and "2 × 4" in md
    assert "with one seed fewer" in md and "grows with context?" in md
    assert "training speed per worker (tokens/s" in md
    with open(out / "ablation_quick_curves.csv") as f:
        curves = list(csv.DictReader(f))
    vals = [c for c in curves if c["val"]]
    assert {int(c["step"]) for c in vals} == {2, 4} and all(0 <= float(c["val"]) <= 1 for c in vals)
    for png in ("mqar", "format", "curves", "context"):
        assert (out / f"ablation_quick_{png}.png").read_bytes()[:4] == b"\x89PNG"


def verdict(expect, a, b, margin=0.0):
    a, b = dict(enumerate(a)), dict(enumerate(b))
    return decide(expect, margin, compare(a, b))


def test_verdicts():
    assert verdict(">", [0.9, 0.92, 0.91], [0.1, 0.12, 0.11]) == "confirmed"
    assert verdict(">", [0.1, 0.12, 0.11], [0.9, 0.92, 0.91]) == "refuted"
    assert verdict(">", [0.5, 0.9, 0.1], [0.4, 0.8, 0.2]) == "inconclusive"
    assert verdict(">", [0.9], [0.1]) == "inconclusive"                   # one seed: no interval
    # a tiny, consistent difference inside the margin: the claim's advantage does not exist (TOST)
    assert verdict(">", [0.500, 0.601, 0.702, 0.400], [0.501, 0.600, 0.701, 0.401], margin=0.02) == "refuted"
    assert verdict(">", [0.500, 0.601, 0.702, 0.400], [0.501, 0.600, 0.701, 0.401]) == "inconclusive"
    assert verdict("<=", [2.00, 2.01, 2.02], [2.00, 2.01, 2.02], margin=0.05) == "confirmed"
    assert verdict("<=", [2.50, 2.51, 2.52], [2.00, 2.01, 2.02], margin=0.05) == "refuted"
    assert verdict("==", [2.00, 2.01, 2.02], [2.01, 2.02, 2.00], margin=0.05) == "confirmed"
    assert verdict("==", [2.00, 2.30, 1.70], [2.01, 2.02, 2.00], margin=0.05) == "inconclusive"
    assert verdict("==", [3.00, 3.01, 3.02], [2.01, 2.02, 2.00], margin=0.05) == "refuted"


def test_paired_interval_removes_the_seed_effect():
    # seeds differ a lot (an easy data order helps both), a beats b by 0.02 on every seed
    a = {0: 0.50, 1: 0.80, 2: 0.30, 3: 0.65, 4: 0.42}
    b = {s: v - 0.02 + 0.001 * (s % 2) for s, v in a.items()}
    paired = paired_interval(a, b)
    assert paired.paired and paired.n == 5 and paired.lo95 > 0           # decided when paired
    unpaired = welch_interval(list(a.values()), list(b.values()))
    assert unpaired.lo95 < 0 < unpaired.hi95                             # lost in the seed spread when not
    assert compare(a, b) == paired
    assert not compare(a, {0: 0.4, 1: 0.5, 2: 0.6}).paired                 # different seeds: Welch
    # hand-checked: diffs 0.1, 0.3, 0.2 -> mean 0.2, sd 0.1, se 0.0577, t(2) = 4.303
    iv = paired_interval({0: 1.1, 1: 1.3, 2: 1.2}, {0: 1.0, 1: 1.0, 2: 1.0})
    assert iv.d == pytest.approx(0.2) and iv.hi95 - iv.d == pytest.approx(4.303 * 0.1 / 3 ** 0.5, rel=1e-3)
    assert iv.hi90 - iv.d == pytest.approx(2.920 * 0.1 / 3 ** 0.5, rel=1e-3)
    with pytest.raises(ValueError, match="no seed in common"):
        paired_interval({0: 1.0}, {1: 1.0})


def test_t_quantiles():
    assert t_quantile(1) == 12.706 and t_quantile(4, 0.95) == 2.132
    assert t_quantile(30) > t_quantile(35) > t_quantile(40) == 2.021 > t_quantile(1e9) > 1.959
    assert t_quantile(2.7) == t_quantile(2)                               # Welch's fractional df: rounded down


def test_stability_names_the_seed_a_verdict_rests_on():
    a = {0: 0.61, 1: 0.62, 2: 0.60, 3: 0.61}
    assert stability(">", 0.0, a, {0: 0.50, 1: 0.51, 2: 0.50, 3: 0.52}) == []         # clear: survives any drop
    # five seeds barely decide it (95% interval [+0.0003, +0.052]); dropping any of the four seeds with the
    # smaller gaps leaves an interval that reaches below 0, dropping seed 4 (the largest gap, 0.06) does not
    a, b = {0: 0.60, 1: 0.62, 2: 0.63, 3: 0.64, 4: 0.66}, {0: 0.58, 1: 0.61, 2: 0.60, 3: 0.63, 4: 0.60}
    assert decide(">", 0.0, compare(a, b)) == "confirmed"
    assert stability(">", 0.0, a, b) == [0, 1, 2, 3]


def test_dry_run_trains_nothing(spec_file, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(["ablate", str(spec_file), "--out", str(out), "--dry-run"]) == 0
    assert "hybrid" in capsys.readouterr().out and not (out / "mini.csv").exists()


def test_help_documents_the_spec(capsys):
    with pytest.raises(SystemExit):
        main(["ablate", "--help"])
    text = capsys.readouterr().out
    assert "examples/ablation.toml" in text and "--workers" in text and "--dry-run" in text


def test_quick_shrinks_the_budget_not_the_design():
    from hybridlm.eval.ablate import plan_jobs, quick_spec
    full = load_spec("examples/ablation.toml")
    q = quick_spec(full)
    assert q.name == "ablations_quick" and q.seeds == full.seeds[:2]
    assert [c.id for c in q.claims] == [c.id for c in full.claims] and q.variants == full.variants
    for name, opts in q.tasks.items():
        assert opts["steps"] == 3 and opts["batch_size"] == 4 and opts["eval_size"] == 8
        assert opts.get("variants") == full.tasks[name].get("variants")
    assert q.context["lengths"] == [64, 128]
    full.tasks = {"mqar": full.tasks["mqar"]}          # no corpus needed
    q = quick_spec(full)
    jobs, _ = plan_jobs(q, "cpu")
    assert len(jobs) == 2 * len(full.tasks["mqar"]["variants"]) and all(j.train.steps == 3 for j in jobs)
