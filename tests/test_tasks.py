"""Synthetic task generators: answers right by construction, no train/eval overlap, answers that need
the context, masks on answer positions only, determinism."""
from collections import Counter, defaultdict

import pytest
import torch

from hybridlm.eval.tasks import (BOS, IGNORE, MQAR, NEEDLE, PAD, QUERY, SEP, FormatFollowing, InductionCopy, Passkey,
                                 Vocab,
                                 content_bucket, make_task)

V = Vocab(size=256, n_keys=64, n_values=64)


def _rows(batch):
    return batch.input_ids.tolist(), batch.targets.tolist()


def test_vocab_partition_is_disjoint():
    assert not set(V.keys) & set(V.values)
    assert not (set(V.keys) | set(V.values)) & set(V.filler)
    assert min(V.keys) > max(BOS, SEP, QUERY, NEEDLE) and max(V.filler) == V.size - 1
    with pytest.raises(ValueError, match="no filler"):
        Vocab(size=100, n_keys=46, n_values=46)


def test_mqar_answers_correct_by_construction():
    task = MQAR(vocab=V, seq_len=64, num_pairs=8)
    ids, tgt = _rows(task.batch(200, seed=0, split="train"))
    for x, t in zip(ids, tgt):
        assert len(x) == len(t) == 64 and x[0] == BOS
        kv = x[1:17]
        keys, vals = kv[0::2], kv[1::2]
        assert all(k in V.keys for k in keys) and all(v in V.values for v in vals)
        assert len(set(keys)) == 8                                      # one value per key
        binding = dict(zip(keys, vals))
        answers = [(p, a) for p, a in enumerate(t) if a != IGNORE]
        assert len(answers) == 8 and {x[p] for p, _ in answers} == set(keys)   # every key queried once
        for p, a in answers:
            assert p > 16                                               # only after the key-value block
            assert binding[x[p]] == a == x[p + 1]                       # the bound value, shown next
        for p in range(17, 64):                                         # the rest is filler or query pairs
            if t[p] == IGNORE and (p == 0 or t[p - 1] == IGNORE):
                assert x[p] in V.filler


def test_mqar_queries_need_the_context():
    """A context-free predictor (the most frequent value of each key in training data) is at chance on
    eval, and rebinding the keys in the context changes every answer."""
    task = MQAR(vocab=V, seq_len=64, num_pairs=8)
    counts = defaultdict(Counter)
    ids, tgt = _rows(task.batch(2000, seed=0, split="train"))
    for x, t in zip(ids, tgt):
        for p, a in enumerate(t):
            if a != IGNORE:
                counts[x[p]][a] += 1
    guess = {k: c.most_common(1)[0][0] for k, c in counts.items()}
    ids, tgt = _rows(task.batch(500, seed=0, split="eval"))
    right = total = 0
    for x, t in zip(ids, tgt):
        for p, a in enumerate(t):
            if a != IGNORE:
                right += guess.get(x[p]) == a
                total += 1
    assert right / total < 3 / V.n_values                              # chance is 1/64
    # same keys, values shifted by one: the answers follow the context
    x, t = ids[0], tgt[0]
    shift = {v: V.values[(v - V.values[0] + 1) % V.n_values] for v in V.values}
    x2 = [shift.get(tok, tok) for tok in x]
    t2 = [shift[a] if a != IGNORE else a for a in t]
    assert t2 != t and all(t2[p] == x2[p + 1] for p in range(64) if t2[p] != IGNORE)


@pytest.mark.parametrize("make", [lambda: MQAR(vocab=V, seq_len=64, num_pairs=8),
                                  lambda: Passkey(vocab=V, seq_len=64),
                                  lambda: InductionCopy(vocab=V, seq_len=64)])
def test_train_and_eval_never_share_content(make):
    task = make()
    train = task.batch(1000, seed=1, split="train").input_ids
    evals = task.batch(300, seed=1, split="eval").input_ids

    def content(row):   # what the split is decided on: the assignment, the passkey, the string
        row = row.tolist()
        if isinstance(task, MQAR):
            return tuple(t for kv in sorted(zip(row[1:17:2], row[2:18:2])) for t in kv)
        if isinstance(task, Passkey):
            i = row.index(NEEDLE)
            return tuple(row[i + 1:i + 1 + task.key_len])
        return tuple(row[1:row.index(SEP)])

    tr, ev = {content(r) for r in train}, {content(r) for r in evals}
    assert len(ev) > 250 and not tr & ev
    assert all(content_bucket(list(c)) == 0 for c in ev) and all(content_bucket(list(c)) != 0 for c in tr)
    # a different seed draws different sequences of the same split
    assert not torch.equal(train[:50], task.batch(50, seed=2, split="train").input_ids)


def test_passkey_answers_and_lengths():
    task = Passkey(vocab=V, seq_len=64, key_len=4, eval_at=[64, 128, 256])
    for length in (64, 128, 256):
        ids, tgt = _rows(task.batch(50, seed=0, split="eval", length=length))
        depths = set()
        for x, t in zip(ids, tgt):
            assert len(x) == len(t) == length
            i = x.index(NEEDLE)
            key = x[i + 1:i + 5]
            depths.add(i)
            assert all(k in range(V.values[0], V.values[0] + task.digits) for k in key)
            q = x.index(QUERY)
            assert q == length - 4
            assert [a for a in t if a != IGNORE] == key                  # the passkey, in order
            assert [p for p, a in enumerate(t) if a != IGNORE] == list(range(q, length))
            filler = x[1:i] + x[i + 5:q]
            assert all(f in V.filler for f in filler)                   # the key appears only at the needle
        assert len(depths) > 10                                         # the needle moves
    assert [(s, n) for s, _, n in task.eval_points()] == [("@64", 64), ("@128", 128), ("@256", 256)]


def test_induction_answers_are_the_repeat():
    task = InductionCopy(vocab=V, seq_len=64)
    ids, tgt = _rows(task.batch(50, seed=0, split="train"))
    for x, t in zip(ids, tgt):
        s = x.index(SEP)
        first = x[1:s]
        assert len(first) == 31 and all(f in V.filler for f in first)
        assert [a for a in t if a != IGNORE] == first
        assert [p for p, a in enumerate(t) if a != IGNORE] == list(range(s, s + 31))
        assert x[s + 1:s + 31] == first[:-1]                            # the repeat is the input, shifted


def test_deterministic_and_streams_do_not_repeat():
    task = MQAR(vocab=V, seq_len=64, num_pairs=8)
    a, b = task.batch(8, seed=3, split="train"), task.batch(8, seed=3, split="train")
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    s = task.stream(8, seed=3)
    first, second = next(s), next(s)
    assert torch.equal(first.input_ids, a.input_ids) and not torch.equal(first.input_ids, second.input_ids)


def test_loss_and_accuracy_count_answer_positions_only():
    """A model that is right exactly at the answer positions scores 1.0, whatever it says elsewhere."""
    task = MQAR(vocab=V, seq_len=64, num_pairs=8)

    class Oracle(torch.nn.Module):
        def forward(self, x):
            ref = task.batch(64, seed=0, split="eval")
            assert torch.equal(ref.input_ids[:len(x)], x)
            logits = torch.zeros(*x.shape, V.size)
            logits[..., V.filler[0]] = 1.0                               # wrong everywhere ...
            t = ref.targets[:len(x)]
            m = t != IGNORE
            logits[m] = 0
            logits[m, t[m]] = 1.0                                        # ... except at the answers
            return logits

    out = task.evaluate(Oracle(), n=64, batch_size=64)
    assert out == {"acc": 1.0, "seq_acc": 1.0}
    b = task.batch(4, seed=0, split="eval")
    assert b.answer_mask.sum() == 4 * 8
    ce = torch.nn.functional.cross_entropy(torch.zeros(4 * 64, V.size), b.targets.view(-1), ignore_index=IGNORE)
    assert ce.item() == pytest.approx(torch.log(torch.tensor(float(V.size))).item())


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="needs seq_len >= 33"):
        MQAR(vocab=V, seq_len=32, num_pairs=8)
    with pytest.raises(ValueError, match="num_queries"):
        MQAR(vocab=V, seq_len=64, num_pairs=8, num_queries=9)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        make_task("copy", V)
    with pytest.raises(ValueError, match="split must be"):
        MQAR(vocab=V).batch(1, seed=0, split="test")


def _format_of(task, row):
    """The format a FormatFollowing row was built with, read back from its first example."""
    x, ans = row[1:1 + task.input_len], row[2 + task.input_len:2 + task.input_len + task.answer_len]
    return tuple(x.index(a) if a in x else task.input_len + V.values.index(a) for a in ans)


def test_format_following_answers_follow_the_examples_format():
    task = FormatFollowing(vocab=V, seq_len=80, input_len=3, answer_len=4, markers=8)
    span = task.input_len + task.answer_len + 2
    ids, tgt = _rows(task.batch(300, seed=0, split="train"))
    formats = set()
    for x, t in zip(ids, tgt):
        assert len(x) == len(t) == 80 and x[0] == BOS
        fmt = _format_of(task, x)
        formats.add(fmt)
        n_ex = task.examples
        for e in range(n_ex):
            s = 1 + e * span
            inp, sep, ans, end = x[s:s + 3], x[s + 3], x[s + 4:s + 8], x[s + 8]
            assert all(tok in V.filler for tok in inp) and sep == end == SEP
            # every example's answer is the same format applied to its own input
            assert ans == [inp[f] if f < 3 else V.values[f - 3] for f in fmt]
            scored = [t[p] for p in range(s + 3, s + 7)]                 # SEP predicts a1, a_i predicts a_i+1
            assert scored == (ans if e > 0 else [IGNORE] * 4)           # the first example is not scored
        assert all(tok == PAD for tok in x[1 + n_ex * span:])
        assert sum(a != IGNORE for a in t) == 4 * (n_ex - 1)
    assert len(formats) > 200                                           # a format per sequence, rarely repeated


def test_format_following_needs_the_examples_and_eval_formats_are_unseen():
    task = FormatFollowing(vocab=V, seq_len=80)
    train = Counter(_format_of(task, r) for r in task.batch(2000, seed=0, split="train").input_ids.tolist())
    evals = [_format_of(task, r) for r in task.batch(300, seed=0, split="eval").input_ids.tolist()]
    assert not set(train) & set(evals)                                  # eval formats never seen in training
    assert all(content_bucket(list(f)) == 0 for f in evals)
    # without the examples, the best guess of the format (the most frequent one in training) is right for
    # under 1% of sequences: the answer is decided by the examples, not by what training memorised
    assert train.most_common(1)[0][1] < 20
    # and the examples alone decide it: the same inputs under two formats give two different answers
    a, b = evals[0], next(f for f in evals if f != evals[0])
    x = [V.filler[0], V.filler[1], V.filler[2]]
    assert [x[s] if s < 3 else V.values[s - 3] for s in a] != [x[s] if s < 3 else V.values[s - 3] for s in b]


def test_mqar_trains_on_a_mixture_and_evaluates_per_pair_count():
    task = MQAR(vocab=V, seq_len=128, train_pairs=[2, 8, 24], eval_pairs=[2, 24])
    ids, tgt = _rows(task.batch(300, seed=0, split="train"))
    counts = Counter(sum(a != IGNORE for a in t) for t in tgt)           # every key is queried once
    assert set(counts) == {2, 8, 24} and min(counts.values()) > 60
    points = task.eval_points()
    assert [(s, p.num_pairs) for s, p, _ in points] == [("@pairs=2", 2), ("@pairs=24", 24)]
    for _, p, length in points:
        _, t = _rows(p.batch(20, seed=0, split="eval", length=length))
        assert all(sum(a != IGNORE for a in row) == p.num_pairs for row in t)

    class Oracle(torch.nn.Module):                      # reads the bound value from the context: 100%
        def forward(self, x):
            out = torch.zeros(*x.shape, V.size)
            for b, row in enumerate(x.tolist()):
                n = next(i for i in range(1, len(row), 2) if row[i] not in V.keys)
                binding = dict(zip(row[1:n:2], row[2:n + 1:2]))
                for i, tok in enumerate(row):
                    out[b, i, binding.get(tok, 0)] = 1.0
            return out
    got = task.evaluate(Oracle(), n=16)
    assert set(got) == {"acc@pairs=2", "seq_acc@pairs=2", "acc@pairs=24", "seq_acc@pairs=24"}
    assert all(v == 1.0 for v in got.values())
    with pytest.raises(ValueError, match="exceeds the 64 key tokens"):
        MQAR(vocab=V, seq_len=512, train_pairs=[80])
    with pytest.raises(ValueError, match="needs seq_len >= 97"):
        MQAR(vocab=V, seq_len=64, eval_pairs=[24])
