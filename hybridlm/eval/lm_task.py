"""Language modelling as an ablation task: next-token loss on a corpus through the training pipeline's
own pieces (hybridlm.data's split, token cache and packing; a byte-level BPE trained on the train
split)."""
from __future__ import annotations

from pathlib import Path

import torch


class LMTask:
    """Next-token loss on a corpus (default: the built-in Python standard-library corpus), through the
    training pipeline's own pieces: hybridlm.data's document split, token cache and packing, and a
    byte-level BPE from hybridlm.tokenizer trained on the train split only (cached by corpus digest)."""
    name = "lm"

    def __init__(self, corpus: str = "stdlib", vocab_size: int = 512, seq_len: int = 128,
                 eval_windows: int = 128, val_fraction: float = 0.05, cache_dir: str | None = None):
        self.corpus_spec, self.vocab_size, self.seq_len = corpus, vocab_size, seq_len
        self.eval_windows, self.val_fraction, self.cache_dir = eval_windows, val_fraction, cache_dir
        self._data = None
        self._path = None

    def options(self) -> dict:
        return {"corpus": self.corpus_spec, "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "eval_windows": self.eval_windows, "val_fraction": self.val_fraction}

    def __getstate__(self):
        # worker processes reopen the memory-mapped token files instead of receiving a copy
        return {**self.__dict__, "_data": None}

    def prepare(self):
        """Train (or load) the tokenizer and tokenise the corpus once; both cached on disk."""
        from ..data import Corpus, default_cache_dir, open_tokens, tokenize_corpus
        from ..tokenizer import load_tokenizer, train_tokenizer
        if self._data is None and self._path is not None:
            self._data = open_tokens(self._path)
        if self._data is not None:
            return self._data
        corpus = Corpus(self.corpus_spec, val_fraction=self.val_fraction)
        root = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        tok_dir = root / "ablate-tokenizers" / f"bpe{self.vocab_size}-{corpus.scan()['digest'][:24]}"
        if (tok_dir / "tokenizer.json").exists():
            tok = load_tokenizer(tok_dir)
        else:
            # the tokenizer sees training documents only, so validation text stays unseen
            tok = train_tokenizer(corpus.split("train"), self.vocab_size, show_progress=False)
            tok.save(tok_dir)
        self._data = tokenize_corpus(corpus, tok, cache_dir=self.cache_dir, progress=False)
        self._path = self._data.path
        self.vocab_size = tok.vocab_size
        return self._data

    def stream(self, batch_size: int, seed: int):
        """Packed training windows in the trainer's seeded order (``SampleOrder``)."""
        from ..data import PackedSequences, SampleOrder
        packed = PackedSequences(self.prepare().train, self.seq_len)
        order = SampleOrder(len(packed), seed)
        i = 0
        while True:
            yield packed.batch([order[j] for j in range(i, i + batch_size)])
            i += batch_size

    @torch.no_grad()
    def evaluate(self, model, n: int | None = None, seed: int = 0, batch_size: int = 32, device="cpu") -> dict:
        """Mean next-token cross-entropy (nats) over a fixed, evenly spaced set of validation windows
        (``eval_windows``; the sweep's ``eval_size`` does not apply)."""
        from ..data import PackedSequences, evenly_spaced
        packed = PackedSequences(self.prepare().val, self.seq_len)
        if len(packed) == 0:
            raise ValueError(f"the validation split of corpus {self.corpus_spec!r} has no window of "
                             f"{self.seq_len + 1} tokens; lower seq_len or raise val_fraction")
        idx = evenly_spaced(len(packed), self.eval_windows)
        total = count = 0.0
        for i in range(0, len(idx), batch_size):
            x, t = packed.batch(idx[i:i + batch_size])
            ce = model.loss(x.to(device), t.to(device))["ce"]
            total += float(ce) * t.numel()
            count += t.numel()
        return {"val_loss": total / count}
