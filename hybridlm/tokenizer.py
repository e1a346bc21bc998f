"""Tokenizers: load one from a checkpoint, or train a byte-level BPE on a corpus; save it beside the weights.

A checkpoint's tokenizer is ``tokenizer.json`` (HF ``tokenizers`` format; what transformers'
``PreTrainedTokenizerFast`` reads) or, failing that, a SentencePiece ``tokenizer.model``. A trained one
is GPT-2-style byte-level BPE: every byte string is encodable and ``decode(encode(s)) == s`` exactly,
which matters for source code, where whitespace is syntax.

Special tokens of a trained tokenizer take ids 0, 1, 2 (pad, bos, eos): HybridConfig's default
``pad_token_id``, ``bos_token_id`` and ``eos_token_id``, so a fresh model and its tokenizer agree.

    tok = load_tokenizer("runs/tiny")        # a checkpoint directory, or a tokenizer.json / .model file
    ids = tok.encode("def f(x):\\n    return x")
    text = tok.decode(ids)
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIALS = [PAD, BOS, EOS]                      # ids 0, 1, 2
# names other tokenizers give their end/begin tokens, tried when tokenizer_config.json does not say
_EOS_NAMES = ["<|endoftext|>", "</s>", "<|eos|>", "<eos>", "<|end_of_text|>"]
_BOS_NAMES = ["<|begin_of_text|>", "<s>", "<|bos|>", "<bos>"]


def _need_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ImportError("the `tokenizers` package is needed to load or train tokenizers; "
                          "install it with: pip install 'hybridlm[train]'") from None
    return tokenizers


def _token_content(v) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _write_atomic(path: Path, data: bytes):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Tokenizer:
    """Text <-> token ids over a HF ``tokenizers`` tokenizer (tokenizer.json).

    ``config`` is the content of tokenizer_config.json (written back unchanged on save, so a chat
    template or other fields of a loaded checkpoint survive fine-tuning)."""

    def __init__(self, backend, config: dict | None = None):
        self._tok = backend
        self.config = dict(config or {})
        self.bos_id = self._special_id("bos_token", _BOS_NAMES)
        self.eos_id = self._special_id("eos_token", _EOS_NAMES)
        self.pad_id = self._special_id("pad_token", [PAD, "<pad>", "<|pad|>"])

    def _special_id(self, field: str, fallbacks: list[str]) -> int | None:
        name = _token_content(self.config.get(field))
        for candidate in ([name] if name else []) + fallbacks:
            i = self.token_to_id(candidate)
            if i is not None:
                return i
        return None

    @property
    def backend(self):
        """The underlying ``tokenizers.Tokenizer`` (None for a SentencePiece model)."""
        return self._tok

    # ---- the API the trainer and the server use --------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (added special tokens included)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with no BOS/EOS added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (tokenised in parallel by the Rust library)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def fingerprint(self) -> str:
        """Hash of the tokenizer's full definition: token caches are keyed by it."""
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()

    # ---- files ---------------------------------------------------------------------------------
    def save(self, directory: str | Path):
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``directory``
        (each under a temporary name, then renamed), so transformers' AutoTokenizer loads it."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        _write_atomic(d / "tokenizer.json", self._tok.to_str(pretty=False).encode())
        self._save_config(d)

    def _save_config(self, d: Path):
        _write_atomic(d / "tokenizer_config.json", (json.dumps(self.config, indent=2) + "\n").encode())
        specials = {k: self.config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                    if self.config.get(k) is not None}
        _write_atomic(d / "special_tokens_map.json", (json.dumps(specials, indent=2) + "\n").encode())

    def __repr__(self):
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


class SentencePieceTokenizer(Tokenizer):
    """A checkpoint that ships only a SentencePiece ``tokenizer.model`` (needs ``sentencepiece``)."""

    def __init__(self, model_file: Path, config: dict | None = None):
        try:
            import sentencepiece
        except ImportError:
            raise ImportError(f"{model_file} is a SentencePiece model; reading it needs the `sentencepiece` "
                              f"package: pip install sentencepiece") from None
        self.model_file = Path(model_file)
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except Exception as e:   # sentencepiece raises RuntimeError/OSError with its own texts
            raise ValueError(f"{model_file} is not a readable SentencePiece model ({e})") from None
        super().__init__(None, config)
        for attr, sp_id in (("bos_id", self._sp.bos_id()), ("eos_id", self._sp.eos_id()),
                            ("pad_id", self._sp.pad_id())):
            if getattr(self, attr) is None and sp_id >= 0:
                setattr(self, attr, sp_id)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self._sp.encode(texts)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        ids = list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if not self._sp.is_control(i)]
        return self._sp.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        i = self._sp.piece_to_id(token)
        return None if self._sp.id_to_piece(i) != token else i

    def fingerprint(self) -> str:
        return hashlib.sha256(self.model_file.read_bytes()).hexdigest()

    def save(self, directory: str | Path):
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / "tokenizer.model.tmp"
        shutil.copyfile(self.model_file, tmp)
        os.replace(tmp, d / "tokenizer.model")
        self._save_config(d)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A checkpoint directory (tokenizer.json preferred, else tokenizer.model), one of those files, or a
    GGUF file (its ``tokenizer.ggml.*`` metadata).

    Special-token ids come from tokenizer_config.json when it names them, else from well-known token
    names (``</s>``, ``<|endoftext|>``, ...); ``bos_id``/``eos_id``/``pad_id`` are None when unknown."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"tokenizer path {p} does not exist; pass a checkpoint directory or a "
                                f"tokenizer.json / tokenizer.model / .gguf file")
    if p.suffix.lower() == ".gguf":             # the tokenizer and chat template in the GGUF's metadata
        from .gguf import open_gguf
        from .gguf_vocab import tokenizer_from_metadata
        return tokenizer_from_metadata(open_gguf(p, check_arch=False).meta, source=str(p))
    d = p if p.is_dir() else p.parent
    config_file = d / "tokenizer_config.json"
    config = {}
    if config_file.exists():
        try:
            config = json.loads(config_file.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, RecursionError, ValueError) as e:
            raise ValueError(f"{config_file} is not valid JSON ({e})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
    if p.is_dir():
        if (p / "tokenizer.json").exists():
            p = p / "tokenizer.json"
        elif (p / "tokenizer.model").exists():
            p = p / "tokenizer.model"
        else:
            raise FileNotFoundError(f"no tokenizer in {d}: expected tokenizer.json or tokenizer.model. Copy the "
                                    f"tokenizer files of the checkpoint these weights came from into it (`hybridlm "
                                    f"train` takes --tokenizer PATH instead, or trains a byte-level BPE on its data)")
    if p.suffix == ".model":
        return SentencePieceTokenizer(p, config)
    tokenizers = _need_tokenizers()
    try:
        backend = tokenizers.Tokenizer.from_file(str(p))
    except Exception as e:  # the Rust library raises its own Exception type for malformed files
        raise ValueError(f"{p} is not a readable tokenizer.json ({e})") from None
    return Tokenizer(backend, config)


def train_tokenizer(texts: Iterable[str], vocab_size: int, length: int | None = None,
                    max_length: int = 1 << 20, show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE (Radford et al. 2019's GPT-2 scheme, via the ``tokenizers`` library).

    ``vocab_size`` counts the 256 byte symbols and the 3 special tokens; a small corpus may stop with
    fewer tokens (no pair left to merge). ``length``: number of texts, for the progress bar.
    ``max_length``: the tokenizer_config's model_max_length (the model's context length)."""
    if vocab_size < 256 + len(SPECIALS) + 1:
        raise ValueError(f"a byte-level BPE needs vocab_size > {256 + len(SPECIALS)} (256 bytes + "
                         f"{len(SPECIALS)} special tokens); got {vocab_size}")
    tokenizers = _need_tokenizers()
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    # GPT-2's split regex keeps runs of spaces together, so indentation becomes a few tokens
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=show_progress)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "pad_token": PAD, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "model_max_length": max_length}
    return Tokenizer(tok, config)
