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

With a ``SnapshotDir`` the snapshots are also kept on disk (``serve --prefix-cache-dir``), so a
restarted server continues a long conversation without re-reading it. See ``SnapshotDir`` for what
is trusted there.
"""
from __future__ import annotations

import hashlib
import logging
import os
import queue
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import SNAPSHOT_FORMAT, Cache, Snapshot, weights_fingerprint
from .generate import DEFAULT_PREFILL_CHUNK, decode_step, prefill

DEFAULT_BUDGET = 512 * 2**20
log = logging.getLogger("hybridlm.prefix_cache")


class PrefixCache:
    """Snapshots by token prefix; least recently used ones are evicted past ``max_bytes``.

    ``disk``: also keep every stored snapshot in that directory (its own byte budget and LRU); a lookup
    takes a longer prefix from disk when memory has none, and keeps it in memory from then on.

    Thread-safe: the server's model thread stores and looks up while the event loop reads ``stats()``
    (which never waits on the disk).
    """

    def __init__(self, max_bytes: int = DEFAULT_BUDGET, disk: SnapshotDir | None = None):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"prefix cache budget must be a whole number of bytes >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.disk = disk
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
        if self.disk is not None:   # outside the lock: stats() must not wait for a file
            n, loaded = self.disk.lookup(tokens, longer_than=best)
            if loaded is not None:
                best, snap = n, loaded
                with self._lock:
                    self._remember(tokens[:n], loaded)
            elif snap is not None:
                self.disk.touch(tokens[:best])   # hot in memory: keep its file too
        if snap is not None:
            with self._lock:
                self.hits += 1
                self.reused_tokens += best
        return best, snap

    def store(self, tokens: Sequence[int], snap: Snapshot) -> bool:
        """Keep ``snap`` as the state after ``tokens`` (and write it to disk, with a ``disk``); False when
        it was kept nowhere (it alone exceeds the budgets)."""
        key = tuple(tokens)
        if not key:
            raise ValueError("a snapshot needs at least one token as its key")
        if snap.pos != len(key):
            raise ValueError(f"snapshot holds {snap.pos} positions but its key has {len(key)} tokens")
        with self._lock:
            kept = self._remember(key, snap)
        if self.disk is not None:
            kept = self.disk.put(key, snap) or kept
        return kept

    def _remember(self, key: tuple[int, ...], snap: Snapshot) -> bool:
        """The in-memory LRU (call with the lock held)."""
        size = snap.nbytes()
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
        """Forget the in-memory snapshots (files on disk stay)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def close(self):
        """Finish writing the snapshots queued for disk (the server calls it when it stops)."""
        if self.disk is not None:
            self.disk.close()

    def stats(self) -> dict:
        with self._lock:
            out = {"entries": len(self._entries), "bytes": self._bytes, "max_bytes": self.max_bytes,
                   "lookups": self.lookups, "hits": self.hits, "reused_tokens": self.reused_tokens,
                   "evictions": self.evictions}
        if self.disk is not None:
            out["disk"] = self.disk.stats()
        return out


@dataclass
class _File:
    path: Path
    nbytes: int


_SUFFIX = ".safetensors"
_KEY_FIELD, _SUM_FIELD = "prefix_tokens", "checksum"


class SnapshotDir:
    """Prefix-cache snapshots on disk: one safetensors file per prefix, at most ``max_bytes`` in all, the
    least recently used deleted first (use order is the files' modification times, so it survives a
    restart).

    Nothing in the directory is trusted. The index (prefix -> file) is rebuilt from the files' own
    headers at start, never read from a separate index. A file is used only if its header says it was
    written by this exact model (``weights_fingerprint``, a hash of every weight, plus the config
    fingerprint), its name is the hash of the prefix its header holds, and, when it is loaded, every
    tensor passes ``Snapshot.load``'s checks against the model and the checksum of its contents matches
    the one written with it. Any other file (another model's, truncated, corrupted, not a snapshot) is
    skipped with a warning and left where it is; only files this index holds are ever deleted.

    Files are written atomically: a temporary name in the same directory, fsync, rename, fsync of the
    directory, so a crash leaves either the old file, the new one, or a stray temporary (ignored). They
    are written by a thread of their own (``background``), so a server's decode steps do not wait for the
    disk; ``flush`` waits for the queue. Room is made before a file is written, so the directory stays
    within ``max_bytes`` (plus one temporary file while it is written).
    """

    def __init__(self, path, max_bytes: int, model, background: bool = True):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"prefix cache disk budget must be a whole number of bytes >= 0, got {max_bytes!r}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.model = max_bytes, model
        self.weights, self.fingerprint = weights_fingerprint(model), model.fingerprint()
        self._files: OrderedDict[tuple[int, ...], _File] = OrderedDict()   # least recently used first
        self._bytes = 0
        self.loads = self.writes = self.evictions = self.skipped = 0
        self._lock = threading.RLock()    # the index; never held while a file is written
        self._queue: queue.Queue | None = queue.Queue() if background else None
        self._writer: threading.Thread | None = None
        self._scan()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._files)

    def stats(self) -> dict:
        """Counters, read without waiting for the index (another thread may be updating them)."""
        return {"dir": str(self.path), "entries": len(self._files), "bytes": self._bytes,
                "max_bytes": self.max_bytes, "loads": self.loads, "writes": self.writes,
                "evictions": self.evictions, "skipped": self.skipped,
                "queued": self._queue.unfinished_tasks if self._queue is not None else 0}

    # ---- the index ------------------------------------------------------------------------------
    def _scan(self):
        found = []
        for p in sorted(self.path.iterdir()):
            if not p.name.endswith(_SUFFIX) or p.name.startswith("."):   # temporaries start with a dot
                continue
            try:
                key = self._read_key(p)
                st = p.stat()
            except Exception as e:   # whatever a hostile file raises, it is not used
                self._skip(p, e)
                continue
            found.append((st.st_mtime_ns, p.name, key, _File(p, st.st_size)))
        for _, _, key, f in sorted(found):
            self._files[key] = f
            self._bytes += f.nbytes
        self._evict()

    def _read_key(self, p: Path) -> tuple[int, ...]:
        """The prefix a file holds the state after, from its header alone; ValueError unless the header
        is one this model wrote."""
        from .safetensors_io import SafeTensorsFile
        meta = SafeTensorsFile(p).metadata
        if not isinstance(meta, dict) or meta.get("format") != SNAPSHOT_FORMAT:
            raise ValueError("not a hybridlm state snapshot")
        if meta.get("weights") != self.weights or meta.get("fingerprint") != self.fingerprint:
            raise ValueError("written by another model (its weights hash differs from this model's)")
        key = _parse_key(meta.get(_KEY_FIELD))
        if str(len(key)) != meta.get("pos"):
            raise ValueError(f"its prefix has {len(key)} tokens but its state {meta.get('pos')!r} positions")
        if p.name != _file_name(key):
            raise ValueError("its name is not the hash of the prefix it holds")
        if not isinstance(meta.get(_SUM_FIELD), str):
            raise ValueError("it has no checksum")
        return key

    def _skip(self, p: Path, why: Exception):
        self.skipped += 1
        log.warning("prefix cache: skipping %s: %s", p, why)

    def lookup(self, tokens: tuple[int, ...], longer_than: int = 0) -> tuple[int, Snapshot | None]:
        """The longest prefix of ``tokens`` on disk longer than ``longer_than`` tokens, loaded and checked:
        (its length, its snapshot), or (0, None). A file that fails its checks is dropped from the
        index (with a warning) and the next longest is tried."""
        with self._lock:
            while True:
                best = 0
                for key in self._files:
                    n = len(key)
                    if best < n <= len(tokens) and n > longer_than and tokens[n - 1] == key[-1] and tokens[:n] == key:
                        best = n
                if not best:
                    return 0, None
                snap = self._load(tokens[:best])
                if snap is not None:
                    return best, snap

    def _load(self, key: tuple[int, ...]) -> Snapshot | None:
        f = self._files[key]
        try:
            snap = Snapshot.load(f.path, self.model)
            if _parse_key(snap.meta.get(_KEY_FIELD)) != key:
                raise ValueError("its prefix changed since the directory was read")
            if snap.meta.get(_SUM_FIELD) != _checksum(snap.tensors):
                raise ValueError("its contents do not match their checksum (the file is corrupt)")
        except Exception as e:   # a refused file is a miss, never an error of the request
            self._drop(key)
            self._skip(f.path, e)
            return None
        self.loads += 1
        self.touch(key)
        for k in (_KEY_FIELD, _SUM_FIELD):
            snap.meta.pop(k)
        return snap

    def touch(self, key: tuple[int, ...]):
        """Mark ``key`` as just used (here and in its file's modification time)."""
        with self._lock:
            f = self._files.get(key)
            if f is None:
                return
            self._files.move_to_end(key)
            try:
                os.utime(f.path)
            except OSError:
                pass   # gone or read-only: only its place in the eviction order after a restart is lost

    def _drop(self, key: tuple[int, ...]) -> _File:
        f = self._files.pop(key)
        self._bytes -= f.nbytes
        return f

    def _evict(self, room: int = 0):
        """Delete the least recently used files until ``room`` more bytes fit the budget (lock held)."""
        while self._bytes + room > self.max_bytes and self._files:
            f = self._drop(next(iter(self._files)))
            self.evictions += 1
            try:
                f.path.unlink()
            except FileNotFoundError:
                pass

    # ---- writing --------------------------------------------------------------------------------
    def put(self, key: tuple[int, ...], snap: Snapshot) -> bool:
        """Write ``snap`` as the state after ``key`` (queued, with ``background``); False when it will not
        be written (larger than the whole budget, or taken from another model)."""
        if snap.meta.get("fingerprint") != self.fingerprint or snap.meta.get("weights", self.weights) != self.weights:
            log.warning("prefix cache: not writing a snapshot of another model to %s", self.path)
            return False
        if snap.nbytes() > self.max_bytes:
            return False
        if self._queue is None:
            return self._write(key, snap)
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(target=self._drain, name="hybridlm-prefix-writer", daemon=True)
            self._writer.start()
        self._queue.put((key, snap))   # snapshots are never modified once taken: no copy needed
        return True

    def flush(self):
        """Wait until every queued snapshot is written."""
        if self._queue is not None:
            self._queue.join()

    def close(self):
        """Write what is queued and end the writer thread."""
        if self._queue is not None and self._writer is not None and self._writer.is_alive():
            self._queue.put(None)
            self._writer.join()
        self._writer = None

    def _drain(self):
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except Exception:   # _write warns about what it expects; this is a bug, but the writer lives on
                log.exception("prefix cache: writing a snapshot failed")
            finally:
                self._queue.task_done()

    def _write(self, key: tuple[int, ...], snap: Snapshot) -> bool:
        meta = {**snap.meta, "weights": self.weights, _KEY_FIELD: ",".join(map(str, key)),
                _SUM_FIELD: _checksum(snap.tensors)}
        path = self.path / _file_name(key)
        with self._lock:   # room first, so the directory never holds more than the budget (and one temporary)
            old = self._drop(key) if key in self._files else None   # replaced by the rename below
            # the file: tensor bytes, and a header of the metadata plus about 160 bytes per tensor entry
            self._evict(snap.nbytes() + sum(len(k) + len(v) + 8 for k, v in meta.items()) + 160 * len(snap.tensors))
        tmp = self.path / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        from .safetensors_io import save_file
        try:
            save_file({k: t.contiguous() for k, t in snap.tensors.items()}, tmp, metadata=meta)   # fsyncs
            os.replace(tmp, path)
            _fsync_dir(self.path)
            size = path.stat().st_size
        except Exception as e:
            tmp.unlink(missing_ok=True)
            log.warning("prefix cache: could not write %s: %s", path, e)
            with self._lock:
                if old is not None and key not in self._files and path.exists():   # the old file stands
                    self._files[key] = old
                    self._bytes += old.nbytes
                    self._evict()
            return False
        with self._lock:
            if key in self._files:     # written twice meanwhile (the same prefix stored again)
                self._drop(key)
            self._files[key] = _File(path, size)
            self._bytes += size
            self.writes += 1
            self._evict()
            return key in self._files

    def secret(self, name: str = "client.key", nbytes: int = 32) -> bytes:
        """A random key kept in this directory (created on first use, readable by its owner only): what
        must stay the same across restarts for stored states to be found again (the server's key for
        telling clients apart)."""
        p = self.path / name
        try:
            raw = p.read_bytes()
            if len(raw) == nbytes:
                return raw
            log.warning("prefix cache: %s is not a %d-byte key; writing a new one", p, nbytes)
        except FileNotFoundError:
            pass
        raw = secrets.token_bytes(nbytes)
        tmp = self.path / f".{name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, raw)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
        _fsync_dir(self.path)
        return raw


def _file_name(key: tuple[int, ...]) -> str:
    return hashlib.blake2b(",".join(map(str, key)).encode(), digest_size=20).hexdigest() + _SUFFIX


def _parse_key(text) -> tuple[int, ...]:
    if not isinstance(text, str) or not text:
        raise ValueError("its header has no prefix")
    parts = text.split(",")
    if not all(p.isascii() and p.isdigit() and len(p) <= 32 for p in parts):   # scoped ids reach 2**81
        raise ValueError("its prefix is not a list of token ids")
    return tuple(map(int, parts))


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """A hash of every tensor's name, dtype, shape and bytes: what was written is what is read back."""
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(tensors):
        t = tensors[name].detach()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _fsync_dir(path: Path):
    """Make a rename in ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
        self._ids = torch.tensor([self.tokens], dtype=torch.long, device=self.cache.device)
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
    logits = decode_step(model, cache, torch.tensor([last], device=cache.device))
    snap = cache.snapshot(logits, model)
    store.store(tokens, snap)
    return snap
