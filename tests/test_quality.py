"""Perplexity and reference agreement (hybridlm.eval.quality) against direct torch computations, and the
``eval`` command end to end on a tiny checkpoint with a tokenizer."""
import inspect
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from hybridlm import HybridLM, preset
from hybridlm.checkpoint import load_model
from hybridlm.cli import main
from hybridlm.eval.quality import compare, perplexity, windows
from hybridlm.tokenizer import load_tokenizer, train_tokenizer

SMALL = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             mamba_d_state=8)


def tiny(seed: int) -> HybridLM:
    torch.manual_seed(seed)
    return HybridLM(preset("tiny", **SMALL)).init_weights(seed).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (50,), generator=torch.Generator().manual_seed(0))


def direct_log_probs(model, ids, context):
    """fp32 log-softmax and targets of each window ids[s : s+L+1], one window per forward pass."""
    for s in range(0, len(ids) - 1, context):
        w = ids[s:s + context + 1]
        with torch.no_grad():                  # not around the yield: grad mode would leak to the caller
            lp = model(w[None, :-1])[0].float().log_softmax(-1)
        yield lp, w[1:]


def test_windows_score_every_token_but_the_first_once(ids):
    batches = windows(ids, 16, batch_size=2)
    assert [tuple(x.shape) for x, _ in batches] == [(2, 16), (1, 16), (1, 1)]    # 49 targets: 3 windows + tail
    assert torch.equal(torch.cat([y.flatten() for _, y in batches]), ids[1:])
    assert torch.equal(torch.cat([x.flatten() for x, _ in batches]), ids[:-1])


def test_perplexity_is_cross_entropy_on_the_windows(ids):
    model = tiny(0)
    r = perplexity(model, ids, context=16, batch_size=2)
    nll = sum(F.nll_loss(lp, y, reduction="sum").item() for lp, y in direct_log_probs(model, ids, 16)) / 49
    assert r["tokens"] == 49
    assert r["nll"] == pytest.approx(nll, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert r["nll"] != pytest.approx(perplexity(model, ids, context=49)["nll"], rel=1e-4)  # context matters


def test_model_against_itself_agrees_exactly(ids):
    model = tiny(0)
    r = compare(model, model, ids, context=16)
    assert r["kl"] == pytest.approx(0.0, abs=1e-7)
    assert r["top1"] == 1.0
    assert r["reference_nll"] == r["nll"]


def test_kl_and_top1_of_two_models_match_direct_computation(ids):
    model, reference = tiny(0), tiny(1)
    r = compare(model, reference, ids, context=16, batch_size=2)
    kl = top1 = 0.0
    for (lp, y), (lq, _) in zip(direct_log_probs(model, ids, 16), direct_log_probs(reference, ids, 16)):
        kl += (lq.exp() * (lq - lp)).sum().item()                      # KL(reference || model)
        top1 += (lp.argmax(-1) == lq.argmax(-1)).sum().item()
    assert r["kl"] > 1e-4
    assert r["kl"] == pytest.approx(kl / 49, rel=1e-4)
    assert r["top1"] == pytest.approx(top1 / 49)
    assert r["reference_nll"] == pytest.approx(perplexity(reference, ids, context=16)["nll"], rel=1e-5)
    assert compare(reference, model, ids, context=16)["kl"] != pytest.approx(r["kl"], rel=1e-3)  # direction


def test_mismatched_vocabularies_refused(ids):
    with pytest.raises(ValueError, match="vocabularies differ"):
        compare(tiny(0), HybridLM(preset("tiny", **{**SMALL, "vocab_size": 65})), ids, context=16)


# ---- the command -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    pytest.importorskip("tokenizers")
    from tests.test_chat import CORPUS, make_chat_checkpoint
    d = tmp_path_factory.mktemp("quality")
    (d / "held.txt").write_text("\n".join(reversed(CORPUS)) * 3)
    return make_chat_checkpoint(d / "ckpt"), d / "held.txt"


@pytest.fixture
def run(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRIDLM_CACHE", str(tmp_path / "cache"))

    def run(*args):
        rc = main(["eval", *map(str, args)])
        out, err = capsys.readouterr()
        return rc, out, err
    return run


def test_cli_perplexity_matches_library(ckpt, run):
    path, text = ckpt
    rc, out, _ = run(path, "--data", text, "--context", 32, "--json")
    assert rc == 0
    r = json.loads(out)
    tok = load_tokenizer(path)
    ids = tok.encode(text.read_text()) + [tok.eos_id]                  # one document, then EOS
    expected = perplexity(HybridLM.from_pretrained(path), ids, context=32)
    assert r["tokens"] == len(ids) - 1 > 64
    assert r["nll"] == pytest.approx(expected["nll"], rel=1e-5)
    rc, out, _ = run(path, "--data", text, "--context", 32, "--max-tokens", 10, "--json")
    assert json.loads(out)["tokens"] == 10


def test_cli_table_with_reference(ckpt, run):
    path, text = ckpt
    rc, out, err = run(path, "--data", text, "--reference", path, "--context", 32)
    assert rc == 0
    nll = json.loads(run(path, "--data", text, "--context", 32, "--json")[1])["nll"]
    assert "tokens scored in windows of 32" in out
    assert f"{nll:.4f}" in out.splitlines()[2] and "[reference]" in out.splitlines()[3]
    assert "KL(reference || model) 0.000000 nats/token   top-1 agreement 100.00%" in out
    assert "eval" in err                                                 # the progress bar, on stderr


def test_cli_errors(ckpt, run, tmp_path):
    path, text = ckpt
    other = tmp_path / "other"
    shutil.copytree(path, other)
    train_tokenizer(["completely different text, other merges " * 20], 300, show_progress=False).save(other)
    (tmp_path / "blank.txt").write_text("  \n")
    cases = [((path,), "--data PATH"),
             (("tiny", "--data", text), "not a checkpoint directory with a tokenizer"),
             ((path, "--data", tmp_path / "missing.txt"), "no such file or directory"),
             ((path, "--data", tmp_path / "blank.txt"), "no text found"),
             ((path, "--data", text, "--context", 0), "--context must be at least 1"),
             ((path, "--data", text, "--reference", other), "different tokenizer"),
             ((path, "--data", text, "--reference", "tiny"), "vocabularies differ")]
    for args, message in cases:
        rc, out, err = run(*args)
        last = err.splitlines()[-1]                                      # after any progress bars
        assert rc == 2 and last.startswith("hybridlm eval: error:") and message in last and out == "", (args, err)


@pytest.mark.skipif("quantize" not in inspect.signature(load_model).parameters,
                    reason="checkpoint.load_model has no quantize parameter yet")
def test_cli_quantized_against_original(ckpt, run):
    path, text = ckpt
    plain = json.loads(run(path, "--data", text, "--context", 32, "--json")[1])
    for q in ("int8", "int4"):
        rc, out, _ = run(path, "--data", text, "--context", 32, "--quantize", q, "--reference", path, "--json")
        r = json.loads(out)
        assert rc == 0
        assert r["reference_nll"] == pytest.approx(plain["nll"], rel=1e-6)
        assert 0 < r["kl"] < 0.1 and r["top1"] > 0.5, (q, r)
