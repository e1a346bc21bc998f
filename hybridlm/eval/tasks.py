"""Synthetic tasks that separate in-context retrieval from memorisation: MQAR, passkey, induction copy,
few-shot format following.

Every task writes sequences over one partitioned vocabulary (``Vocab``): a few special tokens, then
*keys*, *values* and *filler*, three disjoint id ranges, so a key can never be mistaken for a value or for
noise. A task returns a ``Batch``: ``input_ids`` [b, l] and ``targets`` [b, l], where ``targets`` holds the
answer at the positions that must predict an answer and ``IGNORE`` (-100, cross-entropy's ignore_index)
everywhere else, so both the training loss and the accuracy count answer positions only (Zoology,
Arora et al. 2023, sec. 3: loss on the query positions of MQAR).

Train and eval never share a sequence, by construction: each sequence's *content* (the key-value
assignment, the passkey, the copied string) is hashed into one of ``EVAL_BUCKETS`` buckets; bucket 0 is
eval, the rest train, and the generator of each split rejects the other's content. Seeds then only pick
*which* train (or eval) sequences are drawn. Every answer is unpredictable without the context: keys
get fresh random values in every sequence, passkeys and copied strings are uniformly random.

Glossary: b batch (sequences), l sequence length, N key-value pairs, Q queries, P passkey length.
"""
from __future__ import annotations

import random
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import torch

IGNORE = -100
EVAL_BUCKETS = 8  # one content bucket in 8 is held out for evaluation

# special tokens (ids below ``Vocab.first``)
PAD, BOS, SEP, QUERY, NEEDLE = 0, 1, 2, 3, 4
SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Vocab:
    """Token ids: specials [0, first), keys, values, filler; the three ranges are disjoint."""
    size: int = 256
    n_keys: int = 64
    n_values: int = 64
    first: int = 8

    def __post_init__(self):
        if self.first + self.n_keys + self.n_values >= self.size:
            raise ValueError(f"vocab size {self.size} leaves no filler tokens after {self.first} specials, "
                             f"{self.n_keys} keys and {self.n_values} values; raise size or lower n_keys/n_values")

    @property
    def keys(self) -> range:
        return range(self.first, self.first + self.n_keys)

    @property
    def values(self) -> range:
        return range(self.first + self.n_keys, self.first + self.n_keys + self.n_values)

    @property
    def filler(self) -> range:
        return range(self.first + self.n_keys + self.n_values, self.size)


@dataclass
class Batch:
    input_ids: torch.Tensor   # [b, l] long
    targets: torch.Tensor     # [b, l] long, IGNORE except at answer positions

    @property
    def answer_mask(self) -> torch.Tensor:
        return self.targets != IGNORE


def content_bucket(content: list[int]) -> int:
    """Stable bucket of a sequence's content (crc32, not Python's salted ``hash``)."""
    return zlib.crc32(array("i", content).tobytes()) % EVAL_BUCKETS


def in_split(content: list[int], split: str) -> bool:
    return (content_bucket(content) == 0) == (split == "eval")


def _rng(task: str, split: str, seed: int) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    # a string seed is hashed with sha512 by random.seed: stable across runs and processes
    return random.Random(f"{task}/{split}/{seed}")


class Task:
    """A generator of ``Batch``es. Subclasses implement ``row(rng, split, length)``."""
    name = "task"
    seq_len: int

    def row(self, rng: random.Random, split: str, length: int) -> tuple[list[int], list[int]] | None:
        """One (input ids, targets) pair of ``length`` tokens, or None when the drawn content belongs to
        the other split (the caller draws again)."""
        raise NotImplementedError

    def _row_in_split(self, rng, split, length):
        while True:  # rejection: 1 in EVAL_BUCKETS draws is eval content, the rest train
            row = self.row(rng, split, length)
            if row is not None:
                return row

    def _batch(self, rng: random.Random, n: int, split: str, length: int) -> Batch:
        rows = [self._row_in_split(rng, split, length) for _ in range(n)]
        return Batch(torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows]))

    def batch(self, n: int, seed: int, split: str, length: int | None = None) -> Batch:
        """``n`` sequences of ``length`` tokens (default ``seq_len``) from one seed of one split."""
        return self._batch(_rng(self.name, split, seed), n, split, length or self.seq_len)

    def stream(self, batch_size: int, seed: int, split: str = "train") -> Iterator[Batch]:
        """An endless stream of training batches: one RNG continues across batches (fresh draws, not
        replays), and its first batch is ``batch(batch_size, seed, split)``."""
        rng = _rng(self.name, split, seed)
        while True:
            yield self._batch(rng, batch_size, split, self.seq_len)

    def eval_points(self) -> list[tuple[str, Task, int]]:
        """(metric suffix, task, length) of each evaluation setting: one, with no suffix, by default; a
        task evaluated at several lengths or options returns ``@VALUE`` or ``@OPTION=VALUE`` suffixes."""
        return [("", self, self.seq_len)]

    @torch.no_grad()
    def evaluate(self, model, n: int, seed: int = 0, batch_size: int = 64, device="cpu") -> dict[str, float]:
        """Accuracy on ``n`` held-out sequences per evaluation setting: ``acc`` (answer tokens) and
        ``seq_acc`` (sequences with every answer right), suffixed as ``eval_points`` says."""
        out = {}
        for suffix, task, length in self.eval_points():
            batch = task.batch(n, seed, "eval", length)
            tok_right = tok_total = seq_right = 0
            for i in range(0, n, batch_size):
                x = batch.input_ids[i:i + batch_size].to(device)
                t = batch.targets[i:i + batch_size].to(device)
                m = t != IGNORE
                right = (model(x).argmax(-1) == t) & m                        # [b, l]
                tok_right += int(right.sum())
                tok_total += int(m.sum())
                seq_right += int((right.sum(1) == m.sum(1)).sum())
            out["acc" + suffix] = tok_right / tok_total
            out["seq_acc" + suffix] = seq_right / n
        return out


@dataclass
class MQAR(Task):
    """Multi-query associative recall (Zoology, Arora et al. 2023, sec. 3.1).

    ``BOS k1 v1 ... kN vN`` then, in the rest of the sequence, Q of the N keys in random order, each
    followed by its value, at random positions among filler tokens. The answer positions are the query
    keys: from ``k`` predict the value bound to ``k`` *in this sequence*. Keys are drawn without
    replacement from ``vocab.keys`` and values with replacement from ``vocab.values`` afresh per
    sequence, so no key has a value outside its context.

    ``train_pairs``: train on a mixture, each sequence drawing its N from the list (Zoology trains on a
    mixture of sizes too: the few-pair sequences teach the look-up that the many-pair ones need);
    ``eval_pairs``: evaluate at each N separately (metrics ``acc@pairs=N``), which shows where a
    fixed-size recurrent state runs out of room.
    """
    vocab: Vocab = field(default_factory=Vocab)
    seq_len: int = 64
    num_pairs: int = 8
    num_queries: int | None = None  # None: query every key (Zoology's default)
    train_pairs: list[int] = field(default_factory=list)
    eval_pairs: list[int] = field(default_factory=list)
    name = "mqar"

    def __post_init__(self):
        for n in {self.num_pairs, *self.train_pairs, *self.eval_pairs}:
            q = self.num_queries or n
            if not 1 <= q <= n:
                raise ValueError(f"num_queries must be in [1, num_pairs={n}], got {q}")
            if n > self.vocab.n_keys:
                raise ValueError(f"num_pairs ({n}) exceeds the {self.vocab.n_keys} key tokens; raise vocab n_keys")
            need = 1 + 2 * n + 2 * q
            if self.seq_len < need:
                raise ValueError(f"MQAR with {n} pairs and {q} queries needs seq_len >= {need}, got {self.seq_len}")

    def eval_points(self):
        if not self.eval_pairs:
            return super().eval_points()
        return [(f"@pairs={n}", replace(self, num_pairs=n, train_pairs=[], eval_pairs=[]), self.seq_len)
                for n in self.eval_pairs]

    def row(self, rng, split, length):
        v = self.vocab
        pairs = rng.choice(self.train_pairs) if self.train_pairs and split == "train" else self.num_pairs
        keys = rng.sample(v.keys, pairs)
        vals = [rng.choice(v.values) for _ in keys]
        if not in_split([t for kv in sorted(zip(keys, vals)) for t in kv], split):
            return None
        ids = [BOS] + [t for kv in zip(keys, vals) for t in kv]
        tgt = [IGNORE] * len(ids)
        rest = length - len(ids)
        q = self.num_queries or pairs
        asked = rng.sample(range(pairs), q)
        # place Q two-token queries among rest - 2Q filler tokens: choose which of the
        # (rest - 2Q + Q) slots hold a query (a stars-and-bars draw, uniform over arrangements)
        slots = set(rng.sample(range(rest - q), q))
        qi = 0
        for s in range(rest - q):
            if s in slots:
                k = asked[qi]
                ids += [keys[k], vals[k]]
                tgt += [vals[k], IGNORE]    # at the key, predict its value; the value itself is not scored
                qi += 1
            else:
                ids.append(rng.choice(v.filler))
                tgt.append(IGNORE)
        return ids, tgt


@dataclass
class Passkey(Task):
    """Passkey retrieval (Mohtashami & Jaggi 2023) over random filler: a needle ``NEEDLE p1..pP`` at a
    uniformly random depth, then at the end ``QUERY p1..pP``; the P positions from ``QUERY`` on must
    predict the passkey digits. Trained at ``seq_len``, evaluated at every length in ``eval_at`` (how
    retrieval holds up as the context grows past the training length)."""
    vocab: Vocab = field(default_factory=Vocab)
    seq_len: int = 64
    key_len: int = 4
    digits: int = 10             # passkey symbols: the first ``digits`` value tokens
    eval_at: list[int] = field(default_factory=lambda: [64, 128, 256])
    name = "passkey"

    def __post_init__(self):
        if self.digits > self.vocab.n_values:
            raise ValueError(f"digits ({self.digits}) exceeds the {self.vocab.n_values} value tokens")
        shortest = min([self.seq_len, *self.eval_at])
        if shortest < 2 * self.key_len + 3:
            raise ValueError(f"passkey of {self.key_len} digits needs sequences of at least "
                             f"{2 * self.key_len + 3} tokens, got {shortest}")

    def eval_points(self):
        return [(f"@{n}", self, n) for n in self.eval_at]

    def row(self, rng, split, length):
        v = self.vocab
        key = [v.values[rng.randrange(self.digits)] for _ in range(self.key_len)]
        if not in_split(key, split):
            return None
        n_fill = length - 1 - (1 + self.key_len) - (1 + self.key_len - 1)   # BOS, needle, query + digits
        depth = rng.randrange(n_fill + 1)                                   # filler tokens before the needle
        fill = [rng.choice(v.filler) for _ in range(n_fill)]
        ids = [BOS] + fill[:depth] + [NEEDLE] + key + fill[depth:] + [QUERY] + key[:-1]
        tgt = [IGNORE] * (len(ids) - self.key_len) + key
        return ids, tgt


@dataclass
class InductionCopy(Task):
    """Induction-head copy (Olsson et al. 2022): ``BOS x1..xS SEP x1..xS`` with x uniformly random
    filler tokens; from ``SEP`` on each position predicts the next token of the repeat, which only a
    look-up of the first occurrence can supply (Jamba sec. 6.2 ties in-context learning to induction
    heads). S = (seq_len - 1) // 2; the input stops at x_{S-1} (the repeat's last token is only a
    target), and one PAD fills an even ``seq_len``."""
    vocab: Vocab = field(default_factory=Vocab)
    seq_len: int = 64
    name = "induction"

    def __post_init__(self):
        if self.seq_len < 4:
            raise ValueError(f"induction copy needs seq_len >= 4, got {self.seq_len}")

    def row(self, rng, split, length):
        s = (length - 1) // 2
        x = [rng.choice(self.vocab.filler) for _ in range(s)]
        if not in_split(x, split):
            return None
        pad = length - (2 * s + 1)
        ids = [BOS] + x + [SEP] + x[:-1] + [PAD] * pad
        tgt = [IGNORE] * (s + 1) + x + [IGNORE] * pad
        return ids, tgt


@dataclass
class FormatFollowing(Task):
    """Few-shot format following: the answer format is given only by the in-context examples.

    Each sequence draws a *format*: ``answer_len`` slots, each either a position of the input
    (copy the i-th input token) or a marker token (from the first ``markers`` value tokens). Then
    ``BOS`` and as many examples as fit: ``x1..xI SEP a1..aA SEP`` with the inputs x fresh, distinct random
    filler tokens and a the answer the format makes of them: format (marker 3, x2, x0, marker 1) turns
    ``p q r`` into ``M3 r p M1``. Nothing outside the sequence tells which format it is, so from the second
    example on the answer is determined by the earlier examples (the format) and this example's input
    (the copied tokens); the first example's answer is not scored. Train and eval formats are disjoint
    (a format's bucket decides its split), so eval measures inferring a format never seen in training
    (Jamba sec. 6.2's observation: a pure Mamba model fails to follow the format of in-context
    examples; a hybrid with attention follows it)."""
    vocab: Vocab = field(default_factory=Vocab)
    seq_len: int = 96
    input_len: int = 3
    answer_len: int = 4
    markers: int = 8
    name = "format"

    def __post_init__(self):
        if self.markers > self.vocab.n_values:
            raise ValueError(f"markers ({self.markers}) exceeds the {self.vocab.n_values} value tokens")
        if self.examples < 2:
            raise ValueError(f"format following needs at least 2 examples per sequence: seq_len {self.seq_len} "
                             f"fits {self.examples} of {self.input_len + self.answer_len + 2} tokens; raise seq_len")

    @property
    def examples(self) -> int:
        return (self.seq_len - 1) // (self.input_len + self.answer_len + 2)

    def row(self, rng, split, length):
        v = self.vocab
        # a slot < input_len copies that input position; input_len + j is marker j
        fmt = [rng.randrange(self.input_len + self.markers) for _ in range(self.answer_len)]
        if not in_split(fmt, split):
            return None
        ids, tgt = [BOS], [IGNORE]
        for e in range((length - 1) // (self.input_len + self.answer_len + 2)):
            x = rng.sample(v.filler, self.input_len)     # distinct: the examples show which slot is copied
            ans = [x[s] if s < self.input_len else v.values[s - self.input_len] for s in fmt]
            ids += x + [SEP] + ans + [SEP]
            # the first SEP predicts a1 and a_i predicts a_{i+1}; the inputs and a_A (predicting SEP) unscored
            scored = ans if e > 0 else [IGNORE] * self.answer_len
            tgt += [IGNORE] * self.input_len + scored + [IGNORE] * 2
        pad = length - len(ids)
        return ids + [PAD] * pad, tgt + [IGNORE] * pad


TASKS = {"mqar": MQAR, "passkey": Passkey, "induction": InductionCopy, "format": FormatFollowing}


def make_task(name: str, vocab: Vocab, **options) -> Task:
    """A synthetic task by name with its options (the spec's ``[tasks.NAME]`` table)."""
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; available: {', '.join(TASKS)} (and 'lm')")
    return TASKS[name](vocab=vocab, **options)
