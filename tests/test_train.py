"""Training: optimizer groups, the CLI contract, exact resume after SIGKILL, the NaN stop, fine-tuning,
and 2 processes (gloo; DDP and FSDP2) matching 1 process at the same global batch."""
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hybridlm import HybridLM, preset
from hybridlm.cli import main as cli_main
from hybridlm.optim import build_optimizer, lr_factor, param_groups
from hybridlm.tokenizer import load_tokenizer
from hybridlm.train import TrainConfig, read_metrics, sample, train

from .test_data import make_corpus

# a 2-layer shrink of `tiny` that keeps every part: a Mamba layer, an attention layer, a mixture of experts
SMALL = ("num_hidden_layers=2,layout=mA,hidden_size=64,intermediate_size=128,vocab_size=400,"
         "mamba_d_state=8,num_attention_heads=4,num_key_value_heads=2")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus and a cache shared by the module's runs (the tokenizer is trained once)."""
    root = tmp_path_factory.mktemp("train")
    return {"data": str(make_corpus(root / "corpus")), "cache_dir": str(root / "cache"), "root": root}


def config(setup, out, **kw) -> TrainConfig:
    base = dict(data=setup["data"], cache_dir=setup["cache_dir"], out=str(out), overrides=SMALL, seq_len=32,
                batch_size=4, micro_batch=2, steps=6, save_every=3, eval_every=3, eval_sequences=8, warmup=2,
                lr=3e-3, seed=0, threads=1, plot=False, progress=False)
    return TrainConfig(**{**base, **kw})


def cli_flags(cfg: TrainConfig) -> list[str]:
    """The same run as a `hybridlm train` command line."""
    flags = ["train"]
    for k, v in vars(cfg).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            flags += [flag, str(v)]
    return flags


def losses(out) -> list[float]:
    return [r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl")]


def subprocess_env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return env


# ---- optimizer ---------------------------------------------------------------------------------
def test_optimizer_groups_exempt_norms_biases_A_log_D():
    with torch.device("meta"):
        model = HybridLM(preset("tiny", mamba_conv_bias=True, mamba_proj_bias=True))
    decay, no_decay = param_groups(model, 0.1)
    names = dict(model.named_parameters())
    assert sorted(decay["names"] + no_decay["names"]) == sorted(names)          # every parameter, once
    for n in no_decay["names"]:
        assert "layernorm" in n or n.endswith((".bias", ".A_log", ".D")), n
    for n in decay["names"]:
        assert n.endswith(".weight") and "layernorm" not in n, n
    assert "model.layers.0.mamba.A_log" in no_decay["names"] and "model.layers.0.mamba.D" in no_decay["names"]
    assert "model.layers.0.mamba.conv1d.bias" in no_decay["names"]
    assert "model.final_layernorm.weight" in no_decay["names"]
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mamba.conv1d.weight",
            "model.layers.1.feed_forward.router.weight"} <= set(decay["names"])
    opt = build_optimizer(HybridLM(preset("tiny", num_hidden_layers=2, layout="mA")), 1e-3, 0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 10, 100, 0.1) for s in range(101)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(f[10:])) and f[100] == pytest.approx(0.1)
    assert f[55] == pytest.approx(0.1 + 0.9 * 0.5)                             # half way down the cosine


def test_activation_loss_is_mean_square_of_layer_outputs():
    model = HybridLM(preset("tiny", num_hidden_layers=2, layout="mA", vocab_size=64)).init_weights(0)
    x = torch.randint(0, 64, (2, 8))
    seen = []
    hooks = [layer.register_forward_hook(lambda m, i, o: seen.append(o[0])) for layer in model.model.layers]
    out = model.loss(x[:, :-1], x[:, 1:], activation_loss_coef=0.5)
    for h in hooks:
        h.remove()
    expected = torch.stack([o.pow(2).mean() for o in seen]).mean()
    torch.testing.assert_close(out["act"], expected)
    torch.testing.assert_close(out["loss"], out["ce"] + model.config.router_aux_loss_coef * out["aux"] + 0.5 * expected)
    assert model.loss(x[:, :-1], x[:, 1:])["act"] == 0



def test_distillation_loss_is_kl_to_the_teacher_and_agreement_counts_argmax_matches():
    torch.manual_seed(0)
    model = HybridLM(preset("tiny", num_hidden_layers=2, layout="mA", vocab_size=64)).init_weights(0)
    x = torch.randint(0, 64, (2, 9))
    y = x[:, 1:].clone()
    y[0, :3] = -100                                                       # ignored positions leave kd out
    with torch.no_grad():
        student = model(x[:, :-1])
    teacher = student.clone()
    teacher[1] += 5 * student.std() * torch.randn_like(student[1])        # row 1 disagrees, row 0 does not
    out = model.loss(x[:, :-1], y, teacher_logits=teacher, distill=0.75)
    keep = (y != -100).reshape(-1)
    t = teacher.reshape(-1, 64)[keep].log_softmax(-1)
    s = student.reshape(-1, 64)[keep].log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1).mean()
    torch.testing.assert_close(out["kd"], kl, atol=1e-5, rtol=1e-5)
    agree = (t.argmax(-1) == s.argmax(-1)).float().mean()
    assert 0 < float(agree) < 1 and out["agree"] == agree
    aux = model.config.router_aux_loss_coef * out["aux"]
    torch.testing.assert_close(out["loss"], 0.25 * out["ce"] + 0.75 * kl + aux, atol=1e-5, rtol=1e-5)
    # a teacher equal to the student: nothing to learn, full agreement
    same = model.loss(x[:, :-1], y, teacher_logits=student)
    assert float(same["kd"].detach()) < 1e-6 and float(same["agree"]) == 1.0
    plain = model.loss(x[:, :-1], y)
    assert plain["kd"] == 0 and plain["agree"] == 0
    torch.testing.assert_close(plain["loss"], plain["ce"] + aux)
    with pytest.raises(ValueError, match="vocabulary"):
        model.loss(x[:, :-1], y, teacher_logits=teacher[..., :32])

# ---- the command line --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_run(setup):
    """`hybridlm train` as the issue's contract writes it (plus flags that shrink the model)."""
    out = setup["root"] / "cli"
    flags = ["train", "--preset", "tiny", "--data", setup["data"], "--steps", "4", "--save-every", "2", "--seed", "1",
             "--out", str(out), "--overrides", SMALL, "--seq-len", "32", "--batch-size", "4", "--eval-every", "2",
             "--cache-dir", setup["cache_dir"], "--threads", "1", "--no-progress"]
    assert cli_main(flags) == 0
    return out, flags


def test_cli_writes_metrics_plot_and_a_checkpoint_transformers_loads(cli_run):
    out, _ = cli_run
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    assert rows[-1]["val_ppl"] == pytest.approx(math.exp(rows[-1]["val_loss"]))
    assert rows[-1]["tokens"] == 4 * 4 * 32 and rows[0]["lr"] < rows[1]["lr"]          # warmup
    assert (out / "loss.png").stat().st_size > 1000
    from transformers import AutoTokenizer, JambaForCausalLM
    hf = JambaForCausalLM.from_pretrained(out).eval()
    ours = HybridLM.from_pretrained(out)
    hf_tok = AutoTokenizer.from_pretrained(out)
    ids = hf_tok("def main():\n    return 0\n", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    assert hf.config.eos_token_id == hf_tok.eos_token_id == 2
    text = sample(ours, load_tokenizer(out), "def ", 12, seed=0)
    assert text.startswith("def ") and text == sample(ours, load_tokenizer(out), "def ", 12, seed=0)


def test_resume_refuses_other_flags_and_existing_runs(cli_run):
    out, flags = cli_run
    with pytest.raises(ValueError, match="already holds a training run"):
        train(TrainConfig(out=str(out)))
    changed = flags + ["--resume", "--lr", "0.1"]
    assert cli_main(changed) == 2                                               # a user error, exit code 2
    with pytest.raises(ValueError, match=r"--lr 0.005 -> 0.1"):
        train(TrainConfig(**{**_parse(flags), "resume": True, "lr": 0.1}))
    assert train(TrainConfig(**{**_parse(flags), "resume": True}))["step"] == 4    # nothing left to do


def _parse(flags: list[str]) -> dict:
    from hybridlm.cli import build_parser
    args = vars(build_parser().parse_args(flags))
    return {k: v for k, v in args.items() if k not in ("command", "_fn")}


def test_cli_help_documents_the_contract():
    from hybridlm.cli import build_parser
    sub = build_parser()._subparsers._group_actions[0].choices["train"]
    text = sub.format_help()
    for flag in ("--preset", "--data", "--steps", "--save-every", "--seed", "--out", "--resume", "--no-resume"):
        assert flag in text
    assert "examples:" in text and "torchrun" in text


# ---- exact resume ------------------------------------------------------------------------------
def test_resume_after_sigkill_reproduces_the_uninterrupted_run(setup, tmp_path):
    steps = 12
    ref = config(setup, tmp_path / "ref", steps=steps, save_every=3)
    train(ref)
    killed = config(setup, tmp_path / "killed", steps=steps, save_every=3)
    proc = subprocess.Popen([sys.executable, "-m", "hybridlm", *cli_flags(killed)], env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = Path(killed.out) / "train_state.pt"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(state, weights_only=True)["step"]
    assert 3 <= saved < steps
    summary = train(config(setup, tmp_path / "killed", steps=steps, save_every=3, resume=True))
    assert summary["step"] == steps
    assert losses(killed.out) == losses(ref.out)                               # bitwise
    assert len(losses(killed.out)) == steps
    a = torch.load(Path(ref.out) / "train_state.pt", weights_only=True)
    b = torch.load(state, weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(b["model"][k], v), k
    assert read_metrics(Path(ref.out) / "metrics.jsonl")[-1]["val_loss"] == pytest.approx(
        read_metrics(state.parent / "metrics.jsonl")[-1]["val_loss"], abs=1e-6)


class Killed(BaseException):
    """Stands for SIGKILL inside a save: no ``except Exception`` handler can swallow it."""


def kill_between_state_and_model(monkeypatch, at_step: int):
    """os.replace that 'kills' the run once train_state.pt of ``at_step`` is renamed, just before the
    exported model.safetensors is: the window between a checkpoint's two renames."""
    real, saved = os.replace, []

    def replace(src, dst):
        if Path(dst).name == "model.safetensors" and saved and saved[-1] == at_step:
            raise Killed
        real(src, dst)
        if Path(dst).name == "train_state.pt":
            saved.append(torch.load(dst, weights_only=True)["step"])
    monkeypatch.setattr(os, "replace", replace)


def model_file_equals_state(out: Path) -> bool:
    """model.safetensors holds exactly the weights of train_state.pt (a tied lm_head is stored once)."""
    from hybridlm.safetensors_io import SafeTensorsFile
    state = torch.load(out / "train_state.pt", weights_only=True)
    want = dict(state["model"])
    if state["model_config"].get("tie_word_embeddings"):
        want.pop("lm_head.weight", None)
    f = SafeTensorsFile(out / "model.safetensors")
    return set(f.keys()) == set(want) and all(torch.equal(f.get(k), v) for k, v in want.items())


@pytest.mark.parametrize("steps", [2, 4], ids=["only-save", "last-of-two-saves"])
def test_a_kill_between_the_state_and_model_renames_is_repaired_on_resume(setup, tmp_path, monkeypatch, capsys,
                                                                         steps):
    """train_state.pt (step N) is renamed, the exported model is not: --resume at step N of N used to
    say 'nothing to do' and leave the export stale (or absent) beside an orphaned model.safetensors.tmp."""
    cfg = config(setup, tmp_path / "run", steps=steps, save_every=2, eval_every=0)
    kill_between_state_and_model(monkeypatch, at_step=steps)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.undo()
    out = Path(cfg.out)
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == steps
    assert (out / "model.safetensors.tmp").exists()                    # the window is real
    assert not (out / "model.safetensors").exists() or not model_file_equals_state(out)
    capsys.readouterr()
    assert train(config(setup, out, steps=steps, save_every=2, eval_every=0, resume=True))["step"] == steps
    assert "re-exported" in capsys.readouterr().out
    assert model_file_equals_state(out)
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    HybridLM.from_pretrained(out)                                       # a complete checkpoint
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, steps + 1))


def test_a_torn_last_metrics_line_does_not_block_resume(setup, tmp_path):
    cfg = config(setup, tmp_path / "torn", steps=2, save_every=2, eval_every=0)
    train(cfg)
    metrics = Path(cfg.out) / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 2.71')                            # killed while writing step 3's row
    assert read_metrics(metrics)[-1]["step"] == 2                       # readers skip it too
    train(config(setup, cfg.out, steps=2, save_every=2, eval_every=0, resume=True))   # nothing to do, but:
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]   # repaired
    with open(metrics, "a") as f:
        f.write('{"step": 3, "lo')
    train(config(setup, cfg.out, steps=3, save_every=2, eval_every=0, resume=True))
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3]
    metrics.write_text('{"step": 1}\nnot json\n{"step": 2}\n')         # damage elsewhere: a clear error
    with pytest.raises(ValueError, match="line 2 is not a metrics row"):
        train(config(setup, cfg.out, steps=4, save_every=2, eval_every=0, resume=True))


def snapshot_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_an_out_that_is_not_this_runs_is_refused_unless_overwrite(setup, cli_run, tmp_path, capsys):
    base, _ = cli_run
    # a checkpoint from elsewhere, with files this run would not write (a chat template, a generation config)
    foreign = tmp_path / "foreign"
    HybridLM(preset("tiny", num_hidden_layers=2, layout="mA", vocab_size=64)).init_weights(3).save_pretrained(foreign)
    (foreign / "chat_template.jinja").write_text("{{ messages }}")
    (foreign / "generation_config.json").write_text('{"eos_token_id": 7}')
    before = snapshot_of(foreign)
    cfg = config(setup, foreign, steps=2, save_every=2, eval_every=0)
    capsys.readouterr()
    assert cli_main(cli_flags(cfg)) == 2
    err = capsys.readouterr().err.strip()
    assert "is not empty" in err and "--overwrite" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert snapshot_of(foreign) == before                                # untouched
    train(config(setup, foreign, steps=2, save_every=2, eval_every=0, overwrite=True))
    names = {p.name for p in foreign.iterdir()}
    assert "chat_template.jinja" not in names and "generation_config.json" not in names   # no mixed checkpoint
    assert model_file_equals_state(foreign) and HybridLM.from_pretrained(foreign).config.vocab_size == 400

    # --init X --out X: X is read, then overwritten; refused without --overwrite
    x = tmp_path / "x"
    x.mkdir()
    for p in base.iterdir():
        if p.name not in ("train_state.pt", "metrics.jsonl", "loss.png"):
            (x / p.name).write_bytes(p.read_bytes())
    before = snapshot_of(x)
    in_place = dict(init=str(x), overrides="", steps=2, save_every=2, eval_every=0, lr=1e-12)
    with pytest.raises(ValueError, match="is the --init checkpoint itself"):
        train(config(setup, x, **in_place))
    assert snapshot_of(x) == before
    train(config(setup, x, overwrite=True, **in_place))
    assert model_file_equals_state(x)
    tuned, original = HybridLM.from_pretrained(x), HybridLM.from_pretrained(base)
    torch.testing.assert_close(tuned.lm_head.weight, original.lm_head.weight, atol=1e-7, rtol=0)  # from its own weights

    # what a run stopped before its first checkpoint leaves is this run's to continue, not a foreign checkpoint
    early = tmp_path / "early"
    early.mkdir()
    (early / "metrics.jsonl").write_text('{"step": 1, "loss": 6.0}\n')
    (early / "model.safetensors.tmp").write_bytes(b"partial")
    train(config(setup, early, steps=2, save_every=2, eval_every=0))
    assert model_file_equals_state(early) and not (early / "model.safetensors.tmp").exists()


def test_numeric_flags_out_of_range_are_one_line_errors(setup, tmp_path, capsys):
    bad = [("weight_decay", float("inf")), ("activation_loss", float("inf")), ("val_fraction", float("inf")),
           ("threads", 10 ** 8), ("seed", 10 ** 30)]
    for name, value in bad:
        flags = cli_flags(config(setup, tmp_path / "never"))
        i = flags.index("--" + name.replace("_", "-"))
        flags[i + 1] = "1e400" if isinstance(value, float) else str(value)
        capsys.readouterr()
        assert cli_main(flags) == 2, name
        err = capsys.readouterr().err.strip()
        assert f"--{name.replace('_', '-')}" in err and len(err.splitlines()) == 1, err
    # a sample longer than the model's context would allocate its cache only after training: refused first
    cfg = config(setup, tmp_path / "sample", sample_tokens=10 ** 8)
    assert cli_main(cli_flags(cfg)) == 2
    assert "--sample-tokens 100000000" in capsys.readouterr().err
    assert not (tmp_path / "sample" / "train_state.pt").exists()
    # a batch whose activations cannot fit in memory is refused before the model allocates anything
    for changes, flag in [({"batch_size": 10 ** 8, "micro_batch": 0}, "--batch-size / processes = 100000000"),
                          ({"batch_size": 10 ** 8, "micro_batch": 10 ** 7}, "--micro-batch 10000000")]:
        cfg = config(setup, tmp_path / "huge", **changes)
        assert cli_main(cli_flags(cfg)) == 2
        err = capsys.readouterr().err.strip()
        assert flag in err and "GiB of memory" in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "huge" / "train_state.pt").exists()
    # a batch that fits in memory but is larger than the corpus (10^8 sequences, 2 at a time) would make one
    # step run for days: refused, saying how many windows there are
    cfg = config(setup, tmp_path / "huge", batch_size=10 ** 8, micro_batch=2)
    assert cli_main(cli_flags(cfg)) == 2
    err = capsys.readouterr().err.strip()
    assert "--batch-size 100000000" in err and "windows of 33 tokens" in err and len(err.splitlines()) == 1, err


# ---- divergence --------------------------------------------------------------------------------
def test_nan_stops_with_a_clear_message_and_a_loadable_checkpoint(setup, tmp_path, monkeypatch, capsys):
    original, calls = HybridLM.loss, []

    def poisoned(self, *args, **kwargs):                 # the 3rd training batch yields NaN
        out = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(HybridLM, "loss", poisoned)
    cfg = config(setup, tmp_path / "nan", micro_batch=4, steps=6, save_every=100, eval_every=0)
    assert cli_main(cli_flags(cfg)) == 1
    err = capsys.readouterr().err
    assert "training diverged at step 3: the loss is nan" in err
    assert f"{cfg.out} holds the checkpoint of step 2" in err and "lower --lr" in err
    model = HybridLM.from_pretrained(cfg.out)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.load(Path(cfg.out) / "train_state.pt", weights_only=True)["step"] == 2
    assert [r["step"] for r in read_metrics(Path(cfg.out) / "metrics.jsonl")] == [1, 2]


# ---- fine-tuning -------------------------------------------------------------------------------
def test_fine_tune_from_a_checkpoint_starts_from_its_weights(setup, cli_run, tmp_path):
    base, _ = cli_run
    # a learning rate so small that the weights cannot move: what comes out is what went in
    cfg = config(setup, tmp_path / "ft", init=str(base), overrides="", steps=2, save_every=2, eval_every=0, lr=1e-12)
    train(cfg)
    tuned, original = HybridLM.from_pretrained(cfg.out), HybridLM.from_pretrained(base)
    for (name, p), q in zip(tuned.named_parameters(), original.parameters()):
        torch.testing.assert_close(p, q, atol=1e-7, rtol=0, msg=name)
    assert len(read_metrics(Path(cfg.out) / "metrics.jsonl")) == 2
    assert (Path(cfg.out) / "tokenizer.json").read_text() == (base / "tokenizer.json").read_text()
    assert json.loads((Path(cfg.out) / "config.json").read_text())["vocab_size"] == 400


# ---- 2 processes -------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(setup):
    """The reference: 1 process, global batch 4 as 2 accumulated micro-batches of 2, fp32."""
    cfg = config(setup, setup["root"] / "one", dtype="fp32", steps=4, save_every=4, eval_every=4)
    train(cfg)
    return cfg


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(setup, one_process, parallel, tmp_path):
    cfg = config(setup, tmp_path / parallel, dtype="fp32", steps=4, save_every=4, eval_every=4, parallel=parallel)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "hybridlm", *cli_flags(cfg)]
    env = {**subprocess_env(), "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr[-4000:]
    assert losses(cfg.out) == pytest.approx(losses(one_process.out), rel=1e-5)
    two, one = read_metrics(Path(cfg.out) / "metrics.jsonl"), read_metrics(Path(one_process.out) / "metrics.jsonl")
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-5)
    assert two[-1]["grad_norm"] == pytest.approx(one[-1]["grad_norm"], rel=1e-4)
    a, b = HybridLM.from_pretrained(cfg.out), HybridLM.from_pretrained(one_process.out)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=name)


def test_the_ablation_lab_trains_through_the_trainers_step(setup, tmp_path):
    """`hybridlm train` and `hybridlm ablate` take the same step: on the same model, seed and batch (4
    sequences in 2 micro-batches) the lab's first-step loss and updated weights equal the trainer's."""
    from hybridlm.eval.ablate import Job, run_job
    from hybridlm.eval.spec import Train
    from hybridlm.train import Trainer
    trainer = Trainer(config(setup, tmp_path / "run", steps=1, warmup=1, grad_clip=0.5))
    x, y = (torch.cat(t) for t in zip(*[(a.cpu(), b.cpu()) for a, b, _ in trainer._micro_batches(0)]))
    m = trainer.train_step(0)
    trainer.optimizer.step()

    class OneBatch:                                      # a task that serves the trainer's first batch
        seq_len = x.shape[1]

        def stream(self, batch_size, seed):
            assert batch_size == len(x)
            while True:
                yield x, y

        def evaluate(self, model, n, seed=0, device="cpu"):
            OneBatch.model = model
            return {"none": 0.0}

    lab = Train(steps=1, batch_size=4, micro_batch=2, lr=3e-3, warmup=1, weight_decay=0.1, grad_clip=0.5)
    job = Job("v", 0, "t", OneBatch(), trainer.model_config, lab, 0, "h", "cpu")
    _, curve = run_job(job)
    assert curve[0]["loss"] == pytest.approx(m["ce"], rel=1e-6)
    for (name, a), b in zip(trainer.model.named_parameters(), OneBatch.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_distill_from_a_teacher_raises_agreement_and_refuses_another_tokenizer(setup, cli_run, tmp_path, capsys):
    """--distill-from: the student (here a smaller model) learns the teacher's logits; validation reports
    how often the two pick the same token, and the run's own numbers show it rising."""
    teacher, _ = cli_run
    cfg = config(setup, tmp_path / "draft", overrides=SMALL.replace("hidden_size=64", "hidden_size=32"),
                 distill_from=str(teacher), steps=12, save_every=12, eval_every=4, lr=1e-2, warmup=0)
    train(cfg)
    rows = read_metrics(Path(cfg.out) / "metrics.jsonl")
    val = [r["val_agree"] for r in rows if "val_agree" in r]
    assert len(val) == 3 and val[-1] > val[0], val
    assert all(0 <= r["agree"] <= 1 and r["kd"] >= 0 for r in rows)
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["kd"] + 1e-3 * rows[-1]["aux"], rel=1e-4)  # distill=1
    assert "val agreement with the teacher" in capsys.readouterr().err
    # a teacher with another tokenizer would score other tokens: refused, with the fix named
    other = tmp_path / "other"
    HybridLM.from_pretrained(teacher).save_pretrained(other)
    tok = json.loads((teacher / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    for f in ("tokenizer_config.json", "special_tokens_map.json"):
        if (teacher / f).exists():
            (other / f).write_text((teacher / f).read_text())
    with pytest.raises(ValueError, match="tokenizer differs"):
        train(config(setup, tmp_path / "draft2", distill_from=str(other), steps=2))
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        train(config(setup, tmp_path / "draft3", distill_from=str(tmp_path), steps=2))
    with pytest.raises(ValueError, match="--distill must be in"):
        config(setup, tmp_path / "draft4", distill_from=str(teacher), distill=1.5)
