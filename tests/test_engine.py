"""The one generator (issue 14 part 1): ``engine.Batch.step`` is the decode step of ``generate``/``stream``
(so ``chat``) and of the server's ``Engine``; serve.py keeps no decoding of its own; seeded outputs of
``generate`` are what the loop it replaced gave; the engine and ``generate`` agree token for token."""
import ast
import re
import threading
from pathlib import Path

import pytest
import torch

from hybridlm import HybridLM, preset
from hybridlm.engine import Batch, Engine, Job, Limits, Rows
from hybridlm.generate import (Generation, Sampling, StopCriteria, decode_step, generate, left_pad, prefill, sample,
                               stream)

from .test_one_sampler import V, model  # noqa: F401  (the same tiny model, a module-scoped fixture)

ROOT = Path(__file__).resolve().parents[1] / "hybridlm"


class Ids:
    """A tokenizer for token ids: each id is a word."""
    vocab_size = V

    def decode(self, ids):
        return "".join(f" {i}" for i in ids)


def prompts(*lengths):
    g = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]


def serve_jobs(model, jobs: list[Job], **limits) -> None:
    """Run ``jobs`` through a started ``Engine`` until each has ended."""
    ended = threading.Semaphore(0)
    for j in jobs:
        emit = j.emit
        j.emit = lambda e, emit=emit: (emit(e), e[0] in ("end", "error") and ended.release())
    engine = Engine(model, Ids(), Limits(context=128, **limits), store=None)
    engine.start()
    try:
        engine.submit(jobs)
        for _ in jobs:
            assert ended.acquire(timeout=60)
    finally:
        engine.stop()


def test_generate_and_the_server_engine_run_the_one_step(model, monkeypatch):
    calls = []
    real = Batch.step

    def counted(self, *args, **kw):
        calls.append(self)
        return real(self, *args, **kw)
    monkeypatch.setattr(Batch, "step", counted)
    (p,) = prompts(7)
    generate(model, torch.tensor([p]), max_new_tokens=5)
    assert len(calls) == 5                                    # the first from the prompt's logits, then 4 decodes
    calls.clear()
    generate(model, torch.tensor([p]), max_new_tokens=5, speculative="lookup")
    assert calls                                             # speculation is a branch of the same step
    calls.clear()
    serve_jobs(model, [Job(p, 5, Sampling(0.0), lambda e: None)])
    assert len(calls) == 5
    # and nothing else decodes: with the step replaced, neither caller gets a token
    monkeypatch.setattr(Batch, "step", lambda self, *a, **kw: (_ for _ in ()).throw(RuntimeError("no step")))
    with pytest.raises(RuntimeError, match="no step"):
        generate(model, torch.tensor([p]), max_new_tokens=5)
    events = []
    serve_jobs(model, [Job(p, 5, Sampling(0.0), events.append)])
    assert events[-1][0] == "error" and "no step" in events[-1][2]


def test_chat_runs_the_one_step(tmp_path, monkeypatch):
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    from hybridlm.chat import ChatSession
    from hybridlm.chat_template import ChatFormat
    from tests.test_chat import make_chat_checkpoint
    ckpt = make_chat_checkpoint(tmp_path / "ckpt")
    session = ChatSession(HybridLM.from_pretrained(ckpt), ChatFormat.from_dir(ckpt), max_new_tokens=4,
                          sampling=Sampling(0.0))
    calls = []
    real = Batch.step
    monkeypatch.setattr(Batch, "step", lambda self, *a, **kw: (calls.append(1), real(self, *a, **kw))[1])
    turn = session.reply("hello")
    assert turn.new_tokens >= 1 and len(calls) == turn.new_tokens


def test_serve_has_no_generator_sampler_or_cache_surgery():
    src = (ROOT / "serve.py").read_text()
    for banned in (r"decode_step\(", r"\bsample\(", r"\.gather\(", r"\bprefill\(", r"PrefillJob", r"remember_reply",
                   r"^import torch", r"TextStream\("):
        assert not re.search(banned, src, re.M), banned


def test_one_decode_loop_in_the_package():
    """``generate.sample`` is called by the engine's rows alone; outside the engine, ``decode_step`` only
    feeds one token (a reply's last, to store its state), drafts for speculation or is timed; nothing
    outside cache.py reads the cache's fields."""
    importers = {"sample": set(), "decode_step": set()}
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("generate", "hybridlm.generate"):
                for alias in node.names:
                    if alias.name in importers:
                        importers[alias.name].add(path.name)
    assert importers["sample"] == {"engine.py"}
    # bench.py times decode steps; prefix_cache.py feeds a reply's last token; speculative.py's draft model drafts
    assert importers["decode_step"] == {"engine.py", "bench.py", "prefix_cache.py", "speculative.py"}
    assert not re.search(r"\.(valid|layers)\b|MambaState|KVState|__dict__", (ROOT / "engine.py").read_text())


def old_stream(model, input_ids, gen, mask=None):
    """``generate.stream``'s loop before engine.py (no speculation, no cache given): the reference."""
    b, l = input_ids.shape
    cache = model.new_cache(b, l + gen.max_new_tokens)
    logits = prefill(model, cache, input_ids, mask, gen.prefill_chunk)
    s = gen.sampling
    g = torch.Generator(device=logits.device).manual_seed(s.seed) if s.seed is not None else None
    seen = None
    if s.repetition_penalty != 1.0:
        seen = torch.zeros(b, logits.shape[-1], dtype=torch.bool)
        seen.scatter_(1, input_ids, mask if mask is not None else True)
    counts = torch.zeros(b, logits.shape[-1]) if s.presence_penalty or s.frequency_penalty else None
    done = torch.zeros(b, dtype=torch.bool)
    finished = [gen.stop.watch() for _ in range(b)]
    for step in range(gen.max_new_tokens):
        tok = sample(logits, s, g, seen, counts)
        yield tok.masked_fill(done, -1)
        for i in range(b):
            if not done[i] and finished[i](int(tok[i])):
                done[i] = True
        if bool(done.all()) or step + 1 == gen.max_new_tokens:
            return
        if seen is not None:
            seen[torch.arange(b), tok] = True
        if counts is not None:
            counts[torch.arange(b), tok] += 1
        logits = decode_step(model, cache, tok)


@pytest.mark.parametrize("sampling", [
    Sampling(0.0), Sampling(0.9, seed=3), Sampling(1.2, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=7),
    Sampling(0.8, presence_penalty=0.5, frequency_penalty=0.7, logit_bias={4: 3.0}, seed=11)])
def test_stream_gives_what_the_loop_it_replaced_gave(model, sampling):
    """One generator for the whole batch, drawing every row at once: seeded outputs did not change."""
    ids, mask = left_pad(prompts(3, 9, 6))
    stop = StopCriteria((5, 17), ("5 1",), Ids().decode)
    gen = Generation(14, sampling, stop)
    want = torch.stack(list(old_stream(model, ids, gen, mask)), 1)
    got = torch.stack(list(stream(model, ids, gen, mask)), 1)
    assert torch.equal(got, want)


def test_padded_batch_equals_each_prompt_alone(model):
    ps = prompts(4, 12, 1, 8)
    ids, mask = left_pad(ps)
    batch = generate(model, ids, max_new_tokens=10, attention_mask=mask)[:, ids.shape[1]:]
    for row, p in zip(batch, ps):
        assert row.tolist() == generate(model, torch.tensor([p]), max_new_tokens=10)[0, len(p):].tolist()


def test_the_server_engine_and_generate_agree(model):
    """Greedy, and seeded sampling (each job its own generator): a job gives what ``generate`` gives for
    its prompt alone, whoever shares its batch and whenever it joins (prefill slices of 3 tokens)."""
    ps = prompts(5, 17, 2, 9)
    samplings = [Sampling(0.0), Sampling(0.9, seed=5), Sampling(0.0, repetition_penalty=1.5),
                 Sampling(1.1, top_k=30, presence_penalty=0.4, seed=9)]
    jobs = [Job(p, 12, s, lambda e: None, index=i) for i, (p, s) in enumerate(zip(ps, samplings))]
    serve_jobs(model, jobs, prefill_slice=3, max_batch=3)
    for job, p, s in zip(jobs, ps, samplings):
        alone = [int(t[0]) for t in stream(model, torch.tensor([p]), Generation(12, s))]
        assert job.generated == alone
    greedy = generate(model, torch.tensor([ps[0]]), max_new_tokens=12)[0, len(ps[0]):].tolist()
    assert jobs[0].generated == greedy


def test_stop_strings_end_rows_where_the_server_ends_them(model):
    """One stop reader (``StopCriteria.reader``) for both callers: a stop string ends a job's text and a
    ``stream`` row at the same token."""
    (p,) = prompts(6)
    free = generate(model, torch.tensor([p]), max_new_tokens=12)[0, len(p):].tolist()
    stop_text = Ids().decode(free[3:5])                 # spans the 4th and 5th tokens
    gen = Generation(12, Sampling(0.0), StopCriteria((), (stop_text,), Ids().decode))
    streamed = [int(t[0]) for t in stream(model, torch.tensor([p]), gen)]
    events = []
    job = Job(p, 12, Sampling(0.0), events.append, stop_strings=(stop_text,))
    serve_jobs(model, [job])
    assert job.generated == streamed == free[:len(streamed)] and len(streamed) <= 5
    assert events[-1][:3] == ("end", 0, "stop")
    text = Ids().decode(streamed)
    assert "".join(e[2] for e in events if e[0] == "text") == text[:text.index(stop_text)]


def test_rows_draw_a_group_at_once():
    """``Rows.sample`` draws all its rows in one call of ``generate.sample`` with its one generator."""
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    s = Sampling(0.9, seed=1)
    rows = Rows(3, s, StopCriteria(), 4, torch.Generator().manual_seed(1))
    assert torch.equal(rows.sample(logits), sample(logits, s, torch.Generator().manual_seed(1)))
    out = rows.accept(torch.tensor([1, 2, 3]))
    assert out.tolist() == [1, 2, 3] and rows.tokens == [[1], [2], [3]] and not rows.finished


def test_a_draft_model_reads_a_long_prompt_in_the_engines_slices(model, monkeypatch):
    """A speculating job's draft model reads the prompt as the target does, in ``prefill_slice`` slices
    between decode steps (not all at once when the job starts, which would stall the batch); the reply is
    the plain one."""
    import copy

    from hybridlm.speculative import DraftModel, Speculative
    long, short = prompts(100, 5)
    ref = Job(long, 8, Sampling(0.0), lambda e: None)
    serve_jobs(model, [ref])
    reads, real = [], DraftModel.fill

    def spy(self, budget):
        reads.append(real(self, budget))
        return reads[-1]
    monkeypatch.setattr(DraftModel, "fill", spy)
    spec = Speculative("draft", k=3, draft=copy.deepcopy(model))
    job = Job(long, 8, Sampling(0.0), lambda e: None, speculative=spec)
    other = Job(short, 40, Sampling(0.0), lambda e: None)
    serve_jobs(model, [other, job], prefill_slice=16)
    assert job.generated == ref.generated
    assert sum(reads) == len(long) and max(reads) <= 16 and len(reads) >= len(long) // 16
    assert spec.stats.drafted > 0
