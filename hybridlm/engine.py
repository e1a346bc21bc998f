"""The one generator: rows decoded together in one cache, a step at a time, and the scheduler that serves
requests with them.

``Rows`` is what sampling and stopping need of rows that draw together: one ``generate.Sampling`` with
one generator, the tokens the penalties read, a stop reader per row (``generate.StopCriteria``: stop
tokens and stop strings, found in the decoded text as ``chat_template.TextStream`` finds them), the
tokens generated and the length limit. ``Batch`` holds groups of ``Rows`` in one ``Cache`` and owns the
package's one decode step, ``Batch.step``: feed every row's last token (one ``generate.decode_step``, or
with speculative decoding one verify forward that decides several tokens), then each group samples its
rows and accepts the tokens. ``generate.stream`` (so ``generate`` and ``chat``) runs a batch of one group
to the end; the ``Engine`` (the server's model thread) keeps one batch that requests join and leave.

Batches of one group sample all their rows in one draw ([b, v] -> [b] from one generator), so a seeded
``generate`` call gives what it gave before this module existed; each server request is a group of its
own, with its own generator, so its tokens do not depend on who else is in the batch.

The Engine batches: every step it gives a slice of prefill to the requests that are starting (so a long
prompt does not stall the others) and runs one decode step for all running rows together. Requests join
and leave the batch at any step: rows live in one cache, right-aligned, with the slots before a shorter
row marked invalid, which the model already treats as left padding (see ``generate.left_pad``);
``Cache.gather`` rebuilds that cache when the set of rows changes (``Batch.join`` / ``Batch.keep``).

Speculative decoding (speculative.py): a job with ``speculative`` gets a drafter state for its rows
(``Rows.spec``), which follows them through joins and regathers; each step the speculating groups draft,
one verify forward checks the whole batch, and each row keeps its own count (holes in the cache, dropped
at the next regather), while the other groups take one token as in a plain step.

Prompt-state reuse (``prefix_cache``): each prompt starts from the longest stored prefix state; the
states at message boundaries, at the end of each prompt and after each reply are stored. A client's
prompt states are stored in its own part of the prefix cache (``_ScopedStore``). Each client may hold
``max_client_jobs`` of the queue, and waiting jobs take batch rows in turns between clients
(``Engine._admit``).
"""
from __future__ import annotations

import logging
import secrets
import threading
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from .cache import Cache
from .chat_template import text_decoder
from .generate import Sampling, StopCriteria, decode_step, sample
from .kernels import decode_cpu
from .prefix_cache import PrefillJob, PrefixCache, remember_reply
from .speculative import Speculative, SpecRun, hole_room, keep_verified, plan

log = logging.getLogger("hybridlm.engine")
CAP_DRAFTS = True   # fit speculative verify chunks to the one-call C++ step (Batch._speculate; tests turn it off)


# ---- rows and the decode step ---------------------------------------------------------------------------
class Rows:
    """n rows that sample together: one ``sampling`` and one ``generator`` (None: torch's global one),
    so a step draws all n tokens in one call; and per row its stop reader, its tokens and whether it is
    done (a stop token or string, or ``max_new`` tokens: finish reason "stop" or "length").

    ``prompt`` [n, l] (with ``mask`` [n, l], False at left padding): tokens the repetition penalty counts
    as seen. ``text``: decode each row's tokens and give the text that is safe to send to ``on_text(row,
    delta)`` (the server's replies); without it text is decoded only to find stop strings.
    State read by ``generate.sample``, allocated on the first logits: ``seen`` [n, v] bool (prompt and
    generated tokens; with a repetition penalty), ``counts`` [n, v] (how often each token was generated;
    with presence or frequency penalties); None when unused.

    ``spec`` (speculative.py's ``SpecRun``, None: plain decoding): the group's drafting state, which follows
    its rows as the batch is regathered. ``cache_ahead``: a row finished inside a speculative step whose
    rows had to keep one count (``speculative.plan``), so its cache holds tokens past its reply."""

    def __init__(self, n: int, sampling: Sampling, stop: StopCriteria, max_new: int,
                 generator: torch.Generator | None = None, prompt: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None, text: bool = False,
                 on_text: Callable[[int, str], None] | None = None):
        if max_new < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new}")
        self.n, self.sampling, self.max_new, self.generator = n, sampling, max_new, generator
        self.readers = [stop.reader(text) for _ in range(n)]
        self.on_text = on_text
        self.tokens: list[list[int]] = [[] for _ in range(n)]   # per row: tokens accepted until it finished
        self.done = torch.zeros(n, dtype=torch.bool)
        self.spec = None
        self.cache_ahead = False
        self.seen: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        self._prompt = (prompt, mask)
        self._allocated = False

    @property
    def finished(self) -> bool:
        return bool(self.done.all())

    def finish_reason(self, row: int) -> str | None:
        return self.readers[row].finish_reason

    def remaining(self) -> torch.Tensor:
        """Tokens each row may still be given [n] (0 once finished)."""
        return torch.tensor([0 if d else self.max_new - len(t) for d, t in zip(self.done.tolist(), self.tokens)],
                            dtype=torch.long)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [n, v] -> tokens [n], drawn with every transform of ``sampling`` (``generate.sample``)."""
        self.allocate(logits)
        return sample(logits, self.sampling, self.generator, self.seen, self.counts)

    def accept(self, tokens: torch.Tensor, given: torch.Tensor | None = None) -> torch.Tensor:
        """Record tokens [n] (one per row; with ``given`` [n] bool only in those rows: speculative rows that
        keep different counts); returns them with -1 in rows finished before or not given one."""
        # (without ``given`` every row's penalty state takes its token, finished rows' too, as it always did)
        counted = torch.arange(self.n) if given is None else given.cpu().nonzero()[:, 0]
        given = ~self.done if given is None else given.cpu() & ~self.done
        out = tokens.masked_fill(~given.to(tokens.device), -1)
        for i, (take, t) in enumerate(zip(given.tolist(), tokens.tolist())):
            if not take:
                continue
            self.tokens[i].append(t)
            reader = self.readers[i]
            delta = reader.push(t)
            if reader.finish_reason is None and len(self.tokens[i]) >= self.max_new:
                reader.finish_reason = "length"
                delta += reader.flush()
            if delta and self.on_text is not None:
                self.on_text(i, delta)
            if reader.finish_reason is not None:
                self.done[i] = True
        rows = counted.to(tokens.device)
        if self.seen is not None:
            self.seen[rows, tokens[rows]] = True
        if self.counts is not None:
            self.counts[rows, tokens[rows]] += 1
        return out

    def allocate(self, logits: torch.Tensor):
        """The penalties' state (``seen``, ``counts``) for logits [..., v], once."""
        if self._allocated:
            return
        s, (prompt, mask) = self.sampling, self._prompt
        v, device = logits.shape[-1], logits.device
        if s.repetition_penalty != 1.0:
            self.seen = torch.zeros(self.n, v, dtype=torch.bool, device=device)
            if prompt is not None:
                self.seen.scatter_(1, prompt.to(device), mask.to(device) if mask is not None else True)
        if s.presence_penalty or s.frequency_penalty:
            self.counts = torch.zeros(self.n, v, device=device)
        self._allocated = True


class Batch:
    """Groups of ``Rows`` decoded together in one cache (each group owns consecutive rows, in order):
    ``step`` is the package's one decode step. ``last`` [B]: each row's last token, not yet in the
    cache. ``logits`` [B, v]: what the cache ended on, when the first step samples from them instead of
    decoding (after a prefill). A group with ``Rows.spec`` (speculative.py) speculates: each step it drafts
    tokens, one verify forward of the whole batch checks every group's drafts, and each of its rows keeps
    its own number of tokens (``speculative.plan``); groups without it take one token per step as before.
    A step with no drafts (no room for them: ``_draft_cap``; draft models pausing: ``SpecRun.k_now``) is a plain
    one, whose fed tokens the drafters are told."""

    def __init__(self, model, cache: Cache | None = None, groups: list[Rows] | None = None,
                 logits: torch.Tensor | None = None):
        self.model, self.cache, self.groups = model, cache, list(groups or [])
        self.logits = logits
        self.last: torch.Tensor | None = None
        self._verified = None           # (checkpoint, chunk, counts kept, copy) of the last speculative step

    @property
    def rows(self) -> int:
        return sum(g.n for g in self.groups)

    @torch.no_grad()
    def step(self, failed: Callable[[int, Exception], None] | None = None) -> list[torch.Tensor]:
        """One step of every row: feed the last tokens (or take ``logits``), then each group samples and
        accepts its tokens. Returns what the step decided, a tensor [B] per position (-1 in rows finished
        before it, or given no token there): one, or with speculation up to k + 1 (a row's tokens are its
        entries that are not -1, in order).

        ``failed(group, exception)``: called when a group's sampling or text raises; the other groups go
        on (the caller takes the failed group out). Without it the exception propagates."""
        self._verified = None
        spec = self.logits is None and any(g.spec is not None for g in self.groups)
        drafting = spec and any(g.spec is not None and g.spec.k_now for g in self.groups)
        cap = self._draft_cap() if drafting else 0
        if cap:
            return self._speculate(failed, cap)
        fed = self.last
        logits = self.logits if self.logits is not None else decode_step(self.model, self.cache, fed)
        self.logits = None
        outs, last, o = [], [], 0
        for i, g in enumerate(self.groups):
            part = logits[o:o + g.n]                                   # [n, v]
            o += g.n
            try:
                tokens = g.sample(part)
                outs.append(g.accept(tokens))
            except Exception as e:
                if failed is None:
                    raise
                failed(i, e)
                tokens = torch.zeros(g.n, dtype=torch.long, device=logits.device)
                outs.append(torch.full_like(tokens, -1))
            last.append(tokens)
        self.last = torch.cat(last)
        if spec:                        # no drafts this step: the drafters learn what was fed
            for g, o in zip(self.groups, self._starts()):
                if g.spec is not None:
                    g.spec.commit(fed[o:o + g.n, None], torch.ones(g.n, dtype=torch.long))
        return [torch.cat(outs)]

    def _draft_cap(self) -> int:
        """The most tokens a row may draft this step: the cache's room, and where a plain step of these
        rows is one C++ call, a verify chunk that stays one (kernels/decode_cpu.verify_tokens: rows x tokens
        <= PLAN_ROWS, about 3 plain steps for 7 tokens); a longer chunk goes layer by layer and costs more
        than its tokens save (4 requests at k = 6: 0.73x plain decoding, benchmarks/results/
        engine_speculative.md). Fewer than 2 drafts per row do not pay for the verify (4 rows at k = 1:
        0.89x): then 0, and the step is a plain one."""
        cap = self.cache.max_len - self.cache.pos - 1
        fit = decode_cpu.verify_tokens(self.model, self.cache, self.rows) if CAP_DRAFTS else None
        if fit is not None:
            cap = min(cap, fit - 1 if fit - 1 >= 2 else 0)
        return max(cap, 0)

    def _speculate(self, failed, cap: int) -> list[torch.Tensor]:
        """A speculative step (issue 14): every speculating group drafts for its rows; one verify forward of
        the chunk [B, 1 + L] (a row's last token, its drafts, filler after a shorter draft); each group
        verifies its rows with its own sampling and generator (a group that does not speculate samples its
        one token from the first position, as a plain step does); rows keep their own counts where the
        cache allows it (``speculative.plan``); the rest of the chunk is rolled back."""
        cache, groups, starts = self.cache, self.groups, self._starts()
        free = cache.max_len - cache.pos
        rem = torch.cat([g.remaining() for g in groups])                  # [B]
        active = torch.cat([~g.done for g in groups])
        bad: set[int] = set()

        def guard(i, fn, *args):
            try:
                return fn(*args)
            except Exception as e:
                if failed is None:
                    raise
                failed(i, e)
                bad.add(i)
                return None

        drafts = []
        for i, g in enumerate(groups):
            n, tok = g.n, self.last[starts[i]:starts[i] + g.n]
            out = None
            if g.spec is not None:
                limit = (rem[starts[i]:starts[i] + n] - 1).clamp(0, min(g.spec.k_now, cap))
                out = guard(i, g.spec.propose, tok, limit, g.sampling, g.seen, g.generator, g.counts)
            drafts.append(out or (tok.new_zeros(n, 0), tok.new_zeros(n), None))
        L = max(d.shape[1] for d, _, _ in drafts)
        chunk = torch.zeros(self.rows, 1 + L, dtype=torch.long, device=self.last.device)
        chunk[:, 0] = self.last
        for i, (d, _, _) in enumerate(drafts):
            chunk[starts[i]:starts[i] + groups[i].n, 1:1 + d.shape[1]] = d
        copy = all(g.spec.spec.rollback == "copy" for g in groups if g.spec is not None)
        ck = cache.checkpoint(1 + L, trail=copy) if L else None
        logits = self.model(chunk, cache)                                  # [B, 1 + L, v]

        emitted, want = [], []
        for i, g in enumerate(groups):
            d, lens, q = drafts[i]
            part = logits[starts[i]:starts[i] + g.n, :1 + d.shape[1]]
            g.allocate(part)
            out = None
            if i not in bad:
                out = guard(i, g.sample, part[:, 0]) if g.spec is None else \
                    guard(i, g.spec.verify, part, d, lens, q, g.sampling, g.generator, g.seen, g.counts)
            if out is None:
                e, w = chunk[starts[i]:starts[i] + g.n, :1], torch.ones(g.n, dtype=torch.long)
            elif g.spec is None:
                e, w = out[:, None], torch.ones(g.n, dtype=torch.long)
            else:
                e, w = out[0], out[1].cpu()
            emitted.append(e)
            want.append(w)
        want = torch.cat(want).masked_fill(~active, 0)
        per_row = ck is not None and copy and cache.holes_exact() and \
            all(g.spec.per_row for g in groups if g.spec is not None)
        counts = plan(want, active, free - rem - 1, per_row)

        outs = [[] for _ in groups]
        before = [[len(t) for t in g.tokens] for g in groups]
        for j in range(int(counts.max()) if len(counts) else 0):
            for i, g in enumerate(groups):
                e, c = emitted[i], counts[starts[i]:starts[i] + g.n]
                tokens = e[:, min(j, e.shape[1] - 1)]
                given = c > j if j < e.shape[1] else torch.zeros(g.n, dtype=torch.bool)
                out = guard(i, g.accept, tokens, given) if i not in bad else None
                outs[i].append(out if out is not None else torch.full_like(tokens, -1))
        taken = torch.tensor([len(t) - b for g, bs in zip(groups, before) for t, b in zip(g.tokens, bs)])
        kept = taken if per_row else counts
        last = []
        for i, g in enumerate(groups):
            t, e = taken[starts[i]:starts[i] + g.n], emitted[i]
            rows = torch.arange(g.n, device=e.device)
            prev = self.last[starts[i]:starts[i] + g.n]
            last.append(torch.where(t.to(e.device) > 0, e[rows, (t - 1).clamp(min=0).to(e.device)], prev))
            short = (t < counts[starts[i]:starts[i] + g.n]) & active[starts[i]:starts[i] + g.n]
            if bool(short.any()) and not per_row and ck is not None:
                g.cache_ahead = True
        self.last = torch.cat(last)
        rolled = reran = False
        if ck is not None:
            rolled, reran = keep_verified(self.model, cache, ck, chunk, kept, copy)
            self._verified = (ck, chunk, kept, copy)
        for i, g in enumerate(groups):
            if g.spec is not None and i not in bad:
                st = g.spec.stats
                st.forwards += 1
                st.rollbacks += bool(rolled and (kept[starts[i]:starts[i] + g.n] < 1 + L).any())
                st.reruns += reran
                g.spec.commit(chunk[starts[i]:starts[i] + g.n], kept[starts[i]:starts[i] + g.n])
        return [torch.cat([o[j] for o in outs]) for j in range(len(outs[0]))]

    def settle(self, unconsumed: list[int]):
        """The consumer left ``unconsumed[i]`` of the tokens the steps gave row i (``generate.stream`` closed
        early): after a speculative step the cache keeps only what was taken, as plain decoding leaves it
        (every token taken but the last fed), as far as that step's checkpoint reaches (all of it with
        one row; a row of a batch that ran ahead of the others in earlier steps keeps those tokens)."""
        if self._verified is None or not any(unconsumed):
            return
        ck, chunk, kept, copy = self._verified
        fewer = (kept - torch.tensor(unconsumed)).clamp(min=0)
        if not (copy and self.cache.holes_exact()):
            fewer = torch.full_like(fewer, int(fewer.min()))
        keep_verified(self.model, self.cache, ck, chunk, fewer, copy)
        for g, o in zip(self.groups, self._starts()):
            if g.spec is not None:
                for r in range(g.n):
                    g.spec.stats.kept[r] -= int(kept[o + r] - fewer[o + r])
        self._verified = None

    # ---- rows joining and leaving (the server's engine) -----------------------------------------------
    def join(self, others: list[Batch]):
        """Append the groups of ``others`` (each with its own cache, stepped at least once) to this batch."""
        mine = [self] if self.groups else []
        batches = mine + others
        self._regather([(b.cache, r) for b in batches for r in range(b.rows)],
                       [g for b in batches for g in b.groups])
        self.last = torch.cat([b.last for b in batches])

    def keep(self, groups: list[int]):
        """Shrink the batch to ``groups`` (indices, in order)."""
        starts = self._starts()
        rows = [r for i in groups for r in range(starts[i], starts[i] + self.groups[i].n)]
        self.last = self.last[rows] if rows else None
        self._regather([(self.cache, r) for r in rows], [self.groups[i] for i in groups])

    def row_cache(self, group: int) -> Cache:
        """Group ``group``'s first row as a cache of its own, with a free position (to feed its last token)."""
        if self.cache.batch == 1:
            return self.cache
        return Cache.gather([(self.cache, self._starts()[group])], 1)

    def _starts(self) -> list[int]:
        starts, o = [], 0
        for g in self.groups:
            starts.append(o)
            o += g.n
        return starts

    def _regather(self, parts: list[tuple[Cache, int]], groups: list[Rows]):
        self.groups = groups
        self._verified = None
        if not parts:
            self.cache = None
            return
        # room for every row's remaining tokens, +1 to feed the last one when its state is stored, and for
        # the holes speculating rows may leave (gather drops them at the next regather)
        room = max(int(g.remaining().max()) + 1 for g in groups)
        room += hole_room(sum(g.n for g in groups),
                          max((int(g.remaining().max()) for g in groups if g.spec is not None), default=0))
        self.cache = Cache.gather(parts, room)


# ---- the server's scheduler -----------------------------------------------------------------------------
@dataclass
class Limits:
    context: int                      # prompt + new tokens of one request
    max_new_tokens: int = 2048        # cap on max_tokens
    max_batch: int = 16               # rows decoded together
    max_queue: int = 256              # completions waiting or running; more are refused with 503
    max_body_bytes: int = 4 * 2**20
    prefill_slice: int = 512          # prompt tokens per engine step, shared by the starting requests
    snapshot_every: int = 1024        # also keep prompt state every N tokens of long prompts (0: off)
    max_request_jobs: int = 16        # completions (prompts x n) in one request; more are refused with 400
    max_client_jobs: int = 64         # completions one client may have waiting or running; more get 429
    max_stops: int = 4                # stop strings per request (OpenAI's limit)
    max_stop_chars: int = 256         # characters per stop string
    read_timeout: float = 30.0        # seconds for a request's body to arrive (and its head, see http_protocol)


class Overloaded(Exception):
    pass


class RateLimited(Overloaded):
    """One client holds its share of the queue (``Limits.max_client_jobs``)."""


@dataclass(eq=False)   # a job is itself: compared (``in``, ``remove``) by identity, never field by field
class Job:
    """One completion (one choice) for the engine. ``emit`` is called from the model thread with
    ("text", index, delta), ("end", index, finish_reason, completion_tokens, cached_tokens) or
    ("error", index, message).

    ``client`` identifies who sent it (see ``serve.client_id``): jobs of different clients take turns for
    batch rows, and a client's prompts are stored in and found from its own part of the prefix cache.
    None: an anonymous caller of the engine, with an unscoped prefix cache."""
    ids: list[int]
    max_new: int
    sampling: Sampling
    emit: Callable[[tuple], None]
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    index: int = 0
    boundaries: list[int] = field(default_factory=list)
    # folded into ``sampling`` (which owns every logit transform) when the job starts; kept as fields for
    # callers that build jobs by hand
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    client: int | None = None
    speculative: Speculative | None = None   # speculative.py: drafts verified per step (same output distribution)
    cancelled: bool = False
    # engine state
    reused: int = 0                   # prompt tokens restored from the prefix cache
    prefill: PrefillJob | None = None
    spec: SpecRun | None = None       # its drafter, reading the prompt in slices after the prefill
    rows: Rows | None = None          # its sampling and stop state, from its first token on

    @property
    def generated(self) -> list[int]:
        return self.rows.tokens[0] if self.rows is not None else []


class Engine:
    """Owns the model; serves jobs from one thread with batched decode (see the module docstring).

    A failure is answered where it happens: an exception while prefilling, sampling or decoding the
    text of one job fails that job alone (an "error" event); one in a step of the whole batch (out of
    memory, a bug) fails the rows in the batch, and the queue is served on."""

    def __init__(self, model, tokenizer, limits: Limits, store: PrefixCache | None):
        self.model, self.limits, self.store = model, limits, store
        self.decode = text_decoder(tokenizer)
        vocab_size = getattr(tokenizer, "vocab_size", None)
        # ids the tokenizer cannot decode (a model vocabulary padded past the tokenizer's) are never sampled
        self._vocab_limit = vocab_size if vocab_size and vocab_size < model.config.vocab_size else 0
        self._pending: deque[Job] = deque()
        self._starting: deque[Job] = deque()
        self._joining: list[tuple[Job, Batch]] = []   # prompt done, first token sampled, not in the batch yet
        self._rows: list[Job] = []                    # the jobs of ``_batch.groups``, in order
        self._batch = Batch(model)
        self._admitted: dict[int | None, int] = {}   # client -> serial of its last job given a row
        self._serial = 0
        self._cv = threading.Condition()
        self._stopping = False
        self.busy = False                 # the model thread is working (a step, or storing a reply's state)
        self._thread = threading.Thread(target=self._run, name="hybridlm-model", daemon=True)
        self.steps = 0
        self.max_rows_seen = 0

    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 30.0):
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self._thread.join(timeout)

    def submit(self, jobs: list[Job]):
        """All choices of one HTTP request are admitted together or refused together."""
        with self._cv:
            if self._stopping:
                raise Overloaded("the server is shutting down")
            if self.load() + len(jobs) > self.limits.max_queue:
                raise Overloaded(f"the server is busy ({self.load()} completions queued or running, "
                                 f"limit {self.limits.max_queue}); retry later")
            for client in {j.client for j in jobs}:
                held = sum(j.client == client for j in self._jobs())
                asked = sum(j.client == client for j in jobs)
                if held + asked > self.limits.max_client_jobs:
                    raise RateLimited(f"this client has {held} completions queued or running and asks for {asked} "
                                      f"more; the limit per client is {self.limits.max_client_jobs}; retry when "
                                      f"some have finished")
            self._pending.extend(jobs)
            self._cv.notify()

    def load(self) -> int:
        return len(self._pending) + len(self._starting) + len(self._joining) + len(self._rows)

    def _jobs(self):
        return (*self._pending, *self._starting, *(j for j, _ in self._joining), *self._rows)

    def stats(self) -> dict:
        return {"waiting": len(self._pending), "prefilling": len(self._starting) + len(self._joining),
                "decoding": len(self._rows),
                "busy": self.busy, "steps": self.steps, "max_batch_seen": self.max_rows_seen}

    # ---- loop ---------------------------------------------------------------------------------
    def _run(self):
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not (self._pending or self._starting or self._rows or self._stopping):
                        self.busy = False
                        self._cv.wait()
                    self.busy = True
                    if self._stopping:
                        self._fail_all("the server is shutting down")
                        return
                    self._admit()
                try:
                    self._step()
                except Exception as e:   # a bug outside the per-job and per-batch guards: fail what is in flight
                    log.exception("engine step failed")
                    self._fail([*self._starting, *(j for j, _ in self._joining), *self._rows], e)
                    self._starting.clear()
                    self._clear_batch()

    def _admit(self):
        """Move waiting jobs into free batch rows, taking turns between clients: next is the oldest job of
        the client with the fewest rows, and among those the one served longest ago, so one client's
        many jobs do not keep another's single job waiting (call with the lock held)."""
        active = Counter(j.client for j in (*self._starting, *self._rows))   # (nothing is joining between steps)
        while self._pending and len(self._rows) + len(self._starting) < self.limits.max_batch:
            job = min(self._pending, key=lambda j: (active[j.client], self._admitted.get(j.client, -1)))
            self._pending.remove(job)
            self._starting.append(job)
            active[job.client] += 1
            self._serial += 1
            self._admitted[job.client] = self._serial
        if len(self._admitted) > 2 * self.limits.max_queue:   # forget clients with nothing queued or running
            present = {j.client for j in self._jobs()}
            self._admitted = {c: n for c, n in self._admitted.items() if c in present}

    def _clear_batch(self):
        self._joining, self._rows, self._batch = [], [], Batch(self.model)

    def _fail_all(self, message: str):
        """Answer every job with an error and forget them (call with the lock held)."""
        for job in self._jobs():
            job.emit(("error", job.index, message))
        self._pending.clear()
        self._starting.clear()
        self._clear_batch()

    def _fail(self, jobs: list[Job], e: Exception):
        """Answer ``jobs`` with an error (the caller takes them out of the queues)."""
        message = f"internal error while generating this completion: {type(e).__name__}: {e}"
        for job in jobs:
            job.cancelled = True   # and its state is not stored
            job.emit(("error", job.index, message))

    def _step(self):
        self.steps += 1
        try:
            self._drop_cancelled()
            self._prefill()
            if self._joining:
                joining, self._joining = self._joining, []
                self._batch.join([b for _, b in joining])
                self._rows += [j for j, _ in joining]
                for job, _ in joining:
                    job.prefill = None   # its cache now lives in the batch
            if self._rows:
                self._decode()
        except Exception as e:
            # the batch as a whole failed (out of memory, a bug): no one job to blame, so its rows fail;
            # jobs still waiting or prefilling are served on
            log.exception("batch step failed")
            self._fail([*self._rows, *(j for j, _ in self._joining)], e)
            self._clear_batch()

    def _prefill(self):
        """Give the starting jobs this step's slice of prompt tokens (a speculating job's draft model reads
        its prompt the same way, after the target); a job whose prompt is done takes its first token (the
        step of a batch of its own, from the prompt's logits) and goes to ``_joining``. A job that raises
        fails alone."""
        budget = self.limits.prefill_slice
        while self._starting and budget > 0:
            job = self._starting[0]
            try:
                if job.prefill is None:
                    # +1: room to feed the last token when the reply's state is stored
                    job.prefill = PrefillJob(self.model, job.ids, len(job.ids) + job.max_new + 1, self._store(job),
                                             job.boundaries, self.limits.snapshot_every)
                if not job.prefill.done:
                    budget -= job.prefill.step(budget)
                    if not job.prefill.done:
                        break
                if job.speculative is not None:
                    if job.spec is None:
                        job.spec = job.speculative.run(self.model, [list(job.ids)], job.max_new + 1, lazy=True)
                    while not job.spec.ready and budget > 0:
                        budget -= job.spec.fill(budget)
                    if not job.spec.ready:
                        break
                job.reused = job.prefill.reused
                job.rows = self._rows_of(job)
                alone = Batch(self.model, job.prefill.cache, [job.rows], job.prefill.logits)
                alone.step()
                if job.rows.finished:
                    self._finish(job, alone, 0)
                else:
                    job.rows.spec, job.spec = job.spec, None   # its drafter follows its rows from here on
                    self._joining.append((job, alone))
                self._starting.popleft()   # only now: until it is in _joining, it counts as starting
            except Exception as e:
                log.exception("a completion failed while starting")
                self._starting.popleft()
                job.prefill = job.spec = None
                self._fail([job], e)

    def _rows_of(self, job: Job) -> Rows:
        """The job's sampling (the request's transforms folded in), generator, stop reader and text."""
        s = job.sampling
        job.sampling = s = replace(s, logit_bias={**s.logit_bias, **job.logit_bias},
                                   presence_penalty=job.presence_penalty or s.presence_penalty,
                                   frequency_penalty=job.frequency_penalty or s.frequency_penalty,
                                   vocab_limit=self._vocab_limit or s.vocab_limit)
        seed = s.seed if s.seed is not None else secrets.randbits(63)
        return Rows(1, s, StopCriteria(job.stop_ids, job.stop_strings, self.decode), job.max_new,
                    torch.Generator().manual_seed(seed), prompt=torch.tensor([job.ids]), text=True,
                    on_text=lambda _, delta: job.emit(("text", job.index, delta)))

    def _decode(self):
        """One decode step for every row; a row whose sampling or text raises fails alone."""
        self.max_rows_seen = max(self.max_rows_seen, len(self._rows))
        failed = set()

        def fail(i: int, e: Exception):
            log.exception("a completion failed while decoding", exc_info=e)
            failed.add(i)
            self._fail([self._rows[i]], e)
        self._batch.step(fail)
        keep = []
        for i, job in enumerate(self._rows):
            if i in failed:
                continue
            if job.rows.finished:
                self._finish(job, self._batch, i)
            else:
                keep.append(i)
        if len(keep) < len(self._rows):
            self._keep(keep)

    def _keep(self, keep: list[int]):
        """Shrink the batch to the jobs at ``keep``."""
        self._rows = [self._rows[i] for i in keep]
        self._batch.keep(keep)

    def _drop_cancelled(self):
        with self._cv:   # the event loop appends to _pending
            if any(j.cancelled for j in self._pending):
                self._pending = deque(j for j in self._pending if not j.cancelled)
        if any(j.cancelled for j in self._starting):
            self._starting = deque(j for j in self._starting if not j.cancelled)
        keep = [i for i, j in enumerate(self._rows) if not j.cancelled]
        if len(keep) < len(self._rows):
            self._keep(keep)

    def _store(self, job: Job):
        """The prefix cache as ``job``'s client sees it."""
        if self.store is None or job.client is None:
            return self.store
        return _ScopedStore(self.store, job.client)

    def _finish(self, job: Job, batch: Batch, group: int):
        job.emit(("end", job.index, job.rows.finish_reason(0), len(job.generated), job.reused))
        store = self._store(job)
        # (a row that finished inside a speculative step whose rows kept one count holds tokens past its
        # reply: its state is not the reply's, so it is not stored)
        if store is not None and not job.cancelled and not job.rows.cache_ahead:
            # after the answer is out; the next request is served by this thread, so it finds the state
            try:
                remember_reply(self.model, batch.row_cache(group), job.ids + job.generated, job.generated[-1], store)
            except Exception:   # the answer is out already; only the reuse of its state is lost
                log.exception("storing a reply's state failed")


class _ScopedStore:
    """One client's view of the shared prefix cache. Its keys are the client's token ids shifted past
    every real id by a per-client offset, so a client finds only prefixes it stored itself: a hit on
    another client's prompt would tell it that prompt (through ``cached_tokens``, and through the time to
    its first token). One byte budget and one LRU still serve all clients."""

    def __init__(self, shared: PrefixCache, client: int):
        self.shared = shared
        self.offset = (client + 1) << 32   # token ids are below 2**32

    def lookup(self, tokens):
        return self.shared.lookup([self.offset + t for t in tokens])

    def store(self, tokens, snap):
        return self.shared.store([self.offset + t for t in tokens], snap)
