"""Speculative decoding on hybrids: draft k tokens cheaply, verify them in one forward of the target
(a chunk of k+1 tokens), keep the longest prefix the target agrees with, roll the rest back exactly.

Verification (Leviathan et al. 2023, sec. 2.3; Chen et al. 2023, Alg. 2). Greedy: a drafted token is
kept while it equals the target's argmax; the first disagreement is replaced by the target's token, and
when all k agree the target's next token comes free. Sampled: drafted token d (drawn from the drafter's
q) is kept with probability min(1, p(d) / q(d)); on rejection the token is drawn from
norm(max(0, p - q)), so every emitted token is distributed exactly as the target's p. p and q are the
distributions ``generate.sample`` draws from (``generate.transform``: logit bias, presence, frequency and
repetition penalties, temperature, top-k, top-p), so speculation changes the speed, never the distribution.

Drafters:
    lookup    prompt lookup (no second model): the last n context tokens (n from ``ngrams``, longest
              first) are matched at their latest earlier occurrence, and the k tokens that followed it are
              the draft. Deterministic: q is one-hot on the drafted token.
    draft     a small model with the same vocabulary and tokenizer, with its own cache, drawing its
              tokens from q = its own distribution under the same transforms.

Rollback (issue 14): ``Cache.checkpoint`` keeps the Mamba conv and SSM states (small), the position
counters and the local-attention ring slots the chunk will overwrite; full-attention slots are only
invalidated. Two strategies, both exact (``Speculative.rollback``):
    copy      (default; strategy 2) the verify chunk's Mamba-1 layers also record the SSM state at every
              position and their conv inputs, so keeping m tokens is a copy (conv window rebuilt from
              the inputs): no extra forward.
    rerun     (strategy 1) restore the checkpoint and run the kept tokens again: one more target forward
              of m tokens after every partial acceptance. Also what ``copy`` falls back to where it cannot
              copy (Mamba-2 layers, which record no trail; a draft longer than a sliding window's ring).
Copy is the cheaper: recording costs a write of the [b, k+1, d_in, n] states, the rerun a forward of m
tokens (benchmarks/speculative.py; bench-88m, fp32, one thread, k = 4, a verify plus keeping m = 1..4:
144-156 ms by copy, 185-297 ms by rerun).
The draft model's cache is restored to its checkpoint after every verification and its kept tokens fed
with its next draft's first forward (a chunk instead of one token: no extra forward either).

Batches: every row verifies its own draft in the same chunk, and all rows keep the same number of
tokens per step, the fewest any unfinished row accepted (a row may drop tokens its target agreed with:
they are decided again the next step, with the same distribution, since the decision to stop depends only
on what came before). Rows then never diverge in cache position, so no row's attention window or Mamba
state sees a hole, and padded batch == each prompt alone holds token for token under greedy decoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import Cache
from .generate import GREEDY_BELOW, Sampling, decode_step, left_pad, prefill, transform

METHODS = ("lookup", "draft")


@dataclass
class SpecStats:
    """What the last run of a ``Speculative`` did (counts per row, summed over unfinished rows for drafts)."""
    forwards: int = 0        # target verify forwards (chunks of 1 + drafted tokens)
    rollbacks: int = 0       # verify forwards whose tokens were not all kept
    reruns: int = 0          # target forwards that re-ran kept tokens after a rollback (strategy 1)
    tokens: int = 0          # tokens each row got from the verify forwards
    drafted: int = 0         # drafted tokens verified
    accepted: int = 0        # of those, the ones the target agreed with

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    def summary(self) -> str:
        return (f"speculative: {self.accepted}/{self.drafted} drafted tokens accepted ({self.acceptance:.0%}), "
                f"{self.tokens_per_forward:.2f} tokens per target forward ({self.forwards} verify forwards, "
                f"{self.rollbacks} rolled back, {self.reruns} re-run)")


@dataclass
class Speculative:
    """How to speculate (``Generation.speculative``); ``stats`` holds the counts of the last run.

    method: "lookup" (prompt lookup) or "draft" (``draft``: a small model with the target's vocabulary);
    k: tokens drafted per verify forward (fewer near ``max_new_tokens``); ngrams: lookup's n-gram sizes,
    tried longest first; rollback: "copy" or "rerun" (see the module docstring)."""
    method: str = "lookup"
    k: int = 4
    ngrams: tuple[int, ...] = (3, 2, 1)
    draft: object = None
    rollback: str = "copy"
    stats: SpecStats = field(default_factory=SpecStats)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"speculative k (--draft-k) must be an integer >= 1, got {self.k!r}")
        self.ngrams = tuple(sorted(set(self.ngrams), reverse=True))
        if not self.ngrams or any(not isinstance(n, int) or n < 1 for n in self.ngrams):
            raise ValueError(f"lookup n-gram sizes must be integers >= 1, got {self.ngrams!r}")
        if self.rollback not in ("copy", "rerun"):
            raise ValueError(f"speculative rollback must be 'copy' or 'rerun', got {self.rollback!r}")
        if (self.method == "draft") != (self.draft is not None):
            raise ValueError("a draft model is needed for method 'draft' (and only there)")

    def check(self, model):
        """Refuse a draft model that cannot draft for ``model`` (another vocabulary)."""
        if self.draft is None:
            return
        v, dv = model.config.vocab_size, self.draft.config.vocab_size
        if v != dv:
            raise ValueError(f"the draft model's vocabulary has {dv} tokens, the target's {v}: a draft model "
                             f"must share the target's tokenizer")

    def start(self, model, cache: Cache, input_ids: torch.Tensor, mask: torch.Tensor | None,
              history: list[list[int]] | None, gen) -> "SpecRun":
        """The state of one ``generate.stream`` run (called by it, after the prefill)."""
        self.check(model)
        self.stats = SpecStats()
        b = input_ids.shape[0] if history is None else len(history)
        ctx = [list(h) for h in history] if history is not None else [[] for _ in range(b)]
        if input_ids.shape[1]:
            for i in range(b):
                row = input_ids[i] if mask is None else input_ids[i][mask[i].bool()]
                ctx[i] += row.tolist()
        drafter = Lookup(self.ngrams) if self.method == "lookup" else \
            DraftModel(self.draft, ctx, gen.max_new_tokens + self.k + 1, gen.prefill_chunk)
        return SpecRun(self, model, cache, gen.sampling, ctx, drafter)


def from_flag(flag: str, k: int, target, dtype: str = "auto") -> Speculative | None:
    """The ``--speculative`` / ``--draft-k`` flags of ``hybridlm generate`` and ``chat``: "" (off), "lookup"
    or "draft:PATH" (a checkpoint directory, .gguf file or preset, loaded with ``dtype``)."""
    if not flag:
        return None
    if flag == "lookup":
        return Speculative("lookup", k)
    if flag.startswith("draft:") and flag[len("draft:"):]:
        from .checkpoint import load_model, parse_dtype
        spec = Speculative("draft", k, draft=load_model(flag[len("draft:"):], dtype=parse_dtype(dtype)).eval())
        spec.check(target)
        return spec
    raise ValueError(f"--speculative must be 'lookup' or 'draft:PATH' (a draft model's checkpoint), got {flag!r}")


class SpecRun:
    """One generation's speculation: ``step`` verifies a draft and returns the tokens it decided."""

    def __init__(self, spec: Speculative, model, cache: Cache, sampling: Sampling, ctx: list[list[int]], drafter):
        self.spec, self.model, self.cache, self.s = spec, model, cache, sampling
        self.ctx = ctx                     # per row: the tokens in the target's cache
        self.drafter = drafter
        self.last = None                   # (checkpoint, chunk, kept) of the last verify step

    @torch.no_grad()
    def step(self, tok: torch.Tensor, done: torch.Tensor, seen: torch.Tensor | None, g: torch.Generator | None,
             remaining: int, counts: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``tok`` [b]: the last token emitted (not yet in the cache); ``seen``/``counts`` [b, v]: the
        repetition penalty's tokens and the generated tokens' counts, as ``generate.sample`` takes them.
        Returns 1..k+1 tokens [b] for every row; the cache then holds ``tok`` and all of them but the last."""
        b = tok.shape[0]
        room = self.cache.max_len - self.cache.pos - 1
        k = max(0, min(self.spec.k, remaining - 1, room))
        if k:
            drafts, lens, q = self.drafter.propose(self.ctx, tok, k, self.s, seen, g, counts)
            lens = lens.masked_fill(done.to(lens.device), 0)
        else:
            drafts, lens, q = tok.new_zeros(b, 0), tok.new_zeros(b), None
        L = int(lens.max()) if b else 0
        drafts = drafts[:, :L]
        chunk = torch.cat([tok[:, None], drafts], 1)                     # [b, 1 + L]
        # without drafts the one token is always kept: nothing to roll back
        ck = self.cache.checkpoint(1 + L, trail=self.spec.rollback == "copy") if L else None
        logits = self.model(chunk, self.cache)                          # [b, 1 + L, v]: all of them are needed
        a, x = verify(logits, drafts, lens, None if q is None else q[:, :L], self.s, g, _along(seen, drafts),
                      _along(counts, drafts))
        active = ~done.to(a.device)
        m = int((a[active] + 1).min()) if bool(active.any()) else 1      # every row keeps m tokens
        st = self.spec.stats
        st.forwards += 1
        st.tokens += m
        st.drafted += int(lens[active].sum())
        st.accepted += int(a[active].sum())
        emitted = torch.cat([drafts, x[:, None]], 1)
        emitted[torch.arange(b), a] = x                                 # e_j = d_j while accepted, then x
        emitted = emitted[:, :m]
        self._keep(ck, chunk, m)
        self.last = (ck, chunk, m)
        for i in range(b):
            self.ctx[i] += chunk[i, :m].tolist()
        self.drafter.commit(chunk[:, 1:m])
        return list(emitted.unbind(1))

    def _keep(self, ck, chunk: torch.Tensor, m: int):
        """Keep the first ``m`` tokens of the verified ``chunk`` in the cache: by copy where the checkpoint
        has trails, else by restoring it and running them again."""
        if ck is None or m == self.cache.pos - ck.pos:
            return
        kept = self.cache.rollback(ck, m if self.spec.rollback == "copy" else 0)
        self.spec.stats.rollbacks += 1
        if kept < m:
            self.model(chunk[:, kept:m], self.cache, last_only=True)
            self.spec.stats.reruns += 1

    def settle(self, unconsumed: int):
        """The consumer took all but ``unconsumed`` of the last step's tokens: the cache keeps fewer."""
        if unconsumed and self.last is not None:
            ck, chunk, m = self.last
            self._keep(ck, chunk, m - unconsumed)
            self.spec.stats.tokens -= unconsumed


def _along(seen: torch.Tensor | None, drafts: torch.Tensor) -> torch.Tensor | None:
    """``seen`` (bool) or ``counts`` [b, v] before the chunk -> [b, 1 + L, v]: at position j drafts
    d_1..d_j added (what plain decoding's penalties would have seen had those tokens been emitted)."""
    if seen is None:
        return None
    b, L = drafts.shape
    out = seen[:, None, :].repeat(1, 1 + L, 1)
    for j in range(L):
        idx = drafts[:, j, None, None].expand(b, L - j, 1)
        if out.dtype == torch.bool:
            out[:, j + 1:].scatter_(2, idx, True)
        else:
            out[:, j + 1:].scatter_add_(2, idx, torch.ones(idx.shape, dtype=out.dtype, device=out.device))
    return out


def verify(logits: torch.Tensor, drafts: torch.Tensor, lens: torch.Tensor, q: torch.Tensor | None, s: Sampling,
           g: torch.Generator | None, seen: torch.Tensor | None = None,
           counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's verdict on drafts [b, L] (row i drafted ``lens[i]`` of them; the rest is filler).

    logits [b, 1 + L, v]: the target's logits after the last emitted token and after each drafted one;
    q [b, L, v]: the drafter's distributions (None: a deterministic drafter, one-hot on its tokens);
    seen, counts [b, 1 + L, v]: the penalties' tokens at each position (``generate.transform``).
    Returns (a [b]: drafted tokens accepted, x [b]: the token after them)."""
    b, L = drafts.shape
    z = transform(logits, s, seen, counts)                             # [b, 1 + L, v]
    drafted = torch.arange(L, device=drafts.device)[None, :] < lens[:, None]
    rows = torch.arange(b, device=drafts.device)
    if s.temperature < GREEDY_BELOW:
        target = z.argmax(-1)                                           # [b, 1 + L]
        a = ((drafts == target[:, :L]) & drafted).long().cumprod(1).sum(1)
        return a, target[rows, a]
    p = z.softmax(-1)
    pd = p[:, :L].gather(2, drafts[..., None])[..., 0]                  # p_j(d_j)   [b, L]
    qd = torch.ones_like(pd) if q is None else q.gather(2, drafts[..., None])[..., 0]
    u = torch.rand(b, L, generator=g, device=p.device)
    a = ((u * qd < pd) & drafted).long().cumprod(1).sum(1)               # u < p/q: kept w.p. min(1, p/q)
    dist = p[rows, a]                                                    # [b, v]: the bonus token's p ...
    rejected = a < lens
    if bool(rejected.any()):                                             # ... or the residual at a rejection
        j = a.clamp(max=L - 1)
        qa = torch.zeros_like(dist).scatter_(1, drafts[rows, j, None], 1.0) if q is None else q[rows, j]
        dist = torch.where(rejected[:, None], residual(dist, qa), dist)
    return a, torch.multinomial(dist, 1, generator=g)[:, 0]


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) [b, v]: where the target's mass exceeds the draft's. (All zero only when p <= q
    everywhere, i.e. p == q, where a rejection has probability 0; p is returned then.)"""
    r = (p - q).clamp_min(0)
    total = r.sum(-1, keepdim=True)
    return torch.where(total > 0, r / total.clamp_min(torch.finfo(r.dtype).tiny), p)


class Lookup:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last n-gram."""

    def __init__(self, ngrams: tuple[int, ...]):
        self.ngrams = ngrams

    def propose(self, ctx: list[list[int]], tok: torch.Tensor, k: int, s, seen, g, counts=None):
        b = tok.shape[0]
        drafts = torch.zeros(b, k, dtype=torch.long, device=tok.device)
        lens = torch.zeros(b, dtype=torch.long, device=tok.device)
        for i in range(b):
            d = self.match(ctx[i] + [int(tok[i])], k)
            drafts[i, :len(d)] = torch.tensor(d, dtype=torch.long)
            lens[i] = len(d)
        return drafts, lens, None

    def match(self, seq: list[int], k: int) -> list[int]:
        t = torch.tensor(seq, dtype=torch.long)
        for n in self.ngrams:
            if len(seq) <= n:
                continue
            windows = t[:-1].unfold(0, n, 1)                            # every earlier n-gram [len - n, n]
            hits = (windows == t[-n:]).all(1).nonzero()[:, 0] + n         # where each match's sequel starts
            if len(hits):
                # the latest match with k tokens after it (the latest one may sit just before the end)
                full = hits[hits + k <= len(seq)]
                p = int(full[-1]) if len(full) else int(hits[0])
                return seq[p:p + k]
        return []

    def commit(self, kept: torch.Tensor):
        pass


class DraftModel:
    """A small model drafting token by token from its own cache. The cache holds the context the target's
    holds, except ``backlog`` (kept tokens not yet fed: they go in with the next draft's first forward)."""

    def __init__(self, model, ctx: list[list[int]], room: int, prefill_chunk: int):
        self.model = model
        longest = max((len(c) for c in ctx), default=0)
        p = next(model.parameters())
        self.cache = model.new_cache(len(ctx), longest + room)
        if longest:
            ids, mask = left_pad([c or [0] for c in ctx])
            if any(not c for c in ctx):
                mask[[i for i, c in enumerate(ctx) if not c]] = False
            prefill(model, self.cache, ids.to(p.device), mask.to(p.device), prefill_chunk)
        self.backlog = torch.zeros(len(ctx), 0, dtype=torch.long, device=p.device)
        self.ck = None

    def propose(self, ctx, tok: torch.Tensor, k: int, s: Sampling, seen, g, counts=None):
        b = tok.shape[0]
        chunk = torch.cat([self.backlog, tok[:, None]], 1)
        logits = self.model(chunk, self.cache, last_only=True)[:, -1]
        self.ck = self.cache.checkpoint(k)
        seen = None if seen is None else seen.clone()
        counts = None if counts is None else counts.clone()
        drafts, qs = [], []
        for j in range(k):
            z = transform(logits, s, seen, counts)                      # [b, v]
            if s.temperature < GREEDY_BELOW:
                d = z.argmax(-1)
            else:
                q = z.softmax(-1)
                d = torch.multinomial(q, 1, generator=g)[:, 0]
                qs.append(q)
            drafts.append(d)
            if seen is not None:
                seen[torch.arange(b), d] = True
            if counts is not None:
                counts[torch.arange(b), d] += 1
            if j + 1 < k:
                logits = decode_step(self.model, self.cache, d)
        q = torch.stack(qs, 1) if qs else None
        return torch.stack(drafts, 1), torch.full((b,), k, dtype=torch.long, device=tok.device), q

    def commit(self, kept: torch.Tensor):
        """The target kept the pending token and then ``kept`` [b, m-1]: back to the checkpoint (after the
        pending token), and the kept tokens wait to be fed with the next draft."""
        if self.ck is not None:
            self.cache.rollback(self.ck)
        self.backlog = kept
