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
The draft model keeps the drafts the target accepted in its own cache (it fed them while drafting; a
checkpoint before each one lets it return to the last one kept), and feeds the rest (the last draft, the
target's own token) with its next draft's first forward: no extra forward either.

Batches (``engine.Batch``: ``generate.stream``'s rows, the server's requests, each group with its own
sampling, generator and drafter state, ``SpecRun``): one verify forward checks every row's draft (a chunk
[B, 1 + L], shorter drafts padded with filler, groups that do not speculate drafting nothing), each group
verifies its rows, and each row keeps its own count m_i (``plan``). The cache is right-aligned with one
write position: it moves on by the most any row kept, M, and a row that kept fewer is left with a hole of
M - m_i invalid, zeroed slots (``Cache.rollback`` with a count per row), skipped by attention as left
padding is; its Mamba-1 states are copied from the trail at its own m_i. Exact (``Cache.holes_exact``)
with full attention (RoPE positions come from the count of valid tokens) and Mamba-1 layers, rollback
"copy", and drafters whose state follows ragged rows (lookup; a draft model whose own cache takes holes).
Holes use slots: a row's hole may not eat the room it needs to finish (``plan`` lowers M), and
``generate.stream`` / the engine allocate room for as many holes as tokens (the engine drops them when it
regathers the batch). Elsewhere (a sliding-window ring: a hole would take window slots; Mamba-2 layers,
which keep no trail and re-run the kept tokens, one count for all rows; rollback "rerun") every row keeps
the fewest any unfinished row accepted (a row may drop tokens its target agreed with: they are decided
again the next step, with the same distribution, since the decision to stop depends only on what came
before). Either way padded batch == each prompt alone holds token for token under greedy decoding.
``generate.stream`` yields every row's next token per step, so a row ahead of the others waits there.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import Cache
from .generate import DEFAULT_PREFILL_CHUNK, GREEDY_BELOW, Sampling, decode_step, left_pad, prefill, transform

METHODS = ("lookup", "draft")


@dataclass
class SpecStats:
    """What the last run of a ``Speculative`` did: its verify forwards, and per row the tokens it kept."""
    forwards: int = 0        # target verify forwards (chunks of 1 + drafted tokens)
    rollbacks: int = 0       # verify forwards whose tokens were not all kept
    reruns: int = 0          # target forwards that re-ran kept tokens after a rollback (strategy 1)
    kept: list[int] = field(default_factory=list)   # per row: tokens it got from the verify forwards
    drafted: int = 0         # drafted tokens verified (all rows)
    accepted: int = 0        # of those, the ones the target agreed with

    @property
    def tokens(self) -> int:
        """Tokens the verify forwards gave, all rows together."""
        return sum(self.kept)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    def summary(self) -> str:
        rows = f"; per row {self.kept}" if len(self.kept) > 1 else ""
        return (f"speculative: {self.accepted}/{self.drafted} drafted tokens accepted ({self.acceptance:.0%}), "
                f"{self.tokens_per_forward:.2f} tokens per target forward ({self.forwards} verify forwards, "
                f"{self.rollbacks} rolled back, {self.reruns} re-run{rows})")


@dataclass
class Speculative:
    """How to speculate (``Generation.speculative``, a server request's ``speculative``); ``stats`` holds the
    counts of the last run started.

    method: "lookup" (prompt lookup) or "draft" (``draft``: a small model with the target's vocabulary);
    k: tokens drafted per verify forward (fewer near ``max_new_tokens``); ngrams: lookup's n-gram sizes,
    tried longest first; rollback: "copy" or "rerun" (see the module docstring); confidence: a draft model
    stops drafting a row once its most likely token's probability is below this (0: always k drafts);
    adaptive: a draft model's drafts per step follow its acceptance (``SpecRun.k_now``; False: always k)."""
    method: str = "lookup"
    k: int = 4
    ngrams: tuple[int, ...] = (3, 2, 1)
    draft: object = None
    rollback: str = "copy"
    confidence: float = 0.0
    adaptive: bool = True
    stats: SpecStats = field(default_factory=SpecStats)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"speculative k (--draft-k) must be an integer >= 1, got {self.k!r}")
        self.ngrams = tuple(sorted(set(self.ngrams), reverse=True))
        if not self.ngrams or any(not isinstance(n, int) or n < 1 for n in self.ngrams):
            raise ValueError(f"lookup n-gram sizes must be integers >= 1, got {self.ngrams!r}")
        if not 0 <= self.confidence < 1:
            raise ValueError(f"speculative confidence must be in [0, 1), got {self.confidence!r}")
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
        """The drafting state of one ``generate.stream`` run's rows (called by it, after the prefill)."""
        b = input_ids.shape[0] if history is None else len(history)
        ctx = [list(h) for h in history] if history is not None else [[] for _ in range(b)]
        if input_ids.shape[1]:
            for i in range(b):
                row = input_ids[i] if mask is None else input_ids[i][mask[i].bool()]
                ctx[i] += row.tolist()
        return self.run(model, ctx, cache.max_len - cache.pos, gen.prefill_chunk)

    def run(self, model, ctx: list[list[int]], room: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
            lazy: bool = False) -> "SpecRun":
        """The drafting state of a group of rows whose caches hold the tokens ``ctx`` (per row) and have
        ``room`` free positions (a draft model's cache gets as many, plus a draft's). ``lazy`` (one row):
        a draft model reads ``ctx`` only as ``SpecRun.fill`` asks, in slices (the server's engine gives
        it the prompt slices a step has room for); else at once."""
        self.check(model)
        drafter = Lookup(self.ngrams) if self.method == "lookup" else \
            DraftModel(self.draft, ctx, room + self.k + 1, prefill_chunk, self.confidence, lazy)
        run = SpecRun(self, ctx, drafter)
        self.stats = run.stats
        return run


def from_flag(flag: str, k: int, target, dtype: str = "auto") -> Speculative | None:
    """The ``--speculative`` / ``--draft-k`` flags of ``hybridlm generate``, ``chat`` and ``serve``: "" (off),
    "lookup" or "draft:PATH" (a checkpoint directory, .gguf file or preset, loaded with ``dtype``)."""
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


MAX_REQUEST_K = 16
REQUEST_VALUES = ('false, true (the server\'s default: serve --speculative, else "lookup"), "lookup", "draft" (when '
                  'the server has a draft model: serve --speculative draft:PATH), or {"method": "lookup" or "draft", '
                  f'"k": 1..{MAX_REQUEST_K}}}')


def for_request(value, default: Speculative | None) -> Speculative | None:
    """A server request's ``speculative`` field (None: absent) -> how to speculate for it, None: not at all.
    ``default``: the server's (``serve --speculative``, ``--draft-k``), which also holds the draft model.
    Refuses anything else with a ValueError that says what is allowed."""
    if value is None:
        return default
    if value is False or value == "off":
        return None
    method, k = None, default.k if default is not None else Speculative.k
    if value is True:
        return default if default is not None else Speculative("lookup", k)
    if isinstance(value, str):
        method = value
    elif isinstance(value, dict) and set(value) <= {"method", "k"}:
        method, k = value.get("method", "lookup"), value.get("k", k)
    if method not in METHODS or not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_REQUEST_K:
        raise ValueError(f"invalid value for 'speculative': {str(value)[:60]!r}; allowed: {REQUEST_VALUES}")
    if method == "draft":
        if default is None or default.draft is None:
            raise ValueError("'speculative': this server has no draft model (serve --speculative draft:PATH); "
                             f"allowed: {REQUEST_VALUES}")
        return Speculative("draft", k, default.ngrams, default.draft, default.rollback)
    return Speculative("lookup", k, default.ngrams if default is not None else Speculative.ngrams,
                       rollback=default.rollback if default is not None else "copy")


PAUSE_STEPS = 8   # plain steps a draft model sits out after its drafts kept failing (SpecRun.k_now == 0)
MIN_ACCEPTANCE = 0.6   # a draft model accepted less often than this (recent average) pauses: see SpecRun


class SpecRun:
    """One group's speculation (rows that sample together, ``engine.Rows``): per row the tokens in the
    target's cache (``ctx``: what lookup searches) and the drafter's state (a draft model's cache). The
    batch's one verify forward and the rollback are ``engine.Batch``'s; ``propose``, ``verify`` and
    ``commit`` are this group's part of a step.

    ``k_now``: drafts to ask for this step. Lookup always asks for k (its drafts cost nothing to make).
    A draft model's drafts cost a step of its own each and a position of the verify forward, so the count
    follows how they fare (as transformers' assisted generation does): 2 more (up to k) after a step whose
    drafts were all accepted, 1 fewer otherwise; and 0 while the recent acceptance rate (``rate``, an
    average over the last few steps' drafts) is below ``MIN_ACCEPTANCE``, where a verify forward costs more
    than its drafts save (on the 25M model trained here a verify of k + 1 tokens costs about 1 + 0.25 k
    plain steps and a 4.6M draft's step 0.25: benchmarks/results/speculative.md). At 0 the group decodes
    plainly for ``PAUSE_STEPS`` steps, then tries one draft again. The counts depend on the tokens alone,
    so seeded sampling stays reproducible."""

    def __init__(self, spec: Speculative, ctx: list[list[int]], drafter):
        self.spec, self.ctx, self.drafter = spec, ctx, drafter
        self.stats = SpecStats(kept=[0] * len(ctx))
        self.k_now = spec.k
        self._adaptive = spec.method == "draft" and spec.adaptive
        self._idle = 0
        self.rate = 1.0

    @property
    def per_row(self) -> bool:
        """Whether the drafter's state can follow rows that keep different numbers of tokens."""
        return self.drafter.per_row

    @property
    def ready(self) -> bool:
        """Whether the drafter has read its context (``Speculative.run(lazy=True)``: after ``fill``)."""
        return getattr(self.drafter, "todo", 0) == 0

    def fill(self, budget: int) -> int:
        """Read up to ``budget`` more context tokens into a lazily started draft model; how many it read."""
        return self.drafter.fill(budget) if not self.ready else 0

    @torch.no_grad()
    def propose(self, tok: torch.Tensor, limit: torch.Tensor, s: Sampling, seen: torch.Tensor | None,
                g: torch.Generator | None, counts: torch.Tensor | None = None):
        """``tok`` [n]: each row's last token (not yet in the cache); ``limit`` [n]: drafts a row may take (0:
        none, as for finished rows). Returns (drafts [n, L], lens [n], q [n, L, v] or None: see ``verify``)."""
        k = int(limit.max()) if len(limit) else 0
        if k == 0:
            return tok.new_zeros(len(tok), 0), tok.new_zeros(len(tok)), None
        drafts, lens, q = self.drafter.propose(self.ctx, tok, k, s, seen, g, counts)
        lens = torch.minimum(lens, limit.to(lens.device))
        L = int(lens.max())
        return drafts[:, :L], lens, None if q is None else q[:, :L]

    def verify(self, logits: torch.Tensor, drafts: torch.Tensor, lens: torch.Tensor, q: torch.Tensor | None,
               s: Sampling, g: torch.Generator | None, seen: torch.Tensor | None = None,
               counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's verdict (``verify``) on this group's drafts, logits [n, 1 + L, v]. Returns (emitted
        [n, 1 + L]: the drafted tokens while accepted, then the target's; want [n]: how many of them each
        row may take, accepted + 1)."""
        a, x = verify(logits, drafts, lens, q, s, g, _along(seen, drafts), _along(counts, drafts))
        emitted = torch.cat([drafts, x[:, None]], 1)
        emitted[torch.arange(len(x)), a] = x                              # e_j = d_j while accepted, then x
        drafted, accepted = int(lens.sum()), int(a.sum())
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        if self._adaptive and drafted:
            self.rate = 0.7 * self.rate + 0.3 * accepted / drafted
            self.k_now = min(self.spec.k, self.k_now + 2) if accepted == drafted else self.k_now - 1
            if self.rate < MIN_ACCEPTANCE:
                self.k_now = 0
        return emitted, a + 1

    def commit(self, chunk: torch.Tensor, kept: torch.Tensor):
        """The target's cache kept ``chunk[i, :kept[i]]`` of each row's verified chunk [n, 1 + L] (or of the
        tokens a plain step fed, [n, 1])."""
        if self.k_now == 0:
            self._idle += 1
            if self._idle >= PAUSE_STEPS:        # try again: one good step is enough to go on
                self.k_now, self._idle, self.rate = 1, 0, MIN_ACCEPTANCE
        for i, m in enumerate(kept.tolist()):
            self.ctx[i] += chunk[i, :m].tolist()
            self.stats.kept[i] += m
        self.drafter.commit(chunk, kept)


def hole_room(rows: int, remaining: int) -> int:
    """Cache slots a speculating batch of ``rows`` rows needs beyond its ``remaining`` tokens: a row that keeps
    fewer of a verify chunk's tokens than another leaves a hole of unused slots (``Cache.rollback``), at most
    one per token it has still to produce; a single row never does."""
    return remaining if rows > 1 else 0


def plan(want: torch.Tensor, active: torch.Tensor, slack: torch.Tensor, per_row: bool) -> torch.Tensor:
    """Tokens each row of a batch keeps of a verify chunk, [B]. ``want`` [B]: what each row's verdict
    allows (accepted drafts + 1; 1 for a row that drafted nothing); ``active`` [B]: rows not finished before
    the step; ``slack`` [B]: slots a row can lose to a hole and still finish in the cache's room.

    ``per_row`` (``Cache.holes_exact``, trails, drafters that follow ragged rows): each row keeps its own
    count, and a row keeping fewer than the most M leaves a hole of M - m_i invalid slots; M is lowered
    while a hole would eat a row's room. Else every row keeps the fewest any active row wants (a row may
    drop tokens its target agreed with: they are decided again the next step, with the same distribution,
    since the decision to stop depends only on what came before)."""
    if not bool(active.any()):
        return torch.zeros_like(want)
    lo = int(want[active].min())
    if not per_row:
        return torch.full_like(want, lo)
    for top in range(int(want[active].max()), lo, -1):
        if bool(((top - want.clamp(max=top)) <= slack)[active].all()):
            break
    else:
        top = lo
    return torch.where(active, want.clamp(max=top), 0)


@torch.no_grad()
def keep_verified(model, cache: Cache, ck, chunk: torch.Tensor, counts: torch.Tensor,
                  copy: bool) -> tuple[bool, bool]:
    """Keep ``chunk[i, :counts[i]]`` of the verified chunk [B, 1 + L] in the cache: by copy where the
    checkpoint has trails (rows may keep different counts there), else by restoring it and running the
    (one count of) kept tokens again. Returns (rolled back, re-ran)."""
    if bool((counts == cache.pos - ck.pos).all()):
        return False, False
    kept = cache.rollback(ck, counts if copy else torch.zeros_like(counts))
    if bool((kept < counts).any()):
        a, m = int(kept.max()), int(counts.max())
        model(chunk[:, a:m], cache, last_only=True)
        return True, True
    return True, False


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
    per_row = True                      # its state is the context, which follows each row as it is

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

    def commit(self, chunk: torch.Tensor, kept: torch.Tensor):
        pass


class DraftModel:
    """A small model drafting token by token from its own cache. The cache holds the context the target's
    holds, except ``backlog`` (per row, kept tokens not yet fed: they go in with the next draft's first
    forward, a chunk whose rows may differ in length where the draft's cache takes holes).

    Drafts the target accepts stay in the draft's cache: before feeding draft j it takes a checkpoint
    (``cks``), and ``commit`` returns to the one after the last draft every row kept (fed again: only what a
    row kept beyond that, and the last draft, which was never fed). ``confidence``: a row stops drafting
    once the draft model's most likely token has less than this probability (its drafts would mostly be
    rejected, and each costs a draft step and a verify position); drafting ends when every row stopped."""

    def __init__(self, model, ctx: list[list[int]], room: int, prefill_chunk: int, confidence: float = 0.0,
                 lazy: bool = False):
        self.model, self.confidence, self.prefill_chunk = model, confidence, prefill_chunk
        longest = max((len(c) for c in ctx), default=0)
        p = next(model.parameters())
        self.cache = model.new_cache(len(ctx), longest + room)
        self.todo, self._ctx = 0, None              # lazy: context tokens not read yet (``fill``)
        if lazy and longest:
            if len(ctx) != 1:
                raise ValueError("a draft model reads its context lazily for one row only")
            self.todo, self._ctx = longest, torch.tensor([ctx[0]], dtype=torch.long, device=p.device)
        elif longest:
            ids, mask = left_pad([c or [0] for c in ctx])
            if any(not c for c in ctx):
                mask[[i for i, c in enumerate(ctx) if not c]] = False
            prefill(model, self.cache, ids.to(p.device), mask.to(p.device), prefill_chunk)
        self.backlog: list[list[int]] = [[] for _ in ctx]
        self.cks = None                     # checkpoints before drafts 2..k were fed (None: no draft pending)
        # rows keeping different counts leave backlogs of different lengths: fed as one chunk with holes
        self.per_row = self.cache.holes_exact()

    def fill(self, budget: int) -> int:
        """Prefill the next ``budget`` (at least 1) context tokens of a lazy start; returns how many."""
        n = min(max(budget, 1), self.todo)
        done = self._ctx.shape[1] - self.todo
        prefill(self.model, self.cache, self._ctx[:, done:done + n], chunk=self.prefill_chunk)
        self.todo -= n
        if not self.todo:
            self._ctx = None
        return n

    def propose(self, ctx, tok: torch.Tensor, k: int, s: Sampling, seen, g, counts=None):
        b = tok.shape[0]
        seqs = [r + [t] for r, t in zip(self.backlog, tok.tolist())]
        n = torch.tensor([len(r) for r in seqs])
        chunk = torch.zeros(b, int(n.max()), dtype=torch.long)
        for i, r in enumerate(seqs):
            chunk[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        chunk = chunk.to(tok.device)
        if bool((n == n[0]).all()):
            logits = self.model(chunk, self.cache, last_only=True)[:, -1]
        else:                               # each row's own length kept, a hole after the shorter ones
            ck = self.cache.checkpoint(chunk.shape[1], trail=True)
            logits = self.model(chunk, self.cache)[torch.arange(b, device=tok.device), (n - 1).to(tok.device)]
            self.cache.rollback(ck, n)
        self.backlog = [[] for _ in range(b)]
        self.cks = []
        seen = None if seen is None else seen.clone()
        counts = None if counts is None else counts.clone()
        drafts, qs = [], []
        lens = torch.zeros(b, dtype=torch.long, device=tok.device)
        alive = torch.ones(b, dtype=torch.bool, device=tok.device)
        for j in range(k):
            z = transform(logits, s, seen, counts)                      # [b, v]
            q = z.softmax(-1) if s.temperature >= GREEDY_BELOW or self.confidence else None
            if s.temperature < GREEDY_BELOW:
                d = z.argmax(-1)
            else:
                d = torch.multinomial(q, 1, generator=g)[:, 0]
                qs.append(q)
            if self.confidence:
                alive &= q.amax(-1) >= self.confidence
            lens += alive
            drafts.append(d)
            if not bool(alive.any()):
                break
            if seen is not None:
                seen[torch.arange(b), d] = True
            if counts is not None:
                counts[torch.arange(b), d] += 1
            if j + 1 < k:
                self.cks.append(self.cache.checkpoint(k - j))
                logits = decode_step(self.model, self.cache, d)
        q = torch.stack(qs, 1) if qs else None
        return torch.stack(drafts, 1), lens, q

    def commit(self, chunk: torch.Tensor, kept: torch.Tensor):
        """The target kept ``chunk[i, :kept[i]]`` (the pending token, then accepted drafts). The cache holds
        the pending token and the drafts fed so far (all but the last): back to the checkpoint after the
        fewest drafts any row kept, and each row's kept drafts past that wait to be fed with the next draft.
        After a step it did not draft for, the pending token waits too."""
        kept = kept.tolist()
        if self.cks is None:
            self.backlog = [r + chunk[i, :m].tolist() for i, (r, m) in enumerate(zip(self.backlog, kept))]
            return
        fed = len(self.cks)                                 # drafts in the cache
        c = min(fed, min((max(m - 1, 0) for m in kept), default=0))
        if c < fed:
            self.cache.rollback(self.cks[c])
        self.cks = None
        self.backlog = [chunk[i, 1 + c:m].tolist() for i, m in enumerate(kept)]
