"""Prompt-state reuse: a byte-bounded LRU of inference-state snapshots, keyed by the tokens behind them.

Agents, retrieval and chat send the same long prefix again and again: a system prompt, a document,
the conversation so far. A hybrid's state after a prefix is cheap to keep: Mamba layers hold a
fixed-size state whatever the length, and only the attention layers (one in eight in Jamba) hold K/V
per token, so the state after a 4K-token document of ``bench-88m`` is about 2.6 MB. Restoring it is a
copy; recomputing it is a full prefill.

Why only exact prefixes: a Mamba state cannot be rolled back to an earlier token the way a KV cache
can be truncated, so a snapshot is usable only when every token it has seen starts the new prompt.
Snapshots are therefore taken where a later prompt is likely to continue: the end of each prompt,
message boundaries inside a chat prompt (a shared system prompt or document), the end of each
generated reply (the next turn of the conversation), and optionally every ``every`` tokens of a long
prompt.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch

from .cache import Cache, Snapshot
from .generate import DEFAULT_PREFILL_CHUNK, decode_step, prefill

DEFAULT_BUDGET = 512 * 2**20


class PrefixCache:
    """Snapshots by token prefix; least recently used ones are evicted past ``max_bytes``.

    Thread-safe: the server's model thread stores and looks up while the event loop reads ``stats()``.
    """

    def __init__(self, max_bytes: int = DEFAULT_BUDGET):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"prefix cache budget must be a whole number of bytes >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], Snapshot] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.lookups = self.hits = self.reused_tokens = self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def lookup(self, tokens: Sequence[int]) -> tuple[int, Snapshot | None]:
        """The longest stored prefix of ``tokens``: (its length, its snapshot), or (0, None)."""
        tokens = tuple(tokens)
        with self._lock:
            self.lookups += 1
            best, snap = 0, None
            for key, s in self._entries.items():
                n = len(key)
                # compare the last token first: a cheap filter before the O(n) slice compare
                if best < n <= len(tokens) and tokens[n - 1] == key[-1] and tokens[:n] == key:
                    best, snap = n, s
            if snap is not None:
                self._entries.move_to_end(tokens[:best])
                self.hits += 1
                self.reused_tokens += best
            return best, snap

    def store(self, tokens: Sequence[int], snap: Snapshot) -> bool:
        """Keep ``snap`` as the state after ``tokens``; False when it alone exceeds the budget."""
        key = tuple(tokens)
        if not key:
            raise ValueError("a snapshot needs at least one token as its key")
        if snap.pos != len(key):
            raise ValueError(f"snapshot holds {snap.pos} positions but its key has {len(key)} tokens")
        size = snap.nbytes()
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes()
            if size > self.max_bytes:
                return False
            self._entries[key] = snap
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes()
                self.evictions += 1
            return True

    def clear(self):
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "lookups": self.lookups, "hits": self.hits, "reused_tokens": self.reused_tokens,
                    "evictions": self.evictions}


class PrefillJob:
    """Prefill of one prompt into a new batch-1 cache, resumable in slices so that a server can
    interleave a long prompt with decode steps of other requests.

    Starts from the longest stored prefix; stores snapshots at the end of the prompt, at each of
    ``boundaries`` (token counts, e.g. the end of each chat message) and every ``every`` tokens.
    After ``run()`` (or ``step`` until ``done``): ``cache``, ``logits`` [1, v] the prompt ended on,
    and ``reused`` prompt tokens that were restored rather than computed.
    """

    def __init__(self, model, tokens: Sequence[int], max_len: int, store: PrefixCache | None = None,
                 boundaries: Iterable[int] = (), every: int = 0, chunk: int = DEFAULT_PREFILL_CHUNK):
        n = len(tokens)
        if n == 0:
            raise ValueError("empty prompt: give at least one token")
        if n > max_len:
            raise ValueError(f"prompt of {n} tokens does not fit a cache of {max_len} positions")
        self.model, self.tokens, self.store, self.chunk = model, list(tokens), store, chunk
        self.reused, snap = store.lookup(self.tokens) if store is not None else (0, None)
        self.logits: torch.Tensor | None = None
        if snap is not None:
            self.cache = snap.to_cache(model, max_len)
            self.logits = snap.logits
        else:
            self.cache = model.new_cache(1, max_len)
        cuts = {n}
        if store is not None:
            cuts.update(b for b in boundaries if self.reused < b < n)
            if every > 0:
                cuts.update(range((self.reused // every + 1) * every, n, every))
        self._cuts = sorted(c for c in cuts if c > self.reused)
        self._ids = torch.tensor([self.tokens], dtype=torch.long, device=self.cache.valid.device)
        self.pos = self.reused

    @property
    def done(self) -> bool:
        return not self._cuts

    @torch.no_grad()
    def step(self, budget: int) -> int:
        """Process up to ``budget`` more tokens (at least one); returns how many were processed."""
        done = 0
        while self._cuts and done < max(budget, 1):
            end = min(self._cuts[0], self.pos + max(budget - done, 1))
            self.logits = prefill(self.model, self.cache, self._ids[:, self.pos:end], chunk=self.chunk)
            done += end - self.pos
            self.pos = end
            if end == self._cuts[0]:
                self._cuts.pop(0)
                if self.store is not None:
                    self.store.store(self.tokens[:end], self.cache.snapshot(self.logits, self.model))
        return done

    def run(self) -> PrefillJob:
        while not self.done:
            self.step(1 << 30)
        return self


@torch.no_grad()
def remember_reply(model, cache: Cache, tokens: Sequence[int], last: int, store: PrefixCache) -> Snapshot:
    """After a reply, feed its last sampled token (sampling does not run it through the model) and
    store the state after ``tokens`` (prompt + reply, ending with ``last``): the next turn of the
    conversation starts with exactly these tokens. The cache needs one free position."""
    if tokens[-1] != last:
        raise ValueError("the token list must end with the last sampled token")
    logits = decode_step(model, cache, torch.tensor([last], device=cache.valid.device))
    snap = cache.snapshot(logits, model)
    store.store(tokens, snap)
    return snap
