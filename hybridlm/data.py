"""Training data: documents in, packed token sequences out, in a seeded order that resumes exactly.

1. ``Corpus(spec)`` names the documents: ``stdlib`` (the built-in corpus: this Python's standard-library
   sources, available offline everywhere; tests and generated tables left out), a text file, a
   directory, a glob, JSONL or parquet files (one document per row, ``text_field`` picks the column),
   or ``hf:NAME[:CONFIG][@SPLIT]`` (HF ``datasets``, when installed and online).
2. Every document has a stable key (its path relative to the corpus root, ``path#row`` for rows); the
   train/validation split is a hash of that key, so it depends on nothing else: adding a file never
   moves another one across the split.
3. ``tokenize_corpus`` tokenises once into flat token files (``train.bin``, ``val.bin``; documents
   joined with EOS, as GPT-2 training did) cached under a hash of the corpus content and the
   tokenizer, and memory-maps them.
4. ``PackedSequences`` cuts a token stream into windows of ``seq_len + 1`` tokens (inputs, and targets
   shifted by one); ``SampleOrder`` maps the i-th sample of training to a window through a seeded
   per-epoch permutation, so the data position is one integer and resuming needs nothing else.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_CORPUS = "stdlib"
_VERSION = "hybridlm-tokens-v1"          # bump when the token file layout changes
_GLOB_CHARS = set("*?[")


def default_cache_dir() -> Path:
    """``$HYBRIDLM_CACHE``, else ``~/.cache/hybridlm``."""
    return Path(os.environ.get("HYBRIDLM_CACHE") or Path.home() / ".cache" / "hybridlm")


@dataclass(frozen=True)
class Document:
    key: str     # stable name: decides the train/validation split
    text: str


def split_score(key: str) -> float:
    """A document's place in [0, 1): documents below ``val_fraction`` are validation."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64


# ---- document sources --------------------------------------------------------------------------
# Generated codec tables (Tools/unicode/gencodec.py writes this header): tables of numbers, not code.
_GENERATED_CODEC = '""" Python Character Mapping Codec'


def stdlib_files() -> tuple[Path, list[Path]]:
    """The running Python's standard-library ``.py`` sources, without test suites (a third of the
    bytes, mostly boilerplate), site-packages, and ``pydoc_data`` (one 750 KB string of English
    documentation, which alone would be most of the validation split)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"}
    files = sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts[:-1]))
    if not files:
        raise FileNotFoundError(f"no standard-library sources under {root} (this Python ships without them); "
                                f"pass --data PATH to train on your own files")
    return root, files


def _text_file(path: Path) -> str | None:
    """Contents of a text file; None for binary files (a NUL byte or invalid UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonl_rows(path: Path, key: str, field: str) -> Iterator[Document]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); each line of a .jsonl file "
                                 f"must be one JSON object") from None
            if not isinstance(row, dict) or field not in row:
                fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path}:{lineno}: no field {field!r} (found {fields}); "
                                 f"pass --text-field NAME to choose the text field")
            yield Document(f"{key}#{lineno}", str(row[field]))


def _parquet_rows(path: Path, key: str, field: str) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"{path} is a parquet file; reading it needs pyarrow: "
                          f"pip install 'hybridlm[train]'") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path}: no column {field!r} (columns: {names}); pass --text-field NAME")
    row = 0
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield Document(f"{key}#{row}", str(text))
            row += 1


def _file_documents(path: Path, key: str, field: str) -> Iterator[Document]:
    if path.suffix == ".jsonl":
        yield from _jsonl_rows(path, key, field)
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path, key, field)
    else:
        text = _text_file(path)
        if text is not None and text.strip():
            yield Document(key, text)


def _hf_documents(spec: str, field: str) -> Iterator[Document]:
    """``hf:NAME[:CONFIG][@SPLIT]`` through ``datasets.load_dataset`` (downloads; never used by tests)."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"--data {spec} needs the `datasets` package (pip install datasets) and network "
                          f"access to the dataset hub") from None
    name, _, split = spec[3:].partition("@")
    name, _, config = name.partition(":")
    ds = datasets.load_dataset(name, config or None, split=split or "train")
    if field not in ds.column_names:
        raise ValueError(f"dataset {name}: no column {field!r} (columns: {ds.column_names}); "
                         f"pass --text-field NAME")
    for i, row in enumerate(ds):
        if row[field]:
            yield Document(f"{name}#{i}", str(row[field]))


class Corpus:
    """The documents named by ``spec`` and their deterministic train/validation split.

    Iterating reads the sources afresh each time (nothing is held in memory). ``scan()`` reads
    everything once to hash the content (the token cache key) and count the documents."""

    def __init__(self, spec: str = DEFAULT_CORPUS, text_field: str = "text", val_fraction: float = 0.02):
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.spec, self.text_field, self.val_fraction = spec or DEFAULT_CORPUS, text_field, val_fraction
        self._scan: dict | None = None

    def _files(self) -> list[tuple[Path, str]]:
        """(path, key) of every file, sorted; keys are relative to the corpus root."""
        spec = self.spec
        if spec == DEFAULT_CORPUS:
            root, files = stdlib_files()
            return [(f, f.relative_to(root).as_posix()) for f in files]
        p = Path(spec).expanduser()
        if p.is_file():
            return [(p, p.name)]
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file()
                           and not any(part.startswith(".") or part == "__pycache__"
                                       for part in f.relative_to(p).parts))
            if not files:
                raise FileNotFoundError(f"--data {spec}: the directory holds no files")
            return [(f, f.relative_to(p).as_posix()) for f in files]
        if _GLOB_CHARS & set(spec):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise FileNotFoundError(f"--data {spec}: the pattern matches no file")
            # keys relative to the pattern's fixed leading directories
            fixed = []
            for part in p.parts:
                if _GLOB_CHARS & set(part):
                    break
                fixed.append(part)
            base = Path(*fixed) if fixed else Path(".")
            return [(m, m.relative_to(base).as_posix() if m.is_relative_to(base) else m.as_posix())
                    for m in matches]
        raise FileNotFoundError(f"--data {spec}: no such file or directory, and not a glob pattern; "
                                f"use '{DEFAULT_CORPUS}' for the built-in corpus (Python's standard library), "
                                f"a text/JSONL/parquet file, a directory, a glob, or hf:NAME")

    def documents(self) -> Iterator[Document]:
        """Every document, in a fixed order."""
        if self.spec.startswith("hf:"):
            yield from _hf_documents(self.spec, self.text_field)
            return
        for path, key in self._files():
            for doc in _file_documents(path, key, self.text_field):
                if self.spec == DEFAULT_CORPUS and doc.text.startswith(_GENERATED_CODEC):
                    continue
                yield doc

    # ---- the split -------------------------------------------------------------------------------
    def scan(self) -> dict:
        """Read every document once: content digest, document counts, and the split plan.

        The split is ``split_score(key) < val_fraction``. When that leaves validation empty, the
        document with the lowest score goes there instead; a corpus of a single document is split by
        lines (its last ``val_fraction`` of lines are validation)."""
        if self._scan is not None:
            return self._scan
        h = hashlib.sha256(f"{_VERSION}\0{self.spec}\0{self.text_field}\0{self.val_fraction}".encode())
        n = n_val = 0
        lowest = (2.0, None)
        for doc in self.documents():
            h.update(doc.key.encode() + b"\0" + str(len(doc.text)).encode() + b"\0" + doc.text.encode())
            score = split_score(doc.key)
            n += 1
            n_val += score < self.val_fraction
            lowest = min(lowest, (score, doc.key))
        if n == 0:
            raise ValueError(f"--data {self.spec}: no text found (empty or binary files only)")
        force_val = split_lines = None
        if self.val_fraction > 0 and n_val == 0:
            if n == 1:
                split_lines = lowest[1]
            else:
                force_val = lowest[1]
                n_val = 1
        self._scan = {"digest": h.hexdigest(), "documents": n, "val_documents": n_val,
                      "force_val": force_val, "split_lines": split_lines}
        return self._scan

    def split(self, which: str) -> Iterator[str]:
        """Texts of the 'train' or 'val' split."""
        if which not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {which!r}")
        plan = self.scan()
        for doc in self.documents():
            if doc.key == plan["split_lines"]:
                lines = doc.text.splitlines(keepends=True)
                cut = max(1, min(len(lines) - 1, round(len(lines) * (1 - self.val_fraction))))
                part = "".join(lines[:cut] if which == "train" else lines[cut:])
                if part:
                    yield part
                continue
            is_val = doc.key == plan["force_val"] or split_score(doc.key) < self.val_fraction
            if is_val == (which == "val"):
                yield doc.text


# ---- token files -------------------------------------------------------------------------------
@dataclass
class TokenData:
    """Memory-mapped token streams of both splits, and what made them."""
    train: object            # numpy memmap [n_train] (uint16 or uint32)
    val: object              # numpy memmap [n_val]
    meta: dict
    path: Path


def open_tokens(path: Path) -> TokenData:
    """Memory-map a token cache entry written by ``tokenize_corpus``."""
    import numpy as np
    meta = json.loads((path / "meta.json").read_text())
    arrays = {}
    for split in ("train", "val"):
        n = meta["tokens"][split]
        arrays[split] = (np.memmap(path / f"{split}.bin", dtype=meta["dtype"], mode="r", shape=(n,)) if n
                         else np.zeros(0, dtype=meta["dtype"]))
    return TokenData(arrays["train"], arrays["val"], meta, path)


def token_cache_path(corpus: Corpus, tokenizer, cache_dir: str | Path | None = None) -> Path:
    key = hashlib.sha256(f"{corpus.scan()['digest']}\0{tokenizer.fingerprint()}".encode()).hexdigest()[:24]
    return Path(cache_dir or default_cache_dir()) / "tokens" / key


def tokenize_corpus(corpus: Corpus, tokenizer, cache_dir: str | Path | None = None,
                    progress: bool = True, batch_docs: int = 64) -> TokenData:
    """Tokenise both splits once into ``CACHE/tokens/<hash>/{train,val}.bin`` and memory-map them.

    Each document is followed by the tokenizer's EOS. The directory is built under a temporary name
    and renamed into place, so an interrupted run never leaves a half-written cache entry."""
    import numpy as np
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token, which separates documents; "
                         "name one as eos_token in tokenizer_config.json")
    path = token_cache_path(corpus, tokenizer, cache_dir)
    if (path / "meta.json").exists():
        return open_tokens(path)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    plan = corpus.scan()
    counts = {}
    bar = _progress(plan["documents"], "tokenizing", "doc", progress)
    for split in ("train", "val"):
        counts[split] = 0
        with open(tmp / f"{split}.bin", "wb") as f:
            for texts in _batches(corpus.split(split), batch_docs):
                for ids in tokenizer.encode_batch(texts):
                    ids.append(tokenizer.eos_id)
                    np.asarray(ids, dtype=dtype).tofile(f)
                    counts[split] += len(ids)
                bar.update(len(texts))
                bar.set_postfix_str(f"{split} {counts[split]:,} tokens")
    bar.close()
    meta = {"version": _VERSION, "spec": corpus.spec, "text_field": corpus.text_field,
            "val_fraction": corpus.val_fraction, "documents": plan["documents"],
            "val_documents": plan["val_documents"], "tokens": counts, "dtype": np.dtype(dtype).name,
            "tokenizer": tokenizer.fingerprint(), "vocab_size": tokenizer.vocab_size}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    try:
        os.rename(tmp, path)
    except OSError:                       # another process finished the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
    return open_tokens(path)


def _batches(items: Iterator[str], size: int) -> Iterator[list[str]]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _progress(total: int, desc: str, unit: str, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr, dynamic_ncols=True)


# ---- packing and order -------------------------------------------------------------------------
class PackedSequences:
    """Windows of ``seq_len + 1`` tokens at stride ``seq_len``: window i gives inputs
    tokens[i*L : i*L+L] and targets tokens[i*L+1 : i*L+L+1]. Documents run across window edges,
    separated by EOS (the usual packing; no padding, every target counts)."""

    def __init__(self, tokens, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.tokens, self.seq_len = tokens, seq_len
        self.n = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.n

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """indices: window numbers -> (inputs [b, L], targets [b, L]) int64."""
        import numpy as np
        L = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * L:i * L + L + 1], dtype=np.int64) for i in indices])
        t = torch.from_numpy(rows)                                   # [b, L+1]
        return t[:, :-1], t[:, 1:]


class SampleOrder:
    """Sample i of training -> window ``perm_e[i mod n]`` with e = i // n and ``perm_e`` a permutation
    seeded by (seed, e): every window once per epoch, a fresh order each epoch, and the position in
    the data is the single integer i (a checkpoint stores it; resuming recomputes the same order)."""

    def __init__(self, n: int, seed: int):
        if n < 1:
            raise ValueError("no training windows to sample from")
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def __getitem__(self, i: int) -> int:
        epoch, pos = divmod(i, self.n)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return int(self._perm[pos])


def evenly_spaced(n: int, k: int) -> list[int]:
    """k distinct indices spread over range(n) (a fixed validation subset), all of them if k >= n."""
    if k >= n:
        return list(range(n))
    return [(i * n) // k for i in range(k)]
