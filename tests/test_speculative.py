"""Speculative decoding: greedy output identical to plain greedy on several layouts and in batches, sampled
output distributed exactly as the target's, rollback leaving the cache as if the rejected tokens were
never seen, the CLI flags and their errors."""
import copy

import pytest
import torch

from hybridlm import HybridLM, preset
from hybridlm import speculative as spec_mod
from hybridlm.generate import Generation, Sampling, StopCriteria, left_pad, prefill, stream, transform
from hybridlm.speculative import Speculative, verify

LAYOUTS = {
    "jamba": dict(layout="mMaM"),                                  # Mamba + attention + MoE
    "attention-first": dict(layout="AmMa"),
    "sliding": dict(layout="mwMw", sliding_window=4, rope_theta=10000.0),   # window < every prompt
    "mamba2": dict(layout="mSaM"),                                 # a Mamba-2 layer: "copy" falls back to "rerun"
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: threads only add overhead on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed=0, vocab=64, **kw):
    cfg = preset("tiny", vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, mamba_d_state=8, **kw)
    return HybridLM(cfg).init_weights(seed).eval()


def noisy_copy(model, scale, seed=1):
    """A draft model that mostly agrees with ``model``: its weights plus a little noise."""
    d = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std().nan_to_num(0.0))
    d._fingerprint = None
    return d


def repetitive(n, seed, vocab=64):
    """A prompt of n tokens made of a repeated random phrase (so prompt lookup finds matches)."""
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(0, vocab, (5,), generator=g).tolist()
    return (phrase * (n // 5 + 1))[:n]


def run(model, prompts, max_new, spec=None, sampling=None, stop=()):
    x, mask = left_pad(prompts)
    gen = Generation(max_new, sampling or Sampling(), StopCriteria(tuple(stop)), speculative=spec)
    return torch.stack(list(stream(model, x, gen, mask)), 1)


def drafter(kind, model, k, rollback="copy"):
    if kind == "lookup":
        return Speculative("lookup", k=k, rollback=rollback)
    # a fixed k (no adaptive drafting: these tests are about the verify and the rollback)
    return Speculative("draft", k=k, draft=noisy_copy(model, 0.5), rollback=rollback, adaptive=False)


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["lookup", "draft"])
@pytest.mark.parametrize("rollback", ["copy", "rerun"])
def test_greedy_speculative_equals_plain_greedy(name, kind, rollback):
    m = tiny(**LAYOUTS[name])
    prompts = [repetitive(13, seed=1)]
    plain = run(m, prompts, 30)
    spec = drafter(kind, m, k=3, rollback=rollback)      # chunks of 4 fit the sliding window's ring
    out = run(m, prompts, 30, spec)
    assert out.tolist() == plain.tolist()
    st = spec.stats
    # both paths ran: drafts accepted (fewer forwards than tokens) and drafts rolled back
    assert st.accepted > 0 and st.rollbacks > 0 and st.tokens_per_forward > 1
    assert st.forwards < 30
    copies = rollback == "copy" and name != "mamba2"
    assert st.reruns == (0 if copies else st.rollbacks)


@pytest.mark.parametrize("scheme", ["int8", "int4:g32"])
@pytest.mark.parametrize("k", [3, 7])
def test_greedy_speculative_on_quantized_layers_equals_plain_greedy(scheme, k):
    """Quantized weights (quant.py): the verify chunks (k + 1 <= 8 tokens: the whole-step C++ call, with the
    Mamba trails recorded there) keep the output of plain greedy decoding, token for token."""
    from hybridlm.kernels import decode_cpu
    from hybridlm.quant import quantize_model
    m = quantize_model(tiny(**LAYOUTS["jamba"]), scheme)
    prompts = [repetitive(13, seed=1)]
    plain = run(m, prompts, 30)
    spec = Speculative("lookup", k=k)
    calls = []
    real = decode_cpu.plan_step
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode_cpu, "plan_step", lambda *a: calls.append(a[2].shape[1]) or real(*a))
        out = run(m, prompts, 30, spec)
    assert out.tolist() == plain.tolist()
    assert spec.stats.accepted > 0 and spec.stats.reruns == 0 and k + 1 in calls


@pytest.mark.parametrize("name", list(LAYOUTS))
@pytest.mark.parametrize("kind", ["lookup", "draft"])
def test_padded_batch_speculative_equals_each_prompt_alone(name, kind, monkeypatch):
    monkeypatch.setattr("hybridlm.engine.CAP_DRAFTS", False)   # 3 rows speculate (not capped to the C++ step)
    m = tiny(**LAYOUTS[name])
    prompts = [repetitive(n, seed=n) for n in (6, 15, 9)]
    spec = drafter(kind, m, k=3)
    batch = run(m, prompts, 16, spec)
    assert spec.stats.accepted > 0 and spec.stats.rollbacks > 0
    for i, p in enumerate(prompts):
        assert batch[i].tolist() == run(m, [p], 16).tolist()[0]


def test_greedy_with_penalties_and_stop_token():
    """The penalties see drafted tokens as plain decoding would have seen them; a stop token mid-draft ends
    the row as it ends plain decoding."""
    m = tiny(**LAYOUTS["jamba"])
    prompts = [repetitive(12, seed=3), repetitive(7, seed=4)]
    s = Sampling(repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.1)
    plain = run(m, prompts, 20, sampling=s)
    stop = int(plain[0, 9])
    plain = run(m, prompts, 20, sampling=s, stop=[stop])
    out = run(m, prompts, 20, Speculative("lookup", k=4), sampling=s, stop=[stop])
    assert out.tolist() == plain.tolist()


def snapshot_tensors(cache):
    return {k: t.clone() for k, t in cache.tensors().items()}


@pytest.mark.parametrize("name,window", [("jamba", None), ("sliding", 6), ("sliding", 2), ("mamba2", None)])
@pytest.mark.parametrize("keep", [0, 1, 3, 5])
@pytest.mark.parametrize("copy_states", [True, False])
def test_rollback_leaves_the_cache_of_the_kept_tokens(name, window, keep, copy_states):
    """checkpoint, a chunk of 5 tokens, rollback keeping ``keep`` == a cache that only saw those, every
    tensor: bit for bit when the kept tokens are run again (strategy 1), to float rounding when the
    states are copied from the chunk's trail (strategy 2). Windows 6 and 2 are shorter than the text; with
    2 the chunk overwrites the whole ring, and Mamba-2 layers keep no trail, so there the copy falls back
    to running the kept tokens again."""
    kw = dict(LAYOUTS[name], **({"sliding_window": window} if window else {}))
    m = tiny(**kw)
    prompts = [repetitive(9, seed=5), repetitive(6, seed=6)]
    x, mask = left_pad(prompts)
    chunk = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(7))
    a, b = m.new_cache(2, 20), m.new_cache(2, 20)
    with torch.no_grad():
        prefill(m, a, x, mask)
        prefill(m, b, x, mask)
        ck = a.checkpoint(5, trail=copy_states)
        m(chunk, a)
        kept = a.rollback(ck, keep if copy_states else 0)
        copied = copy_states and window != 2 and name != "mamba2"
        assert kept == (keep if copied else 0)
        if keep > kept:
            m(chunk[:, kept:keep], a, last_only=True)
        if keep:
            m(chunk[:, :keep], b, last_only=True)
    assert a.pos == b.pos
    assert torch.equal(a.valid, b.valid) and torch.equal(a.seen, b.seen)
    ta, tb = snapshot_tensors(a), snapshot_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        if copied and keep:
            assert (ta[k].float() - tb[k].float()).abs().max() < 1e-5, k
        else:
            assert torch.equal(ta[k], tb[k]), k
    if copied and keep:     # the copy is the state itself, not a near miss: a wrong offset is far off
        ssm = [k for k in ta if k.endswith(".ssm")][0]
        assert (ta[ssm] - tb[ssm]).abs().max() < 1e-3 * tb[ssm].abs().max()


@pytest.mark.parametrize("backend_name", ["auto", "ref"])
def test_scan_records_the_state_before_every_token(backend_name, backend):
    """selective_scan(states=...) (C++ kernel with a checkpoint every token, and the reference): states[:, t]
    is the state a scan of the first t tokens ends in."""
    from hybridlm.kernels import selective_scan
    backend(backend_name)
    g = torch.Generator().manual_seed(0)
    b, l, d, n = 2, 6, 20, 4
    u, dt, z = (torch.randn(b, l, d, generator=g) for _ in range(3))
    B, C = torch.randn(b, l, n, generator=g), torch.randn(b, l, n, generator=g)
    A, D, h0, bias = -torch.rand(d, n, generator=g), torch.randn(d, generator=g), torch.randn(b, d, n, generator=g), \
        torch.randn(d, generator=g)
    states = torch.empty(b, l, d, n)
    with torch.no_grad():
        y, h = selective_scan(u, dt, A, B, C, D, h0, delta_bias=bias, z=z, states=states)
        assert torch.equal(states[:, 0], h0)
        for t in range(1, l):
            _, ht = selective_scan(u[:, :t], dt[:, :t], A, B[:, :t], C[:, :t], D, h0, delta_bias=bias, z=z[:, :t])
            assert (states[:, t] - ht).abs().max() < 1e-5
        y2, h2 = selective_scan(u, dt, A, B, C, D, h0, delta_bias=bias, z=z)
    assert torch.equal(y, y2) and torch.equal(h, h2)       # recording changes nothing else


def test_rollback_refuses_a_checkpoint_that_does_not_cover_the_cache():
    m = tiny(**LAYOUTS["jamba"])
    c = m.new_cache(1, 16)
    prefill(m, c, torch.tensor([[1, 2, 3]]))
    ck = c.checkpoint(2)
    with torch.no_grad():
        m(torch.tensor([[4, 5, 6]]), c)
    with pytest.raises(ValueError, match="does not cover"):
        c.rollback(ck)


@pytest.mark.parametrize("kind", ["lookup", "draft"])
def test_stream_left_early_rolls_the_cache_back_to_the_tokens_taken(kind):
    """A consumer that stops mid-step (chat on a stop string) finds the cache plain decoding leaves:
    every token taken but the last one fed."""
    m = tiny(**LAYOUTS["sliding"])
    p = [repetitive(11, seed=8)]
    x = torch.tensor(p)
    caches = []
    for spec in (None, drafter(kind, m, k=4)):
        cache = m.new_cache(1, 40)
        taken = []
        for t in stream(m, x, Generation(20, speculative=spec), cache=cache):
            taken.append(int(t[0]))
            if len(taken) == 7:
                break
        caches.append((taken, cache))
    (t1, c1), (t2, c2) = caches
    assert t1 == t2 and c1.pos == c2.pos
    s1, s2 = snapshot_tensors(c1), snapshot_tensors(c2)
    for k in s1:
        assert (s1[k].float() - s2[k].float()).abs().max() < 1e-5, k


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of ``counts`` against ``probs`` (cells expecting < 5 merged), and its degrees of freedom."""
    n = counts.sum()
    exp = probs.double() * n
    big = exp >= 5
    obs_c = torch.cat([counts[big].double(), counts[~big].double().sum()[None]])
    exp_c = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = exp_c > 0
    stat = ((obs_c[keep] - exp_c[keep]) ** 2 / exp_c[keep]).sum()
    return float(stat), int(keep.sum()) - 1


def within(counts, probs) -> bool:
    """Chi-square within 5 standard deviations of its mean (a p-value near 1e-5): stable for a correct
    rule, far exceeded by the wrong rules below."""
    stat, df = chi_square(counts, probs)
    return stat < df + 5 * (2 * df) ** 0.5


def rule_samples(q_kind: str, n=60000, v=6, seed=0):
    """Run ``verify`` on n rows of one drafted token: target p0 after the context, p1 after the draft.
    Returns (first emitted token per row, the bonus token of rows that accepted, p0, p1)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, 2, v, generator=g).expand(n, 2, v) * 1.5
    s = Sampling(temperature=1.0)
    p = transform(logits[:1], s).softmax(-1)[0]
    if q_kind == "lookup":
        drafts, q = torch.full((n, 1), 2), None
    else:
        qdist = torch.softmax(torch.randn(v, generator=g) * 1.5, -1)
        drafts = torch.multinomial(qdist.expand(n, v), 1, replacement=True, generator=g)
        q = qdist.expand(n, 1, v)
    a, x = verify(logits, drafts, torch.ones(n, dtype=torch.long), q, s, g)
    first = torch.where(a == 1, drafts[:, 0], x)
    return first, x[a == 1], p[0], p[1]


@pytest.mark.parametrize("q_kind", ["lookup", "draft"])
def test_accept_reject_rule_gives_the_target_distribution(q_kind, monkeypatch):
    first, bonus, p0, p1 = rule_samples(q_kind)
    assert within(torch.bincount(first, minlength=6), p0)
    assert within(torch.bincount(bonus, minlength=6), p1)
    # the check has teeth: two classic mistakes fail it
    monkeypatch.setattr(spec_mod, "residual", lambda p, q: p)          # resampling from p after a rejection
    first, _, p0, _ = rule_samples(q_kind)
    assert not within(torch.bincount(first, minlength=6), p0)


def test_accept_always_would_fail_the_check():
    """Keeping every draft (no rejection) is caught by the same check."""
    n, v = 60000, 6
    g = torch.Generator().manual_seed(0)
    p0 = torch.softmax(torch.randn(v, generator=g) * 1.5, -1)
    first = torch.full((n,), 2)
    assert not within(torch.bincount(first, minlength=v), p0)


def exact_pairs(model, prompt, s: Sampling) -> torch.Tensor:
    """P(t1, t2) [v, v] of the target under ``s`` (penalties included), computed exactly."""
    v = model.config.vocab_size
    x = torch.tensor([prompt])
    seen = torch.zeros(1, v, dtype=torch.bool)
    seen[0, x[0]] = True
    with torch.no_grad():
        p1 = transform(model(x)[:, -1], s, seen, torch.zeros(1, v)).softmax(-1)[0]   # [v]
        both = torch.cat([x.expand(v, -1), torch.arange(v)[:, None]], 1)            # [v, l + 1]
        seen2 = seen.expand(v, v).clone()
        seen2[torch.arange(v), torch.arange(v)] = True
        p2 = transform(model(both)[:, -1], s, seen2, torch.eye(v)).softmax(-1)      # [v, v]
    return p1[:, None] * p2


@pytest.mark.parametrize("kind", ["lookup", "draft"])
def test_sampled_speculative_output_has_the_target_distribution(kind, monkeypatch):
    """The first two tokens of many independent rows (one batch, one seed) against the exact joint
    distribution, through the whole pipeline: transforms, drafters, verify, rollback."""
    v = 8
    m = tiny(vocab=v, initializer_range=0.2, **LAYOUTS["jamba"])   # peaked, not one-hot
    prompt = repetitive(8, seed=2, vocab=v)
    s = Sampling(temperature=0.9, top_p=0.97, repetition_penalty=1.2, frequency_penalty=0.5, seed=1)
    exact = exact_pairs(m, prompt, s).flatten()
    n = 4000

    def pairs():
        spec = Speculative("lookup", k=1) if kind == "lookup" else \
            Speculative("draft", k=1, draft=tiny(seed=5, vocab=v, initializer_range=0.2, layout="mMmm"))
        out = run(m, [prompt] * n, 3, spec, sampling=s)
        assert spec.stats.drafted > 0 and 0 < spec.stats.accepted < spec.stats.drafted
        return torch.bincount(out[:, 0] * v + out[:, 1], minlength=v * v)
    assert within(pairs(), exact)
    monkeypatch.setattr(spec_mod, "residual", lambda p, q: p)
    assert not within(pairs(), exact)


def test_bad_flags_are_refused_clearly():
    m = tiny()
    with pytest.raises(ValueError, match="k .*>= 1"):
        Speculative("lookup", k=0)
    with pytest.raises(ValueError, match="method must be one of"):
        Speculative("medusa")
    with pytest.raises(ValueError, match="draft model is needed"):
        Speculative("draft")
    with pytest.raises(ValueError, match="n-gram"):
        Speculative("lookup", ngrams=(0,))
    other = tiny(vocab=65)
    with pytest.raises(ValueError, match="vocabulary has 65 tokens, the target's 64"):
        m.generate(torch.tensor([[1, 2, 3]]), 4, speculative=Speculative("draft", draft=other))
    with pytest.raises(ValueError, match="'lookup' or 'draft:PATH'"):
        spec_mod.from_flag("draft:", 4, m)


def test_cli_flags(capsys):
    from hybridlm.cli import main
    args = ["generate", "tiny", "--prompt", "1 2 3 4 1 2 3 4 1 2", "--max-new-tokens", "12"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args + ["--speculative", "lookup", "--draft-k", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == plain
    assert "tokens per target forward" in out.err and "drafted tokens accepted" in out.err
    assert main(args + ["--speculative", "draft:tiny", "--draft-k", "2"]) == 0
    assert capsys.readouterr().out == plain       # the same model as its own draft
    assert main(args + ["--speculative", "lookup", "--draft-k", "0"]) == 2
    assert "--draft-k" in capsys.readouterr().err
    assert main(args + ["--speculative", "draft:bench-88m"]) == 2
    assert "share the target's tokenizer" in capsys.readouterr().err
    assert main(args + ["--speculative", "ngram"]) == 2


def test_chat_session_with_speculation_gives_the_same_replies_and_state(tmp_path):
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    from hybridlm.chat import ChatSession
    from hybridlm.chat_template import ChatFormat
    from tests.test_chat import make_chat_checkpoint
    ckpt = make_chat_checkpoint(tmp_path / "ckpt", initializer_range=0.2)
    model = HybridLM.from_pretrained(ckpt).eval()
    fmt = ChatFormat.from_dir(ckpt)
    sessions = [ChatSession(model, fmt, max_new_tokens=12, sampling=Sampling(0.0), speculative=sp)
                for sp in (None, Speculative("lookup", k=3))]
    for text in ("hello world hello world", "and again: hello world"):
        turns = [s.reply(text) for s in sessions]
        assert sessions[0].messages == sessions[1].messages
        assert sessions[0].tokens == sessions[1].tokens
        a, b = sessions[0].state.tensors, sessions[1].state.tensors
        for k in a:
            assert (a[k].float() - b[k].float()).abs().max() < 1e-5, k
    assert "tokens per target forward" in turns[1].speculative


def test_chat_command_flag(tmp_path, monkeypatch, capsys):
    """``hybridlm chat --speculative lookup`` answers as without it and prints its acceptance."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    import io
    import sys

    from hybridlm.cli import main
    from tests.test_chat import make_chat_checkpoint
    ckpt = make_chat_checkpoint(tmp_path / "ckpt")
    outs = []
    for flags in ([], ["--speculative", "lookup", "--draft-k", "3"]):
        monkeypatch.setattr(sys, "stdin", io.StringIO("hello world\nhello again\n"))
        assert main(["chat", str(ckpt), "--temperature", "0", "--max-new-tokens", "8"] + flags) == 0
        outs.append(capsys.readouterr())
    assert outs[0].out == outs[1].out and outs[0].out.strip()
    assert outs[1].err.count("tokens per target forward") == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
    assert main(["chat", str(ckpt), "--speculative", "draft:bench-88m"]) == 2
    assert "share the target's tokenizer" in capsys.readouterr().err


def exact_triples(model, prompt, s: Sampling) -> torch.Tensor:
    """P(t1, t2, t3) [v, v, v] of the target under ``s`` (penalties included), by enumeration."""
    v = model.config.vocab_size
    x = torch.tensor([prompt])
    out = torch.ones(1)
    for n in range(3):
        prev = torch.cartesian_prod(*[torch.arange(v)] * n).reshape(-1, n) if n else torch.zeros(1, 0, dtype=torch.long)
        seqs = torch.cat([x.expand(len(prev), -1), prev], 1)
        seen = torch.zeros(len(prev), v, dtype=torch.bool)
        seen.scatter_(1, seqs, True)
        counts = torch.zeros(len(prev), v).scatter_add_(1, prev, torch.ones(prev.shape))
        with torch.no_grad():
            p = transform(model(seqs)[:, -1], s, seen, counts).softmax(-1)       # [v^n, v]
        out = (out[:, None] * p).reshape(-1)
    return out.reshape(v, v, v)


def test_sampled_single_rows_over_seeds_keep_several_tokens(monkeypatch):
    """One row per run, many seeds: verify steps keep up to two tokens (the draft and the bonus token), and
    (t2, t3) still follow the target's exact joint distribution."""
    v = 8
    m = tiny(vocab=v, initializer_range=0.2, **LAYOUTS["jamba"])
    prompt = repetitive(8, seed=2, vocab=v)
    s = dict(temperature=0.9, top_p=0.97, repetition_penalty=1.2, frequency_penalty=0.5)
    exact = exact_triples(m, prompt, Sampling(**s)).sum(0).flatten()

    def pairs():
        counts, kept_two = torch.zeros(v * v, dtype=torch.long), 0
        for seed in range(1200):
            spec = Speculative("lookup", k=2)
            out = run(m, [prompt], 3, spec, sampling=Sampling(**s, seed=seed))[0]
            counts[out[1] * v + out[2]] += 1
            kept_two += spec.stats.forwards == 1 and spec.stats.tokens == 2
        assert kept_two > 100
        return counts
    assert within(pairs(), exact)
    # the check has teeth: keeping every draft the target gives any probability is caught
    monkeypatch.setattr(torch, "rand", lambda *shape, **kw: torch.zeros(*shape))
    assert not within(pairs(), exact)


def plans(monkeypatch):
    """Record each speculative step's kept counts per row (``speculative.plan``, as the engine calls it)."""
    from hybridlm import engine
    seen, real = [], engine.plan

    def recorded(want, active, slack, per_row):
        out = real(want, active, slack, per_row)
        seen.append(out[active].tolist())
        return out
    monkeypatch.setattr(engine, "plan", recorded)
    return seen


def mixed_prompts():
    """One copy-heavy prompt (lookup drafts are accepted) and one random one (they are mostly not)."""
    noise = torch.randint(0, 64, (11,), generator=torch.Generator().manual_seed(11)).tolist()
    return [repetitive(13, seed=1), noise, repetitive(9, seed=4)]


@pytest.mark.parametrize("name", ["jamba", "sliding", "mamba2"])
@pytest.mark.parametrize("kind", ["lookup", "draft"])
def test_batch_rows_keep_their_own_counts_and_the_output_of_plain_greedy(name, kind, monkeypatch):
    """Rows of one batch accepting different numbers of drafts: greedy output == plain greedy == each prompt
    alone. With full attention and Mamba-1 layers each row keeps its own count (a hole after the rows that
    kept fewer); with a sliding window (a hole would take window slots) or Mamba-2 layers (no trail) every
    row keeps the fewest, and the output is the same."""
    from hybridlm.cache import Cache
    monkeypatch.setattr("hybridlm.engine.CAP_DRAFTS", False)   # the drafts as asked (not capped to the C++ step)
    m = tiny(**LAYOUTS[name])
    prompts = mixed_prompts()
    plain = run(m, prompts, 24)
    for i, p in enumerate(prompts):
        assert plain[i].tolist() == run(m, [p], 24).tolist()[0]
    spec = drafter(kind, m, k=4)
    steps = plans(monkeypatch)
    out = run(m, prompts, 24, spec)
    assert out.tolist() == plain.tolist()
    assert spec.stats.accepted > 0 and len(spec.stats.kept) == 3
    ragged = [s for s in steps if len(set(s)) > 1]
    assert bool(ragged) == (name == "jamba")
    if name == "jamba":
        # the rule it replaces: every row keeps the fewest (forced here), same tokens, more verify forwards
        # for the copy-heavy row's share: the batch keeps fewer tokens per forward
        monkeypatch.setattr(Cache, "holes_exact", lambda self: False)
        fewest = drafter(kind, m, k=4)
        steps.clear()
        assert run(m, prompts, 24, fewest).tolist() == plain.tolist()
        assert all(len(set(s)) == 1 for s in steps)
        assert spec.stats.tokens_per_forward > fewest.stats.tokens_per_forward


def test_a_row_that_accepts_everything_needs_fewer_verify_forwards(monkeypatch):
    """A batch where one row is copy-heavy and the other's drafts fail until it stops: with per-row counts
    the copy-heavy row (and so the batch) finishes in fewer verify forwards than with the fewest rule."""
    from hybridlm.cache import Cache
    m = tiny(**LAYOUTS["jamba"])
    prompts = mixed_prompts()[:2]
    plain = run(m, prompts, 30)
    stop = int(plain[1, 8])                     # the random row stops early; the copy-heavy row does not
    assert stop not in plain[0].tolist()
    plain = run(m, prompts, 30, stop=[stop])
    forwards = []
    for per_row in (True, False):
        if not per_row:                         # the fewest rule, forced
            monkeypatch.setattr(Cache, "holes_exact", lambda self: False)
        spec = Speculative("lookup", k=4)
        assert run(m, prompts, 30, spec, stop=[stop]).tolist() == plain.tolist()
        forwards.append(spec.stats.forwards)
    assert forwards[0] < forwards[1]


def test_rollback_per_row_leaves_each_row_as_if_alone():
    """checkpoint, a chunk of 5, rollback keeping [2, 4] (a hole of 2 slots in row 0): each row's state, its
    holes dropped (``Cache.gather``), == a cache that only saw its prompt and its kept tokens."""
    m = tiny(**LAYOUTS["jamba"])
    prompts = [repetitive(9, seed=5), repetitive(6, seed=6)]
    x, mask = left_pad(prompts)
    chunk = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(7))
    c = m.new_cache(2, 20)
    keep = torch.tensor([2, 4])
    with torch.no_grad():
        prefill(m, c, x, mask)
        ck = c.checkpoint(5, trail=True)
        m(chunk, c)
        assert c.rollback(ck, keep).tolist() == [2, 4]
        assert c.pos == 9 + 4 and c.seen.tolist() == [9 + 2, 6 + 4]
        for i, p in enumerate(prompts):
            alone = m.new_cache(1, 20)
            prefill(m, alone, torch.tensor([p]))
            m(chunk[i:i + 1, :int(keep[i])], alone)
            row = type(c).gather([(c, i)], 1)
            assert row.pos == len(p) + int(keep[i])
            a, b = row.snapshot().tensors, alone.snapshot().tensors
            assert a.keys() == b.keys()
            for k in a:
                assert a[k].shape == b[k].shape and (a[k].float() - b[k].float()).abs().max() < 1e-5, k
        ck = c.checkpoint(2)
        m(chunk[:, :2], c)
        with pytest.raises(ValueError, match="different numbers"):
            c.rollback(ck, torch.tensor([0, 1]))                 # no trails recorded
    sliding = tiny(**LAYOUTS["sliding"]).new_cache(1, 8)
    assert c.holes_exact() and not sliding.holes_exact() and not tiny(**LAYOUTS["mamba2"]).new_cache(1, 8).holes_exact()


@pytest.mark.parametrize("rows,most", [(1, 6), (2, 3), (3, 0), (4, 0)])
def test_verify_chunks_of_a_batch_stay_in_the_one_call_step(rows, most, monkeypatch):
    """Where a plain step is one C++ call, drafts per row are capped so the verify chunk (rows x tokens) is one
    too (decode_cpu.PLAN_ROWS = 8): a longer chunk goes layer by layer, slower than plain decoding; under 2
    drafts per row, none. Same output."""
    from hybridlm.kernels import decode_cpu
    m = tiny(**LAYOUTS["jamba"])
    prompts = [repetitive(13 + i, seed=i) for i in range(rows)]
    seen = []
    real = spec_mod.keep_verified

    def spy(model, cache, ck, chunk, counts, copy):
        seen.append(tuple(chunk.shape))
        return real(model, cache, ck, chunk, counts, copy)
    monkeypatch.setattr("hybridlm.engine.keep_verified", spy)
    out = run(m, prompts, 24, Speculative("lookup", k=6))
    assert torch.equal(out, run(m, prompts, 24))
    assert max((l for _, l in seen), default=1) == 1 + most
    assert all(b * l <= decode_cpu.PLAN_ROWS for b, l in seen)


@pytest.mark.parametrize("kind", ["lookup", "draft"])
def test_a_batch_with_no_room_for_drafts_takes_plain_steps_and_its_drafters_follow(kind, monkeypatch):
    """4 rows: no draft fits the one-call verify (2 tokens per row), so every step is a plain one (no
    speculative step, no verify forward), and each drafter is told what went into the target's cache: its
    context is the prompt and every token fed (all but the last), a draft model's cache plus backlog as long."""
    from hybridlm import engine
    m = tiny(**LAYOUTS["jamba"])
    prompts = [repetitive(9 + 2 * i, seed=i) for i in range(4)]
    runs, steps = [], []
    real_run, real_spec = Speculative.run, engine.Batch._speculate

    def spy_run(self, *a, **kw):
        runs.append(real_run(self, *a, **kw))
        return runs[-1]

    def spy_spec(self, *a, **kw):
        steps.append(self.rows)
        return real_spec(self, *a, **kw)
    monkeypatch.setattr(Speculative, "run", spy_run)
    monkeypatch.setattr(engine.Batch, "_speculate", spy_spec)
    spec = drafter(kind, m, 4)
    out = run(m, prompts, 12, spec)
    assert torch.equal(out, run(m, prompts, 12)) and steps == [] and spec.stats.forwards == 0
    (r,) = runs
    for i, p in enumerate(prompts):
        assert r.ctx[i] == p + out[i, :-1].tolist()
        if kind == "draft":
            d = r.drafter
            assert int(d.cache.seen[i]) + len(d.backlog[i]) == len(r.ctx[i])


def test_a_draft_model_drafts_fewer_tokens_as_they_fail_and_k_while_they_pass():
    """Adaptive draft length (SpecRun.k_now): the target as its own draft keeps drafting k per step (all
    accepted); an unrelated model's drafts fail, so the count falls to 0 and the group decodes plainly,
    trying one draft every PAUSE_STEPS steps. Same output either way."""
    from hybridlm.speculative import PAUSE_STEPS
    m = tiny(**LAYOUTS["jamba"])
    prompts = [repetitive(13, seed=1)]
    plain = run(m, prompts, 60)
    same = Speculative("draft", k=4, draft=m)
    assert run(m, prompts, 60, same).tolist() == plain.tolist()
    assert same.stats.accepted == same.stats.drafted and same.stats.tokens_per_forward > 4.5
    other = Speculative("draft", k=4, draft=tiny(seed=7))
    assert run(m, prompts, 60, other).tolist() == plain.tolist()
    # fixed k would draft 4 per step (~240); adaptive: 4 + 3 + 2 + 1, then about one per PAUSE_STEPS + 1 steps
    assert other.stats.drafted <= 10 + 60 // PAUSE_STEPS + 8, other.stats
    assert other.stats.forwards < 20
    fixed = Speculative("draft", k=4, draft=tiny(seed=7), adaptive=False)
    assert run(m, prompts, 60, fixed).tolist() == plain.tolist() and fixed.stats.drafted >= 4 * 50


def test_a_lazily_started_draft_model_reads_its_context_in_slices_to_the_same_state():
    """``Speculative.run(lazy=True)`` (the server's engine): the draft model reads its context only through
    ``SpecRun.fill``, in slices; then it drafts exactly what an eagerly started one drafts."""
    m = tiny(**LAYOUTS["jamba"])
    draft = noisy_copy(m, 0.1)
    ctx = repetitive(40, seed=3)
    spec = Speculative("draft", k=4, draft=draft)
    eager = spec.run(m, [list(ctx)], 16)
    lazy = spec.run(m, [list(ctx)], 16, lazy=True)
    assert eager.ready and not lazy.ready
    reads = []
    while not lazy.ready:
        reads.append(lazy.fill(7))
    assert reads == [7] * 5 + [5] and lazy.fill(7) == 0
    tok, limit = torch.tensor([ctx[-1]]), torch.tensor([4])
    a, b = eager.propose(tok, limit, Sampling(), None, None), lazy.propose(tok, limit, Sampling(), None, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="one row"):
        spec.run(m, [list(ctx), list(ctx)], 16, lazy=True)


def test_a_reply_that_ends_inside_a_one_count_verify_is_not_stored_as_its_state(caplog):
    """Without holes (a Mamba-2 layer: every row keeps the batch's one count), a request that ends inside
    a verify chunk leaves its cache ahead of its reply (``Rows.cache_ahead``): the engine does not try to
    store that state as the reply's (the prefix cache would refuse it: its position count is off, an error
    in the log). The next turn, started from the prefix cache, gives what a fresh engine gives."""
    import threading

    from hybridlm.engine import Engine, Job, Limits
    from hybridlm.prefix_cache import PrefixCache

    class Ids:
        vocab_size = 64

        def decode(self, ids):
            return "".join(f" {i}" for i in ids)

    def serve(engine, jobs):
        ended = threading.Semaphore(0)
        for j in jobs:
            j.emit = lambda e: e[0] in ("end", "error") and ended.release()
        engine.submit(jobs)
        for _ in jobs:
            assert ended.acquire(timeout=60)

    m = tiny(**LAYOUTS["mamba2"])
    store = PrefixCache()
    engine = Engine(m, Ids(), Limits(context=128), store=store)
    engine.start()
    try:
        # the target as its own draft: every draft accepted, so the batch keeps whole chunks; row a stops at
        # its 4th token (a stop token), inside the first verify chunk
        pa = repetitive(13, seed=1)
        free = run(m, [pa], 8)[0].tolist()
        stop = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i])
        a = Job(pa, 12, Sampling(0.0), None, stop_ids=(stop,),
                speculative=Speculative("draft", k=4, draft=m, adaptive=False))
        b = Job(repetitive(17, seed=2), 30, Sampling(0.0), None,
                speculative=Speculative("draft", k=4, draft=m, adaptive=False))
        serve(engine, [a, b])
        assert a.generated == free[:free.index(stop) + 1]
        assert a.rows.cache_ahead                     # the case under test happened
        reply = a.ids + a.generated
        assert store.lookup(reply)[0] < len(reply)    # not stored as the reply's state
        nxt = reply + [5, 6, 7]
        c = Job(nxt, 8, Sampling(0.0), None)
        serve(engine, [c])
    finally:
        engine.stop()
    fresh = Engine(m, Ids(), Limits(context=128), store=None)
    fresh.start()
    try:
        d = Job(nxt, 8, Sampling(0.0), None)
        serve(fresh, [d])
    finally:
        fresh.stop()
    assert c.generated == d.generated
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
