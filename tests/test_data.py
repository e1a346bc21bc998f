"""Data: sources, the by-document split, the token cache, packing and order; tokenizers round-trip."""
import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridlm.data import (
    Corpus,
    PackedSequences,
    SampleOrder,
    evenly_spaced,
    split_score,
    tokenize_corpus,
)
from hybridlm.tokenizer import load_tokenizer, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def make_corpus(path: Path, n: int = 12) -> Path:
    """A small corpus of real Python: the first ``n`` standard-library modules, copied."""
    path.mkdir(parents=True, exist_ok=True)
    for f in sorted(STDLIB.glob("*.py"))[:n]:
        (path / f.name).write_text(f.read_text())
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer(Corpus(str(corpus)).split("train"), 400, show_progress=False)


def test_split_is_by_document_key_and_stable(tmp_path):
    for i in range(60):
        (tmp_path / f"f{i:02d}.txt").write_text(f"document {i}\n" * 3)
    c = Corpus(str(tmp_path), val_fraction=0.1)
    val = set(c.split("val"))
    assert val and len(val) < 60
    assert val == set(Corpus(str(tmp_path), val_fraction=0.1).split("val"))   # deterministic
    assert val == {f"document {i}\n" * 3 for i in range(60) if split_score(f"f{i:02d}.txt") < 0.1}
    (tmp_path / "new.txt").write_text("a new file\n")                          # moves nothing else
    assert val <= set(Corpus(str(tmp_path), val_fraction=0.1).split("val")) | {"a new file\n"}
    assert not val & set(Corpus(str(tmp_path), val_fraction=0.1).split("train"))


def test_small_corpora_still_get_validation(tmp_path):
    (tmp_path / "one.txt").write_text("".join(f"line {i}\n" for i in range(100)))
    c = Corpus(str(tmp_path / "one.txt"), val_fraction=0.1)
    train, val = "".join(c.split("train")), "".join(c.split("val"))
    assert train + val == (tmp_path / "one.txt").read_text() and val.count("\n") == 10
    (tmp_path / "two.txt").write_text("other\n")
    c = Corpus(str(tmp_path), val_fraction=0.01)                    # no key scores below 1%
    assert c.scan()["val_documents"] == 1 and len(list(c.split("val"))) == 1


def test_stdlib_default_corpus_excludes_tests_and_splits_by_file():
    c = Corpus()
    assert c.spec == "stdlib"
    root = STDLIB
    files = c._files()
    keys = [key for _, key in files]
    assert all(f == root / key for f, key in files)                  # keys are paths relative to the root
    assert "os.py" in keys and "json/decoder.py" in keys
    assert not [k for k in keys if k.startswith(("test/", "pydoc_data/")) or "/tests/" in k or "site-packages" in k]
    val = [k for k in keys if split_score(k) < 0.05]
    assert 0 < len(val) < len(keys) * 0.1


def test_jsonl_and_parquet_rows_with_text_field(tmp_path):
    rows = [{"body": f"row {i}", "id": i} for i in range(5)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    docs = list(Corpus(str(tmp_path / "d.jsonl"), text_field="body").documents())
    assert [d.text for d in docs] == [f"row {i}" for i in range(5)] and docs[0].key == "d.jsonl#1"
    with pytest.raises(ValueError, match=r"d.jsonl:1: no field 'text' \(found \['body', 'id'\]\); pass --text-field"):
        list(Corpus(str(tmp_path / "d.jsonl")).documents())
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": [f"p{i}" for i in range(4)]}), tmp_path / "d.parquet")
    docs = list(Corpus(str(tmp_path / "*.parquet"), text_field="body").documents())
    assert [d.text for d in docs] == ["p0", "p1", "p2", "p3"] and docs[1].key == "d.parquet#1"
    with pytest.raises(ValueError, match="no column 'text'"):
        list(Corpus(str(tmp_path / "d.parquet")).documents())


def test_bad_data_paths_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="use 'stdlib' for the built-in corpus"):
        Corpus(str(tmp_path / "missing")).scan()
    with pytest.raises(FileNotFoundError, match="matches no file"):
        Corpus(str(tmp_path / "*.nothing")).scan()
    (tmp_path / "bin.dat").write_bytes(b"\0\1\2")
    with pytest.raises(ValueError, match="no text found"):
        Corpus(str(tmp_path / "bin.dat")).scan()


def test_packing_windows_and_targets():
    tokens = np.arange(100, dtype=np.uint16)
    p = PackedSequences(tokens, 8)
    assert len(p) == 12                                              # (100 - 1) // 8
    x, y = p.batch([0, 11])
    assert x.dtype == torch.int64 and x.shape == y.shape == (2, 8)
    assert x[0].tolist() == list(range(8)) and y[0].tolist() == list(range(1, 9))
    assert x[1].tolist() == list(range(88, 96)) and y[1].tolist() == list(range(89, 97))


def test_sample_order_is_seeded_per_epoch_and_resumable():
    a, b = SampleOrder(50, seed=3), SampleOrder(50, seed=3)
    first = [a[i] for i in range(100)]
    assert sorted(first[:50]) == list(range(50)) and sorted(first[50:]) == list(range(50))
    assert first[:50] != first[50:]                                 # a new order each epoch
    assert [b[i] for i in range(70, 100)] == first[70:]             # resuming at sample 70: same stream
    assert [SampleOrder(50, seed=4)[i] for i in range(50)] != first[:50]
    assert evenly_spaced(10, 4) == [0, 2, 5, 7] and evenly_spaced(3, 8) == [0, 1, 2]


def test_token_cache_is_reused_and_keyed_by_content(corpus, tokenizer, tmp_path):
    c = Corpus(str(corpus))
    first = tokenize_corpus(c, tokenizer, tmp_path, progress=False)
    assert first.meta["tokens"]["train"] == len(first.train) > 1000 and len(first.val) > 0
    assert first.train[-1] == tokenizer.eos_id and first.meta["dtype"] == "uint16"
    text = "".join(tokenizer.decode(first.val.tolist()).split("<|eos|>"))
    assert text == "".join(c.split("val"))                           # tokens decode back to the split
    stamp = os.stat(first.path / "train.bin").st_mtime_ns
    again = tokenize_corpus(Corpus(str(corpus)), tokenizer, tmp_path, progress=False)
    assert again.path == first.path and os.stat(again.path / "train.bin").st_mtime_ns == stamp
    edited = make_corpus(tmp_path / "edited", 3)
    (edited / next(iter(sorted(os.listdir(edited))))).write_text("changed\n")
    assert tokenize_corpus(Corpus(str(edited)), tokenizer, tmp_path, progress=False).path != first.path


def test_tokenizer_round_trip_and_transformers_loads_it(tokenizer, tmp_path):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert 300 < tokenizer.vocab_size <= 400
    texts = ["def f(x):\n\tif x:  \n        return x  # café\r\n", "naïve 日本語 😀 \x00 \\n '''\"\"\"",
             "", "   leading and trailing   ", "class A(B, metaclass=M):\n    pass\n"]
    for t in texts:
        assert tokenizer.decode(tokenizer.encode(t)) == t
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    tokenizer.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.fingerprint() == tokenizer.fingerprint() and loaded.eos_id == 2
    assert load_tokenizer(tmp_path / "tokenizer.json").encode(texts[0]) == tokenizer.encode(texts[0])
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for t in texts:
        assert hf(t)["input_ids"] == tokenizer.encode(t)
        assert hf.decode(tokenizer.encode(t)) == t
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)


def test_sentencepiece_checkpoint_tokenizer(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    text = (STDLIB / "os.py").read_text()
    (tmp_path / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(tmp_path / "corpus.txt"), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=300, model_type="bpe", minloglevel=2)
    tok = load_tokenizer(tmp_path)
    assert tok.vocab_size == 300 and tok.eos_id == 2 and tok.bos_id == 1
    assert tok.decode(tok.encode("import os")) == "import os"
    tok.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").encode("path.join") == tok.encode("path.join")


def test_missing_tokenizer_is_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected tokenizer.json or tokenizer.model") as e:
        load_tokenizer(tmp_path)
    assert "Copy the tokenizer files" in str(e.value)      # advice every command can follow (chat has no --tokenizer)
    with pytest.raises(ValueError, match="vocab_size > 259"):
        train_tokenizer(["x"], 100)
