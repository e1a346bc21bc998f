"""GGUF tokenizer metadata <-> hybridlm tokenizers: round trips through real GGUF files for both kinds
('llama' SentencePiece-style, 'gpt2' byte-level), llama.cpp's SPM rule re-implemented as a reference the
'llama' ids must match, llama.cpp's own test vocabulary with the ids it expects, a file written by
llama.cpp's converter code, tokenizers a GGUF cannot express, and malformed files."""
import heapq
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402
from tokenizers import Tokenizer as Backend  # noqa: E402

from hybridlm import gguf_vocab as gv  # noqa: E402
from hybridlm.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

# llama.cpp's sources, where benchmarks/build_llama_cpp.sh puts them
LLAMA_CPP = Path(os.environ.get("HYBRIDLM_LLAMA_CPP", Path.home() / ".cache" / "hybridlm" / "llama.cpp")) / "src"
LLAMA_CPP_GGUF_PY = LLAMA_CPP / "gguf-py"
SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"


def _corpus(n: int = 300) -> list[str]:
    """Seeded lines mixing ascii, accented and non-Latin scripts, digits, code and indentation."""
    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog hello world naïve café résumé Straße über Ελληνικά "
             "русский язык 日本語 中文 한국어 data model token 42 3.14 2024 1,000 x=1; def f(x): return "
             "x*2 {'k': [1, 2]} it's don't").split()
    lines = []
    for i in range(n):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(3, 14)))
        lines.append(("    " if i % 7 == 0 else "") + line + (f"  {rng.randint(0, 10**6)}" if i % 11 == 0 else ""))
    return lines


CORPUS = _corpus()
TEXTS = ["hello world", "Hello World!", " leading space", "   three leading", "trailing   ", "a  b   c    d",
         "line one\nline two\n\n\tindented\r\n", "naïve café über Straße", "русский язык, 日本語, 中文, 한국어",
         "emoji 🦙🚀 and ☃ and 😶‍🌫️", "outside the vocab: ǅ ʬ ℵ ∑ ⊕ ⟨x⟩", "digits 0 12 345 6789 3.14159 1e-9",
         "x=1; def f(x):\n    return x*2", " ", "  ", "\n", "", "tab\there", "it's   don't",
         "<s>inside</s> <unk> </s>", "text<s>", "<|bos|>hi<|eos|><|pad|>", "▁already▁escaped ▁"] + CORPUS[:60]


# ---- tokenizers under test -------------------------------------------------------------------------
def llama_style(vocab: dict[str, int], prefix: bool = True) -> Tokenizer:
    """A Llama/Jamba-style tokenizer.json over ``vocab`` (specials, 256 byte tokens, then pieces) laid out
    as transformers converts a SentencePiece model: a merge for every split of a piece into two pieces,
    by id of the piece formed, byte fallback, '▁' for spaces (prepended when ``prefix``)."""
    pieces = {t: i for t, i in vocab.items() if i >= len(SPECIALS) + 256}
    merges = [(t[:k], t[k:]) for t in sorted(pieces, key=pieces.get)
              for k in range(len(t) - 1, 0, -1) if t[:k] in pieces and t[k:] in pieces]
    backend = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁")] * prefix + [normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + [decoders.Strip(" ", 1, 0)] * prefix)
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return Tokenizer(backend, {"tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                               "unk_token": "<unk>", "add_bos_token": True, "chat_template": TEMPLATE})


def trained_bpe(vocab_size: int = 600) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a SentencePiece-style BPE trained by `tokenizers` on CORPUS
    ('▁'-prefixed words, byte tokens at ids 3..258)."""
    backend = Backend(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + BYTES, show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    return backend.get_vocab(), [tuple(m) for m in json.loads(backend.to_str())["model"]["merges"]]


def trained_vocab() -> dict[str, int]:
    return trained_bpe()[0]


def synthetic_vocab(alphabet: str = "▁abcde", length: int = 3) -> dict[str, int]:
    """benchmarks/cpu_bench.py's kind of vocabulary: every string over ``alphabet`` up to ``length``,
    shortest first (so it has repetitive pieces like '▁▁▁' whose splits compete)."""
    vocab = {t: i for i, t in enumerate(SPECIALS + BYTES)}
    level = [""]
    for _ in range(length):
        level = [p + c for p in level for c in alphabet]
        for t in level:
            vocab[t] = len(vocab)
    return vocab


def with_merges(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """``llama_style`` (no prefix) with other merges: ones llama.cpp's rule does not imply."""
    tok = llama_style(vocab, prefix=False)
    spec = json.loads(tok.backend.to_str())
    spec["model"]["merges"] = [list(m) for m in merges]
    return Tokenizer(Backend.from_str(json.dumps(spec)), tok.config)


def prefix_merged(vocab: dict[str, int]) -> Tokenizer:
    """cpu_bench's synthetic_tokenizer construction: each piece merged from its prefix and last letter
    only. llama.cpp would also join 'a' + 'bc', so this one cannot be written exactly."""
    pieces = [t for t, i in vocab.items() if i >= len(SPECIALS) + 256 and len(t) > 1]
    return with_merges(vocab, [(t[:-1], t[-1]) for t in pieces])


@pytest.fixture(scope="module")
def gpt2_tok() -> Tokenizer:
    tok = train_tokenizer(CORPUS, vocab_size=420, show_progress=False)
    tok.config["chat_template"] = [{"name": "default", "template": TEMPLATE},
                                   {"name": "tool_use", "template": "{{ tools }}" + TEMPLATE}]
    return tok


def write_gguf(path: Path, tok: Tokenizer, **kw) -> dict:
    """Write ``tok`` into a real GGUF file (architecture key and one tiny tensor beside it), read it back."""
    import numpy as np
    writer = gguf.GGUFWriter(str(path), "jamba")
    gv.write_tokenizer_metadata(writer, tok, **kw)
    writer.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gv.metadata_dict(gguf.GGUFReader(str(path)))


# ---- llama.cpp's SPM tokenizer (llama-vocab.cpp, llm_tokenizer_spm_session), as a reference -------
def llama_cpp_spm(meta: dict, text: str) -> list[int]:
    """Ids llama.cpp gives ``text`` (special tokens parsed, no BOS added) from a 'llama' GGUF's metadata:
    special and user-defined tokens split out first; each remaining run gets ' ' prepended when
    add_space_prefix (default true) and the previous piece was a special token or the start, spaces
    become '▁'; then adjacent symbols are joined while some pair forms a token, highest score first,
    leftmost on ties; symbols that are not tokens are spelled as <0xXX> byte tokens."""
    tokens, scores, types = meta[gv.TOKENS], meta[gv.SCORES], meta[gv.TOKEN_TYPE]
    ids = {t: i for i, t in enumerate(tokens)}
    specials = sorted((t for t, ty in zip(tokens, types) if ty in (gv.UNKNOWN, gv.CONTROL, gv.USER_DEFINED)),
                      key=len, reverse=True)
    parts = re.split("(" + "|".join(map(re.escape, specials)) + ")", text)
    out: list[int] = []
    after_special = True
    for k, part in enumerate(parts):
        if k % 2:
            out.append(ids[part])
            after_special = True
        elif part:
            if meta.get(gv.ADD_SPACE_PREFIX, True) and after_special:
                part = " " + part
            out += _spm_run(part.replace(" ", "▁"), ids, scores)
            after_special = False
    return out


def _spm_run(text: str, ids: dict[str, int], scores: list[float]) -> list[int]:
    symbols = list(text)
    nxt = list(range(1, len(symbols))) + [-1]
    prv = list(range(-1, len(symbols) - 1))
    queue: list = []

    def offer(left: int, right: int):
        if left >= 0 and right >= 0 and (joined := symbols[left] + symbols[right]) in ids:
            heapq.heappush(queue, (-scores[ids[joined]], left, right, len(joined)))

    for i in range(1, len(symbols)):
        offer(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not symbols[left] or not symbols[right] or len(symbols[left]) + len(symbols[right]) != size:
            continue                                  # a stale pair: one side was joined since
        symbols[left] += symbols[right]
        symbols[right] = ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        offer(prv[left], left)
        offer(left, nxt[left])
    out, i = [], 0 if symbols else -1
    while i != -1:
        s = symbols[i]
        out += [ids[s]] if s in ids else [ids[f"<0x{b:02X}>"] for b in s.encode()]
        i = nxt[i]
    return out


def assert_same_tokenizer(original: Tokenizer, back: Tokenizer, texts=TEXTS):
    for text in texts:
        ids = original.encode(text)
        assert back.encode(text) == ids, text
        assert back.decode(ids) == original.decode(ids), text
    assert back.vocab_size == original.vocab_size
    saved = Backend.from_str(back.backend.to_str())           # what Tokenizer.save writes reloads the same
    assert saved.encode(texts[0], add_special_tokens=False).ids == original.encode(texts[0])
    assert (back.bos_id, back.eos_id, back.pad_id) == (original.bos_id, original.eos_id, original.pad_id)


# ---- 'llama' ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", [True, False], ids=["add_space_prefix", "no_prefix(jamba)"])
@pytest.mark.parametrize("make_vocab", [trained_vocab, synthetic_vocab])
def test_llama_round_trip(tmp_path, make_vocab, prefix):
    tok = llama_style(make_vocab(), prefix=prefix)
    meta = write_gguf(tmp_path / "tok.gguf", tok)
    assert meta[gv.MODEL] == "llama" and meta[gv.ADD_SPACE_PREFIX] is prefix
    assert len(meta[gv.TOKENS]) == len(meta[gv.SCORES]) == len(meta[gv.TOKEN_TYPE]) == tok.vocab_size
    assert gv.MERGES not in meta
    assert meta[gv.TOKEN_TYPE][:4] == [gv.UNKNOWN, gv.CONTROL, gv.CONTROL, gv.BYTE]

    back = gv.tokenizer_from_metadata(meta, "tok.gguf")
    assert_same_tokenizer(tok, back)
    assert back.encode("🦙")[-4:] == [tok.token_to_id(f"<0x{b:02X}>") for b in "🦙".encode()]   # byte fallback
    for text in TEXTS:                      # what llama.cpp itself computes from the file
        assert llama_cpp_spm(meta, text) == tok.encode(text), text
        if not re.search("[<▁]", text):     # a byte_fallback tokenizer decodes every other text back
            assert back.decode(back.encode(text)) == text
    assert back.config["chat_template"] == TEMPLATE and back.config["add_bos_token"] is True
    assert back.config["unk_token"] == "<unk>"
    assert back.backend.post_processor is not None and back.backend.encode("hi").ids[0] == back.bos_id


def test_llama_metaspace_pre_tokenizer(tmp_path):
    """Newer tokenizer.json files put '▁' in a Metaspace pre-tokenizer: one that neither splits nor
    prepends is the same as Replace(' ', '▁'); one that prepends skips it before a leading space, which
    llama.cpp does not, so writing it is refused."""
    tok = llama_style(trained_vocab(), prefix=False)
    spec = json.loads(tok.backend.to_str())
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": False}
    tok = Tokenizer(Backend.from_str(json.dumps(spec)), tok.config)
    meta = write_gguf(tmp_path / "tok.gguf", tok)
    assert meta[gv.ADD_SPACE_PREFIX] is False
    back = gv.tokenizer_from_metadata(meta)
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text) == llama_cpp_spm(meta, text), text

    spec["pre_tokenizer"]["prepend_scheme"] = "always"
    always = Tokenizer(Backend.from_str(json.dumps(spec)), tok.config)
    assert always.encode(" x") == always.encode("x")       # the difference from llama.cpp
    with pytest.raises(ValueError, match="Metaspace prepend_scheme 'always'"):
        write_gguf(tmp_path / "always.gguf", always)


def test_llama_user_defined_tokens(tmp_path):
    """Added tokens that are not special: one the merges also form ('▁▁', matched as written), one new
    ('<tool>'). llama.cpp matches them in the raw text, as these (normalized=False) are."""
    tok = llama_style(synthetic_vocab("▁ab", 3))
    tok.backend.add_tokens([AddedToken("▁▁", normalized=False), AddedToken("<tool>", normalized=False)])
    meta = write_gguf(tmp_path / "tok.gguf", tok)
    assert [meta[gv.TOKEN_TYPE][tok.token_to_id(t)] for t in ("▁▁", "<tool>")] == [gv.USER_DEFINED] * 2
    back = gv.tokenizer_from_metadata(meta)
    for text in TEXTS + ["a  b", "<tool>ab", "ab<tool> ba", "▁▁ab", "  ▁▁  "]:
        assert back.encode(text) == tok.encode(text) == llama_cpp_spm(meta, text), text
    assert tok.token_to_id("<tool>") in back.encode("ab<tool>")

    tok.backend.add_tokens([AddedToken("<late>", normalized=True)])     # HF matches it after Prepend('▁')
    with pytest.raises(ValueError, match=r"added tokens \['<late>'\] are matched after '▁' is prepended"):
        write_gguf(tmp_path / "late.gguf", tok)


def test_llama_merges_llama_cpp_would_not_reproduce(tmp_path):
    """A BPE's own merges (as `tokenizers` trains them, or cpu_bench builds them) leave pairs unjoined
    that llama.cpp joins: refused, or written with a warning as llama.cpp will read it."""
    with pytest.raises(ValueError, match=r"pairs are not merges of this tokenizer"):
        write_gguf(tmp_path / "trained.gguf", with_merges(*trained_bpe()))
    tok = prefix_merged(synthetic_vocab())
    with pytest.raises(ValueError, match=r"not merges of this tokenizer.*exact=False"):
        write_gguf(tmp_path / "a.gguf", tok)
    with pytest.warns(UserWarning, match="llama.cpp would tokenize this tokenizer differently"):
        meta = write_gguf(tmp_path / "b.gguf", tok, exact=False)
    back = gv.tokenizer_from_metadata(meta)                 # the file as llama.cpp reads it
    for text in TEXTS:
        assert back.encode(text) == llama_cpp_spm(meta, text), text
    # 'ab' merges before 'ea': the tokenizer is left with e|ab, llama.cpp joins them into 'eab'
    assert tok.encode("eab") == [tok.token_to_id("e"), tok.token_to_id("ab")]
    assert back.encode("eab") == [tok.token_to_id("eab")]


def test_llama_vocabulary_gaps_refused(tmp_path):
    vocab = synthetic_vocab("▁ab", 2)
    vocab["éa"] = len(vocab)        # 'é' is no token: llama.cpp joins é+a, the BPE spells 'é' as bytes
    with pytest.raises(ValueError, match=r"tokens \['éa'\] join a character that is not a token"):
        write_gguf(tmp_path / "a.gguf", llama_style(vocab))
    vocab = {t: i for t, i in synthetic_vocab("▁ab", 2).items() if t != "<0x41>"}
    with pytest.raises(ValueError, match="255 of the 256 <0xXX> byte tokens"):
        write_gguf(tmp_path / "b.gguf", llama_style(vocab))


@pytest.mark.skipif(not (LLAMA_CPP_GGUF_PY / "gguf" / "vocab.py").exists(),
                    reason=f"llama.cpp's gguf-py is not at {LLAMA_CPP_GGUF_PY}")
def test_file_from_llama_cpp_converter(tmp_path):
    """A Jamba tokenizer.json (no tokenizer.model) converted as llama.cpp's convert_hf_to_gguf.py does
    (JambaModel.set_vocab: _set_vocab_llama_hf, then add_space_prefix false), run with llama.cpp's own
    gguf-py in a child process so it does not mix with the installed `gguf`."""
    pytest.importorskip("transformers")
    tok = llama_style(trained_vocab(), prefix=False)
    src = tmp_path / "hf"
    src.mkdir()
    tok.backend.save(str(src / "tokenizer.json"))
    config = {**tok.config, "tokenizer_class": "PreTrainedTokenizerFast"}   # loads tokenizer.json as it is
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    script = (
        "import sys, gguf\n"
        "from pathlib import Path\n"
        "src, out = Path(sys.argv[1]), sys.argv[2]\n"
        "vocab = gguf.LlamaHfVocab(src)\n"
        "tokens, scores, types = zip(*vocab.all_tokens())\n"
        "w = gguf.GGUFWriter(out, 'jamba')\n"
        "w.add_tokenizer_model('llama'); w.add_tokenizer_pre('default')\n"
        "w.add_token_list(list(tokens)); w.add_token_scores(list(scores)); w.add_token_types(list(types))\n"
        "gguf.SpecialVocab(src, n_vocab=len(tokens)).add_to_gguf(w)\n"
        "w.add_add_space_prefix(False)\n"
        "w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()\n")
    out = tmp_path / "converted.gguf"
    env = {**os.environ, "PYTHONPATH": str(LLAMA_CPP_GGUF_PY), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script, str(src), str(out)], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    meta = gv.metadata_dict(gguf.GGUFReader(str(out)))
    assert set(meta[gv.SCORES]) == {-1000.0}                # the converter's placeholder score
    with pytest.warns(UserWarning, match="share their tokenizer.ggml.scores"):
        back = gv.tokenizer_from_metadata(meta, "converted.gguf")
    assert_same_tokenizer(tok, back)
    assert back.config["chat_template"] == TEMPLATE and back.config["add_bos_token"] is True
    # what the warning says: llama.cpp itself joins tied pairs leftmost first, unlike the source tokenizer
    assert any(llama_cpp_spm(meta, text) != tok.encode(text) for text in TEXTS)


@pytest.mark.skipif(not (LLAMA_CPP / "models" / "ggml-vocab-llama-spm.gguf.out").exists(),
                    reason=f"llama.cpp's vocabulary test files are not in {LLAMA_CPP / 'models'}")
def test_llama_cpp_vocab_test_file():
    """llama.cpp's own test vocabulary (Llama 2's SentencePiece, 32000 tokens, real scores) and the ids
    llama.cpp's test-tokenizer-0 expects for its inputs (special tokens not parsed; none occur)."""
    models_dir = LLAMA_CPP / "models"
    meta = gv.metadata_dict(gguf.GGUFReader(str(models_dir / "ggml-vocab-llama-spm.gguf")))
    tok = gv.tokenizer_from_metadata(meta, "ggml-vocab-llama-spm.gguf")
    texts = (models_dir / "ggml-vocab-llama-spm.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = (models_dir / "ggml-vocab-llama-spm.gguf.out").read_text(encoding="utf-8").split("\n")
    assert len(texts) > 40
    for text, ids in zip(texts, expected):
        assert tok.encode(text) == [int(i) for i in ids.split()], text
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.config["unk_token"]) == (32000, 1, 2, "<unk>")


# ---- 'gpt2' ----------------------------------------------------------------------------------------
def test_gpt2_round_trip(tmp_path, gpt2_tok):
    meta = write_gguf(tmp_path / "tok.gguf", gpt2_tok)
    assert meta[gv.MODEL] == "gpt2" and meta[gv.PRE] == "gpt-2"
    assert gv.SCORES not in meta and gv.ADD_SPACE_PREFIX not in meta
    assert meta[gv.TOKEN_TYPE][:3] == [gv.CONTROL] * 3 and set(meta[gv.TOKEN_TYPE][3:]) == {gv.NORMAL}
    assert len(meta[gv.MERGES]) == len(json.loads(gpt2_tok.backend.to_str())["model"]["merges"])
    assert [meta[k] for k in ("tokenizer.ggml.padding_token_id", "tokenizer.ggml.bos_token_id",
                              "tokenizer.ggml.eos_token_id")] == [0, 1, 2]

    back = gv.tokenizer_from_metadata(meta, "tok.gguf")
    assert_same_tokenizer(gpt2_tok, back)
    for text in TEXTS:                                      # byte-level: every text decodes back exactly
        assert back.decode(back.encode(text)) == text
    assert back.config["chat_template"] == gpt2_tok.config["chat_template"]
    assert back.config["add_bos_token"] is False


def test_padded_to_model_vocab(tmp_path, gpt2_tok):
    """llama.cpp sizes the vocabulary by the token list and checks token_embd against it: a model whose
    vocab_size exceeds its tokenizer's gets unused filler tokens, which encoding never produces."""
    n = gpt2_tok.vocab_size
    meta = write_gguf(tmp_path / "tok.gguf", gpt2_tok, vocab_size=n + 5)
    assert meta[gv.TOKENS][n:] == [f"[PAD{i}]" for i in range(n, n + 5)]
    assert meta[gv.TOKEN_TYPE][n:] == [gv.UNUSED] * 5
    back = gv.tokenizer_from_metadata(meta)
    assert back.vocab_size == n + 5
    for text in TEXTS + [f"[PAD{n}] [PAD{n + 1}]"]:
        assert back.encode(text) == gpt2_tok.encode(text), text
    with pytest.raises(ValueError, match="vocab_size=10 is smaller"):
        gv.write_tokenizer_metadata(gguf.GGUFWriter(os.devnull, "jamba"), gpt2_tok, vocab_size=10)


def test_gpt2_unsupported_pre_tokenizer(tmp_path, gpt2_tok):
    meta = write_gguf(tmp_path / "tok.gguf", gpt2_tok)
    for pre in ("llama-bpe", "qwen2", None):
        bad = {**meta, gv.PRE: pre}
        with pytest.raises(ValueError, match=rf"x.gguf: tokenizer.ggml.pre is {pre!r}.*'gpt-2'"):
            gv.tokenizer_from_metadata(bad, "x.gguf")


def test_writer_refuses_what_llama_cpp_cannot_express(gpt2_tok):
    spec = json.loads(gpt2_tok.backend.to_str())
    spec["normalizer"] = {"type": "NFC"}
    nfc = Tokenizer(Backend.from_str(json.dumps(spec)), gpt2_tok.config)
    with pytest.raises(ValueError, match="normalizer NFC"):
        gv.write_tokenizer_metadata(gguf.GGUFWriter(os.devnull, "jamba"), nfc)
    unigram = Tokenizer(Backend(models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0, byte_fallback=False)))
    with pytest.raises(ValueError, match="model is 'Unigram'.*BPE"):
        gv.write_tokenizer_metadata(gguf.GGUFWriter(os.devnull, "jamba"), unigram)


# ---- malformed files -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_meta(tmp_path_factory) -> dict:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tok.gguf", llama_style(synthetic_vocab("▁ab", 2)))


@pytest.mark.parametrize("change, message", [
    ({gv.MODEL: "bert"}, r"tokenizer.ggml.model is 'bert'.*'llama'.*'gpt2'"),
    ({gv.MODEL: "t5"}, r"tokenizer.ggml.model is 't5'"),
    ({gv.MODEL: None}, r"tokenizer.ggml.model is missing"),
    ({gv.TOKENS: None}, r"tokenizer.ggml.tokens is missing"),
    ({gv.SCORES: [0.0] * 5}, r"tokenizer.ggml.scores has 5 entries but tokenizer.ggml.tokens has \d+"),
    ({gv.TOKEN_TYPE: [1, 2]}, r"tokenizer.ggml.token_type has 2 entries"),
    ({"tokenizer.ggml.bos_token_id": 10**6}, r"tokenizer.ggml.bos_token_id = 1000000 is out of range"),
    ({"tokenizer.ggml.eos_token_id": -1}, r"tokenizer.ggml.eos_token_id = -1 is out of range"),
    ({"tokenizer.ggml.padding_token_id": "1"}, r"tokenizer.ggml.padding_token_id should be a token id"),
    ({gv.ADD_SPACE_PREFIX: "yes"}, r"tokenizer.ggml.add_space_prefix should be a bool"),
    ({gv.CHAT_TEMPLATES: ["tool_use"]}, r"tokenizer.chat_template.tool_use is missing"),
])
def test_bad_metadata(llama_meta, change, message):
    with pytest.raises(ValueError, match=message) as raised:
        gv.tokenizer_from_metadata({**llama_meta, **change}, "bad.gguf")
    assert str(raised.value).startswith("bad.gguf")


def test_bad_tokens_and_merges(llama_meta, tmp_path, gpt2_tok):
    tokens = list(llama_meta[gv.TOKENS])
    for i, bad, message in [(5, tokens[4], r"holds '<0x01>' twice \(ids 4 and 5\)"), (5, "", r"\[5\] = '' is not"),
                            (5, b"\xff\xfe", r"\[5\] is not valid UTF-8")]:
        with pytest.raises(ValueError, match=message):
            gv.tokenizer_from_metadata({**llama_meta, gv.TOKENS: tokens[:i] + [bad] + tokens[i + 1:]}, "bad.gguf")
    types = list(llama_meta[gv.TOKEN_TYPE])
    with pytest.raises(ValueError, match=r"token_type\[7\] = 9 is not a token type"):
        gv.tokenizer_from_metadata({**llama_meta, gv.TOKEN_TYPE: types[:7] + [9] + types[8:]})
    scores = list(llama_meta[gv.SCORES])
    with pytest.raises(ValueError, match=r"scores\[3\] = nan is not a number"):
        gv.tokenizer_from_metadata({**llama_meta, gv.SCORES: scores[:3] + [float("nan")] + scores[4:]})

    meta = write_gguf(tmp_path / "g.gguf", gpt2_tok)
    merges = list(meta[gv.MERGES])
    for bad, message in [("Ġ zzz", r"merges\[0\] = 'Ġ zzz' needs the token 'zzz'"),
                         ("Ġt", r"merges\[0\] = 'Ġt' is not two"), (7, r"merges\[0\] = 7 is not two")]:
        with pytest.raises(ValueError, match=message):
            gv.tokenizer_from_metadata({**meta, gv.MERGES: [bad] + merges[1:]}, "g.gguf")


def test_numpy_metadata_and_metadata_dict(tmp_path, llama_meta):
    """Callers may pass numpy arrays; metadata_dict gives python values of each GGUF type."""
    import numpy as np
    meta = {**llama_meta, gv.SCORES: np.array(llama_meta[gv.SCORES], dtype=np.float32),
            gv.TOKEN_TYPE: np.array(llama_meta[gv.TOKEN_TYPE], dtype=np.int32)}
    assert gv.tokenizer_from_metadata(meta).encode("ab ba") == gv.tokenizer_from_metadata(llama_meta).encode("ab ba")

    path = tmp_path / "kv.gguf"
    writer = gguf.GGUFWriter(str(path), "jamba")
    writer.add_uint32("test.u32", 7)
    writer.add_float32("test.f32", 0.5)
    writer.add_bool("test.flag", True)
    writer.add_string("test.text", "naïve ▁")
    writer.add_array("test.ints", [1, 2, 3])
    writer.add_array("test.strings", ["a", "▁b", "日本"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    meta = gv.metadata_dict(gguf.GGUFReader(str(path)))
    assert meta == {"general.architecture": "jamba", "test.u32": 7, "test.f32": 0.5, "test.flag": True,
                    "test.text": "naïve ▁", "test.ints": [1, 2, 3], "test.strings": ["a", "▁b", "日本"]}
    assert type(meta["test.u32"]) is int and type(meta["test.flag"]) is bool and type(meta["test.f32"]) is float
