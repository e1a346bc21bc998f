"""Tokenizers to and from GGUF metadata (``tokenizer.ggml.*`` and ``tokenizer.chat_template``).

A GGUF file carries its tokenizer as metadata keys that llama.cpp interprets (src/llama-vocab.cpp).
Two of its kinds are converted here, both ways:

* ``llama``: SentencePiece-style BPE, as in a Llama or Jamba tokenizer.json ('▁' (U+2581) for spaces,
  ``<0xXX>`` byte tokens for characters outside the vocabulary). The file holds tokens, one score per
  token and token types, but no merges: llama.cpp's SPM tokenizer repeatedly joins the two adjacent
  symbols whose concatenation is a vocabulary token of the highest score (ties: the leftmost pair), over
  the whole text (no pre-tokenizer). As a ``tokenizers`` BPE that is one merge for every split of a token
  into two tokens, ranked by the score of the token it forms (what transformers' converter builds from a
  SentencePiece model). Writing inverts this: a token's score is minus the rank of the first merge that
  forms it, so reading the file back gives the same merge order.
* ``gpt2``: GPT-2 byte-level BPE (what ``train_tokenizer`` makes): tokens, merges (``"a b"``, in rank
  order) and token types; ``tokenizer.ggml.pre`` names the split regex, "gpt-2" for GPT-2's own.

Writing is exact or refuses: a tokenizer whose ids llama.cpp would not reproduce from the file (a BPE
whose merges the SPM rule above does not imply, another normalizer or pre-tokenizer) raises ValueError
saying why, unless ``exact=False`` asks for the closest file with a warning. Reading treats the file as
untrusted: lengths, ids and merges are checked and reported with the key and the file's name.

    meta = metadata_dict(gguf.GGUFReader(path))
    tok = tokenizer_from_metadata(meta, source=str(path))
    write_tokenizer_metadata(writer, tok)     # writer: gguf.GGUFWriter
"""
from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from typing import Any

from .tokenizer import Tokenizer

# token types: gguf.TokenType, llama.cpp's LLAMA_TOKEN_TYPE_*
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# the types SPM merging can reach: control and unknown tokens are split out of the text before it (and
# their text never forms otherwise), byte tokens and "[PAD<id>]" fillers are never spelled by text pieces
MERGEABLE = (NORMAL, USER_DEFINED)

MODEL = "tokenizer.ggml.model"
PRE = "tokenizer.ggml.pre"
TOKENS = "tokenizer.ggml.tokens"
SCORES = "tokenizer.ggml.scores"
TOKEN_TYPE = "tokenizer.ggml.token_type"
MERGES = "tokenizer.ggml.merges"
ADD_BOS = "tokenizer.ggml.add_bos_token"
ADD_EOS = "tokenizer.ggml.add_eos_token"
ADD_SPACE_PREFIX = "tokenizer.ggml.add_space_prefix"
CHAT_TEMPLATE = "tokenizer.chat_template"
CHAT_TEMPLATES = "tokenizer.chat_templates"          # names of the extra templates, each under CHAT_TEMPLATE.<name>
# tokenizer_config.json field -> key of its id
SPECIAL_IDS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
               "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}

SPACE = "\u2581"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
# pre-tokenizer names llama.cpp maps to GPT-2's split regex with no other setting (llama-vocab.cpp,
# LLAMA_VOCAB_PRE_TYPE_GPT2 branch); other names select other regexes or flags
GPT2_PRES = ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0", "mellum",
             "modern-bert")
_MAX_EXACT_SCORE = 1 << 24       # scores are float32: integers beyond this are not exact


def _need_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("converting GGUF tokenizers needs the `tokenizers` package: "
                          "pip install 'hybridlm[gguf]'") from None
    return tokenizers


# ---- reading a GGUF's metadata ---------------------------------------------------------------------
def metadata_dict(reader) -> dict[str, Any]:
    """Key -> python value of every metadata field of a ``gguf.GGUFReader`` (the header's ``GGUF.*``
    pseudo-fields left out): strings as str, arrays as lists, numbers as int/float/bool.

    A string that is not valid UTF-8 stays bytes instead of failing the whole file: some models' token
    lists hold raw bytes, and only the tokenizer conversion (which reports it) needs them as text."""
    try:
        from gguf import GGUFValueType
    except ImportError:
        raise ImportError("reading GGUF files needs the `gguf` package: pip install 'hybridlm[gguf]'") from None

    def text(part) -> str | bytes:
        raw = part.tobytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw

    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or not field.types:
            continue
        kind, item = field.types[0], field.types[-1]
        if kind == GGUFValueType.ARRAY and item == GGUFValueType.STRING:
            meta[name] = [text(field.parts[i]) for i in field.data]
        elif kind == GGUFValueType.ARRAY:
            meta[name] = [v for i in field.data for v in field.parts[i].tolist()]
        elif kind == GGUFValueType.STRING:
            meta[name] = text(field.parts[-1])
        else:
            meta[name] = field.parts[-1].tolist()[0]
    return meta


def _plain(value):
    """numpy scalars and arrays (a caller may pass them) as python values."""
    return value.tolist() if hasattr(value, "tolist") else value


def _string(meta: dict, key: str, source: str) -> str | None:
    value = _plain(meta.get(key))
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{source}: {key} should be a string, not {type(value).__name__}")
    return value


def _flag(meta: dict, key: str, source: str) -> bool | None:
    value = _plain(meta.get(key))
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{source}: {key} should be a bool, not {value!r}")
    return value


def _array(meta: dict, key: str, n: int, source: str, kind: type) -> list | None:
    """The array under ``key`` with one ``kind`` value per token, or None when absent."""
    values = _plain(meta.get(key))
    if values is None:
        return None
    if not isinstance(values, (list, tuple)):
        raise ValueError(f"{source}: {key} should be an array, not {type(values).__name__}")
    if len(values) != n:
        raise ValueError(f"{source}: {key} has {len(values)} entries but {TOKENS} has {n}; "
                         f"they must be one per token")
    for i, v in enumerate(values):
        ok = isinstance(v, (int, float)) if kind is float else isinstance(v, int)
        if not ok or isinstance(v, bool) or (kind is float and math.isnan(v)):
            raise ValueError(f"{source}: {key}[{i}] = {v!r} is not a {'number' if kind is float else 'integer'}")
    return [kind(v) for v in values]


def _token_id(meta: dict, key: str, n: int, source: str) -> int | None:
    value = _plain(meta.get(key))
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{source}: {key} should be a token id, not {value!r}")
    if not 0 <= value < n:
        raise ValueError(f"{source}: {key} = {value} is out of range: {TOKENS} has {n} tokens (ids 0..{n - 1})")
    return value


def _token_list(meta: dict, source: str) -> list[str]:
    tokens = _plain(meta.get(TOKENS))
    if not isinstance(tokens, (list, tuple)) or not tokens:
        raise ValueError(f"{source}: {TOKENS} is missing or empty; a GGUF tokenizer needs its token list")
    for i, t in enumerate(tokens):
        if isinstance(t, bytes):
            raise ValueError(f"{source}: {TOKENS}[{i}] is not valid UTF-8 ({t[:16]!r}); "
                             f"only text tokens can be converted")
        if not isinstance(t, str) or not t:
            raise ValueError(f"{source}: {TOKENS}[{i}] = {t!r} is not a non-empty string")
    if len(set(tokens)) != len(tokens):
        first: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in first:
                raise ValueError(f"{source}: {TOKENS} holds {t!r} twice (ids {first[t]} and {i}); "
                                 f"each token text must be unique")
            first[t] = i
    return list(tokens)


def _chat_template(meta: dict, source: str) -> str | list[dict] | None:
    """The default template (a string), or, when the file names others (tokenizer.chat_templates),
    tokenizer_config.json's list form [{name, template}, ...]."""
    default = _string(meta, CHAT_TEMPLATE, source)
    names = _plain(meta.get(CHAT_TEMPLATES)) or []
    if not names:
        return default
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{source}: {CHAT_TEMPLATES} should be a list of names, not {names!r}")
    named = [{"name": "default", "template": default}] if default is not None else []
    for name in names:
        template = _string(meta, f"{CHAT_TEMPLATE}.{name}", source)
        if template is None:
            raise ValueError(f"{source}: {CHAT_TEMPLATES} names {name!r} but {CHAT_TEMPLATE}.{name} is missing")
        named.append({"name": name, "template": template})
    return named


def spm_merges(tokens: list[str], types: list[int], scores: list[float]) -> tuple[list[tuple[str, str]], float]:
    """The BPE merges that llama.cpp's SPM rule implies, and the share of the tokens they form whose score
    another of them has (a few in real SentencePiece files; all when the scores are placeholders).

    Every split of a normal (or user-defined) token into two such tokens is a merge, ordered by the score
    of the token it forms (highest first). Ties between tokens llama.cpp breaks by position in the text, which no merge
    list can express; here they go by token id, which reproduces the source tokenizer.json when its ids
    follow its merge order (true of SentencePiece and ``tokenizers``-trained vocabularies). Splits of one
    token go longest left part first, as transformers' SentencePiece converter orders them; llama.cpp
    would take the leftmost, which differs only where both splits of a repetitive string like '▁▁▁' compete."""
    normal = {t: i for i, t in enumerate(tokens) if types[i] in MERGEABLE}
    found = []
    formed = []
    for t, i in normal.items():
        splits = [(t[:k], t[k:]) for k in range(len(t) - 1, 0, -1) if t[:k] in normal and t[k:] in normal]
        if splits:
            formed.append(scores[i])
            found.extend((-scores[i], i, rank, pair) for rank, pair in enumerate(splits))
    found.sort()
    counts = Counter(formed)
    return [pair for *_, pair in found], sum(c for c in counts.values() if c > 1) / max(len(formed), 1)


def tokenizer_from_metadata(meta: dict, source: str = "GGUF file") -> Tokenizer:
    """The tokenizer a GGUF's metadata describes, with the same ids llama.cpp produces from it.

    ``meta``: GGUF key -> python value (as ``metadata_dict`` returns; numpy arrays are accepted too).
    Control and unknown tokens become special added tokens, user-defined ones plain added tokens, both
    matched in the raw text as llama.cpp does. The config gets bos/eos/unk/pad token strings,
    add_bos_token/add_eos_token (llama.cpp's defaults when the file has none: BOS for 'llama', not for
    'gpt2') and chat_template. ``source`` names the file in error messages."""
    _need_tokenizers()
    from tokenizers import AddedToken, processors

    kind = _string(meta, MODEL, source)
    if kind is None:
        raise ValueError(f"{source} has no tokenizer: {MODEL} is missing")
    if kind not in ("llama", "gpt2"):
        raise ValueError(f"{source}: {MODEL} is {kind!r}; hybridlm converts 'llama' (SentencePiece-style BPE) "
                         f"and 'gpt2' (byte-level BPE) tokenizers only")
    tokens = _token_list(meta, source)
    n = len(tokens)
    types = _array(meta, TOKEN_TYPE, n, source, int) or [NORMAL] * n
    for i, t in enumerate(types):
        if not NORMAL <= t <= BYTE:
            raise ValueError(f"{source}: {TOKEN_TYPE}[{i}] = {t} is not a token type (1 normal, 2 unknown, "
                             f"3 control, 4 user-defined, 5 unused, 6 byte)")
    ids = {field: _token_id(meta, key, n, source) for field, key in SPECIAL_IDS.items()}
    backend = (_llama_backend if kind == "llama" else _gpt2_backend)(meta, tokens, types, ids, source)

    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)])
    backend.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    config.update({field: tokens[i] for field, i in ids.items() if i is not None})
    add_bos = _flag(meta, ADD_BOS, source)
    add_eos = _flag(meta, ADD_EOS, source)
    config["add_bos_token"] = (kind == "llama") if add_bos is None else add_bos
    config["add_eos_token"] = bool(add_eos)
    template = _chat_template(meta, source)
    if template is not None:
        config["chat_template"] = template
    # what llama.cpp adds when asked to add special tokens, for users of the tokenizer.json (transformers)
    bos_id = ids["bos_token"] if config["add_bos_token"] else None
    eos_id = ids["eos_token"] if config["add_eos_token"] else None
    if bos_id is not None or eos_id is not None:
        first = [tokens[bos_id]] if bos_id is not None else []
        last = [tokens[eos_id]] if eos_id is not None else []
        backend.post_processor = processors.TemplateProcessing(
            single=first + ["$A"] + last, pair=first + ["$A"] + last + first + ["$B:1"] + last,
            special_tokens=[(tokens[i], i) for i in {bos_id, eos_id} - {None}])
    return Tokenizer(backend, config)


def _llama_backend(meta: dict, tokens: list[str], types: list[int], ids: dict, source: str):
    """SentencePiece-style BPE: derived merges, byte fallback, '▁' for spaces, '▁' prepended to each run
    of text when tokenizer.ggml.add_space_prefix (llama.cpp: true unless the file says false)."""
    tokenizers = _need_tokenizers()
    from tokenizers import decoders, models, normalizers

    scores = _array(meta, SCORES, len(tokens), source, float) or [0.0] * len(tokens)   # llama.cpp: 0 when absent
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == BYTE and not _BYTE_TOKEN.fullmatch(t):
            raise ValueError(f"{source}: {TOKENS}[{i}] = {t!r} has type byte ({TOKEN_TYPE} 6) but is not "
                             f"written <0xXX>")
    merges, tied = spm_merges(tokens, types, scores)
    if tied > 0.5:
        warnings.warn(f"{source}: {tied:.0%} of the tokens share their {SCORES} value with others (llama.cpp's "
                      f"converter writes -1000 for every token of a tokenizer.json); their merges are ordered by "
                      f"token id, which reproduces the source tokenizer, but llama.cpp itself joins tied pairs "
                      f"leftmost first and tokenizes this file differently", stacklevel=3)
    unk = ids["unk_token"]
    if unk is None:
        unk = next((i for i, ty in enumerate(types) if ty == UNKNOWN), None)
    model = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                       unk_token=None if unk is None else tokens[unk], byte_fallback=True, fuse_unk=True)
    backend = tokenizers.Tokenizer(model)
    prefix = _flag(meta, ADD_SPACE_PREFIX, source)
    prefix = True if prefix is None else prefix
    replace = normalizers.Replace(" ", SPACE)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if prefix else replace
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend


def _gpt2_backend(meta: dict, tokens: list[str], types: list[int], ids: dict, source: str):
    """Byte-level BPE with GPT-2's split regex; merges as listed (a repeated pair keeps its first rank,
    as llama.cpp does)."""
    tokenizers = _need_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers

    pre = _string(meta, PRE, source)
    if pre not in GPT2_PRES:
        raise ValueError(f"{source}: {PRE} is {pre!r}: llama.cpp splits a gpt2-type tokenizer's text with the "
                         f"regex this name selects, and hybridlm reproduces only GPT-2's "
                         f"({', '.join(repr(p) for p in GPT2_PRES)})")
    raw = _plain(meta.get(MERGES))
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"{source}: {MERGES} is missing; a gpt2-type tokenizer needs its merges")
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str]] = []
    seen = set()
    for i, m in enumerate(raw):
        cut = m.find(" ", 1) if isinstance(m, str) else -1
        if cut < 0:
            raise ValueError(f"{source}: {MERGES}[{i}] = {m!r} is not two tokens separated by a space")
        pair = (m[:cut], m[cut + 1:])
        for part in (*pair, pair[0] + pair[1]):
            if part not in vocab:
                raise ValueError(f"{source}: {MERGES}[{i}] = {m!r} needs the token {part!r}, which is not in {TOKENS}")
        if pair not in seen:
            seen.add(pair)
            merges.append(pair)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return backend


# ---- writing ---------------------------------------------------------------------------------------
def write_tokenizer_metadata(writer, tok: Tokenizer, *, vocab_size: int | None = None,
                             exact: bool = True) -> None:
    """Add ``tok`` to a ``gguf.GGUFWriter`` as llama.cpp's converter would: tokenizer.ggml.model, .pre,
    .tokens, .token_type, .scores ('llama') or .merges ('gpt2'), bos/eos/unk/pad ids, add_bos_token,
    add_eos_token, add_space_prefix ('llama'; always written, llama.cpp's default is true) and the chat
    template(s) of ``tok.config``.

    A SentencePiece-style BPE (byte_fallback) is written as 'llama', a GPT-2 byte-level BPE as 'gpt2'.
    ``vocab_size``: the model's vocabulary (rows of token_embd) when it is larger than the tokenizer's:
    llama.cpp takes its vocabulary size from the token list and requires the embedding to match, so the
    list is padded with unused "[PAD<id>]" tokens, as llama.cpp's converter does.
    Raises ValueError naming what llama.cpp would tokenize differently (``exact=False``: write the
    closest equivalent and warn instead) or what it cannot express at all; nothing is written then."""
    backend = tok.backend
    if backend is None:
        raise ValueError(f"{type(tok).__name__} has no tokenizer.json; GGUF export converts tokenizer.json "
                         f"tokenizers (a SentencePiece tokenizer.model can be turned into one with transformers' "
                         f"AutoTokenizer(...).save_pretrained)")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"the tokenizer's model is {model.get('type')!r}; GGUF export supports BPE: "
                         f"SentencePiece-style with byte_fallback (written as 'llama') or GPT-2 byte-level "
                         f"(written as 'gpt2')")
    kind = "llama" if model.get("byte_fallback") else "gpt2"
    problems = _model_problems(model)
    merges = _model_merges(model)
    unk_name = _content(tok.config.get("unk_token")) or model.get("unk_token")
    tokens, types = _token_table(backend, kind, unk_name, vocab_size, problems)
    if kind == "llama":
        prefix = _llama_layout(spec, problems)
        late = [a.content for a in backend.get_added_tokens_decoder().values() if a.normalized and not a.special]
        if prefix and late:
            problems.append(f"added tokens {late[:3]} are matched after '▁' is prepended (normalized=True); "
                            f"llama.cpp matches added tokens in the raw text, before it")
        scores = _llama_scores(tokens, types, merges, problems)
    else:
        _gpt2_layout(spec, problems)
        if any(" " in part for pair in merges for part in pair):
            raise ValueError("a merge part contains a space, which GGUF's 'a b' merge strings cannot hold")
    add_bos, add_eos = _adds(tok, spec)
    unk = backend.token_to_id(unk_name) if unk_name else None
    template = _config_template(tok.config)
    if problems:
        message = f"llama.cpp would tokenize this tokenizer differently from a GGUF: {'; '.join(problems)}"
        if exact:
            raise ValueError(message + ". Pass exact=False to write the closest equivalent anyway")
        warnings.warn(message, stacklevel=2)

    writer.add_tokenizer_model(kind)
    writer.add_tokenizer_pre("default" if kind == "llama" else "gpt-2")
    writer.add_token_list(tokens)
    if kind == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    if kind == "gpt2":
        writer.add_token_merges([f"{a} {b}" for a, b in merges])
    else:
        writer.add_add_space_prefix(prefix)
    for tid, add in ((tok.bos_id, writer.add_bos_token_id), (tok.eos_id, writer.add_eos_token_id),
                     (unk, writer.add_unk_token_id), (tok.pad_id, writer.add_pad_token_id)):
        if tid is not None:
            add(tid)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if template:
        writer.add_chat_template(template)


def _config_template(config: dict) -> str | list[dict] | None:
    """tokenizer_config.json's chat_template: a string, or a list of {name, template} (the GGUF gets
    'default' as tokenizer.chat_template and the others by name, as llama.cpp's converter writes them)."""
    template = config.get("chat_template")
    if template is None or isinstance(template, str) or (
            isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                               and isinstance(t.get("template"), str) for t in template)):
        return template
    raise ValueError("tok.config['chat_template'] should be a string or a list of {name, template}")


def _content(value) -> str | None:
    """tokenizer_config.json writes a token as a string or as {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _model_merges(model: dict) -> list[tuple[str, str]]:
    """tokenizer.json merges: ["a b", ...] (before tokenizers 0.20) or [["a", "b"], ...]."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _model_problems(model: dict) -> list[str]:
    problems = []
    if model.get("dropout"):
        problems.append("BPE dropout (llama.cpp has none)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problems.append("a continuing_subword_prefix/end_of_word_suffix (llama.cpp has none)")
    if model.get("ignore_merges"):
        problems.append("ignore_merges (whole words found in the vocabulary skip the merges; the GGUF "
                        "pre-tokenizers written here apply every merge)")
    return problems


def _token_table(backend, kind: str, unk_name: str | None, vocab_size: int | None,
                 problems: list[str]) -> tuple[list[str], list[int]]:
    """Tokens by id and their llama.cpp types; ids no token has (up to ``vocab_size``) become
    "[PAD<id>]" (unused), as llama.cpp's converter fills them."""
    vocab = backend.get_vocab(with_added_tokens=True)
    added = backend.get_added_tokens_decoder()
    n = max(vocab.values()) + 1
    if vocab_size is not None:
        if vocab_size < n:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer's (ids up to {n - 1})")
        n = vocab_size
    tokens: list[str] = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for t, i in vocab.items():
        tokens[i], types[i] = t, NORMAL
        if kind == "llama" and _BYTE_TOKEN.fullmatch(t):
            types[i] = BYTE
    for i, a in added.items():
        if a.lstrip or a.rstrip or a.single_word:
            problems.append(f"added token {a.content!r} strips spaces or matches single words only "
                            f"(llama.cpp matches added tokens exactly)")
        if a.special:
            types[i] = UNKNOWN if kind == "llama" and a.content == unk_name else CONTROL
        else:
            types[i] = USER_DEFINED
            if kind == "llama" and a.normalized:
                # matched after '▁' replaced spaces; llama.cpp matches the raw text (as its converter does)
                tokens[i] = a.content.replace(SPACE, " ")
    if len(set(tokens)) != n:
        raise ValueError("two ids would get the same token text (a '[PAD<id>]' filler or an added token "
                         "with '▁' made plain); GGUF needs unique token texts")
    return tokens, types


def _normalizer_steps(normalizer: dict | None) -> list[dict]:
    if not normalizer:
        return []
    if normalizer.get("type") == "Sequence":
        return [s for n in normalizer.get("normalizers", []) for s in _normalizer_steps(n)]
    return [normalizer]


def _llama_layout(spec: dict, problems: list[str]) -> bool:
    """Whether spaces become '▁' as llama.cpp does, and whether a '▁' is prepended (add_space_prefix):
    normalizer Replace(' ', '▁') with or without Prepend('▁'), or a Metaspace pre-tokenizer that does not
    split. Anything else llama.cpp's SPM tokenizer cannot do is added to ``problems``."""
    replaces = prepend = False
    for step in _normalizer_steps(spec.get("normalizer")):
        if step.get("type") == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == SPACE:
            replaces = True
        elif step.get("type") == "Prepend" and step.get("prepend") == SPACE:
            prepend = True
        else:
            problems.append(f"normalizer {step.get('type')} (llama.cpp's 'llama' tokenizer only turns spaces "
                            f"into '▁')")
    pre = spec.get("pre_tokenizer")
    if pre and pre.get("type") == "Metaspace" and pre.get("replacement") == SPACE:
        replaces = True
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        if scheme != "never":
            prepend = True
            # Metaspace skips the '▁' when the text starts with a space ('first': also after special
            # tokens); llama.cpp's add_space_prefix always adds it
            problems.append(f"Metaspace prepend_scheme {scheme!r} (it adds no '▁' before a leading space, "
                            f"llama.cpp does; a normalizer Prepend('▁') matches llama.cpp)")
        if pre.get("split", True):
            problems.append("a Metaspace pre-tokenizer that splits words (llama.cpp merges across the whole text)")
    elif pre:
        problems.append(f"pre-tokenizer {pre.get('type')} (llama.cpp's 'llama' tokenizer has none)")
    if not replaces:
        raise ValueError("a byte_fallback BPE without '▁' for spaces (normalizer Replace(' ', '▁') or a Metaspace "
                         "pre-tokenizer) is not a SentencePiece-style tokenizer; GGUF 'llama' tokenizers need one")
    return prepend


def _llama_scores(tokens: list[str], types: list[int], merges: list[tuple[str, str]],
                  problems: list[str]) -> list[float]:
    """Scores that make llama.cpp's SPM rule (and ``spm_merges``) reproduce ``merges``: minus the rank of
    the first merge forming a token; mergeable tokens no merge forms rank after all merges, by id; other
    types 0, as SentencePiece gives control and byte pieces. Checks that the rule implies exactly these
    merges in this order, else adds the difference to ``problems``."""
    if len(merges) + len(tokens) > _MAX_EXACT_SCORE:
        raise ValueError(f"{len(merges)} merges and {len(tokens)} tokens are too many for exact float32 scores")
    first: dict[str, int] = {}
    for rank, (a, b) in enumerate(merges):
        first.setdefault(a + b, rank)
    scores = [-float(first.get(t, len(merges) + i)) if ty in MERGEABLE else 0.0
              for i, (t, ty) in enumerate(zip(tokens, types))]

    implied, _ = spm_merges(tokens, types, scores)
    have, want = set(merges), set(implied)
    if want - have:
        extra = [p for p in implied if p not in have]
        problems.append(f"llama.cpp joins any two adjacent tokens that form a token, and {len(extra)} such pairs "
                        f"are not merges of this tokenizer (e.g. {extra[:3]}; a BPE trained by `tokenizers` is "
                        f"like this, one converted from SentencePiece is not)")
    if have - want:
        missing = [p for p in merges if p not in want]
        problems.append(f"{len(missing)} merges do not join two normal or user-defined tokens into one "
                        f"(e.g. {missing[:3]})")
    done: set[str] = set()
    previous = None
    for a, b in merges:
        if a + b != previous and a + b in done:
            problems.append(f"the merges forming {a + b!r} are not consecutive, and one score per token cannot "
                            f"rank other merges between them")
            break
        done.add(a + b)
        previous = a + b
    # llama.cpp's symbols start as characters, tokens or not; a BPE spells a character outside the
    # vocabulary as bytes at once, so a token joining such a character to a neighbour is out of its reach
    mergeable = {t for t, ty in zip(tokens, types) if ty in MERGEABLE}
    strays = [t for t in mergeable for k in range(1, len(t)) if not (t[:k] in mergeable and t[k:] in mergeable)
              and (len(t[:k]) == 1 or t[:k] in mergeable) and (len(t[k:]) == 1 or t[k:] in mergeable)]
    if strays:
        problems.append(f"tokens {strays[:3]} join a character that is not a token itself (llama.cpp can "
                        f"form them, a byte_fallback BPE spells such characters as bytes)")
    n_bytes = sum(ty == BYTE for ty in types)
    if n_bytes != 256:
        problems.append(f"{n_bytes} of the 256 <0xXX> byte tokens (llama.cpp stops on a character with no token)")
    return scores


def _gpt2_layout(spec: dict, problems: list[str]):
    """GPT-2's split: a ByteLevel pre-tokenizer with its regex and no added space, and no normalizer."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    levels = [s for s in steps if s.get("type") == "ByteLevel"]
    if not levels:
        raise ValueError(f"a BPE with neither byte_fallback nor a ByteLevel pre-tokenizer (found "
                         f"{pre.get('type')!r}) is neither GGUF kind: 'llama' needs byte_fallback, 'gpt2' "
                         f"byte-level pre-tokenization")
    if len(steps) > 1:
        problems.append(f"pre-tokenizers {[s.get('type') for s in steps]} (a 'gpt-2' GGUF splits with GPT-2's "
                        f"regex only)")
    if levels[0].get("add_prefix_space"):
        problems.append("ByteLevel add_prefix_space (llama.cpp's 'gpt-2' adds no space)")
    if not levels[0].get("use_regex", True):
        problems.append("ByteLevel without its split regex (llama.cpp's 'gpt-2' always splits)")
    for step in _normalizer_steps(spec.get("normalizer")):
        problems.append(f"normalizer {step.get('type')} (llama.cpp does not normalize 'gpt2' text)")


def _adds(tok: Tokenizer, spec: dict) -> tuple[bool, bool]:
    """add_bos_token/add_eos_token: tokenizer_config.json's when it says, else whether the tokenizer.json
    post-processor adds the BOS/EOS token around a single text."""
    post = spec.get("post_processor") or {}
    single: list = []
    for p in (post.get("processors", []) if post.get("type") == "Sequence" else [post]):
        if p.get("type") == "TemplateProcessing":
            single = p.get("single", [])

    def added(field: str, item: dict | None) -> bool:
        name = _content(tok.config.get(field))
        return bool(item and name and item.get("SpecialToken", {}).get("id") == name)

    add_bos, add_eos = tok.config.get("add_bos_token"), tok.config.get("add_eos_token")
    if not isinstance(add_bos, bool):
        add_bos = added("bos_token", single[0] if single else None)
    if not isinstance(add_eos, bool):
        add_eos = added("eos_token", single[-1] if single else None)
    return add_bos, add_eos
