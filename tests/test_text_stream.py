"""Streamed detokenization (issue 14): ``TextStream`` decodes a few tokens per step, not the whole reply,
and streams exactly what decoding the whole reply at every step streamed: the same deltas, the same text,
incomplete UTF-8 characters and stop-string prefixes held back the same way, for byte-level BPE and
SentencePiece (leading spaces, byte fallback) tokenizers and random token sequences."""
import random

import pytest

from hybridlm.chat_template import TextStream, text_decoder

CORPUS = ["hello world, the quick brown fox jumps over the lazy dog",
          "café crème, naïve façade — 10 € or 8 £; 日本語のテキスト; emoji 😀🎉 done",
          "def add(a, b):\n    return a + b\n", "Ünïcödé ßtrings ÆØÅ and ∑∫√ maths"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


class Reference:
    """The previous TextStream: decodes the whole reply at every token (O(n^2)); the behaviour to keep."""

    def __init__(self, decode, stop_ids=(), stop_strings=()):
        self.decode, self.stop_ids, self.stop_strings = decode, stop_ids, stop_strings
        self.tokens, self.text, self.sent, self.finish_reason = [], "", 0, None

    def push(self, token):
        if self.finish_reason is not None:
            return ""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self.flush()
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        if self.stop_strings:
            lo = max(0, self.sent - max(map(len, self.stop_strings)))
            hits = [i for s in self.stop_strings if (i := self.text.find(s, lo)) >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.finish_reason = "stop"
                return self.flush()
        end = len(self.text.rstrip("\ufffd"))
        hold = 0
        for s in self.stop_strings:
            hold = max([hold] + [k for k in range(1, len(s)) if self.text.endswith(s[:k], 0, end)])
        end = max(end - hold, self.sent)
        delta = self.text[self.sent:end]
        self.sent = end
        return delta

    def flush(self):
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    return tok, tok.get_vocab_size()


@pytest.fixture(scope="module")
def spm():
    import io
    sp = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    sp.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=400,
                                  byte_fallback=True, user_defined_symbols=["<|im_end|>"], hard_vocab_limit=False,
                                  character_coverage=0.98, minloglevel=2)   # rarer characters: byte fallback
    proc = sp.SentencePieceProcessor(model_proto=buf.getvalue())

    class Wrapped:   # as hybridlm.tokenizer's SentencePiece wrapper decodes: control ids dropped
        def decode(self, ids, skip_special_tokens=False):
            ids = list(ids)
            if skip_special_tokens:
                ids = [i for i in ids if not proc.is_control(i)]
            return proc.decode(ids)
    tok = Wrapped()
    tok.proc = proc
    return tok, proc.get_piece_size()


def sequences(vocab, n, seed, length=60):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(1, length))] for _ in range(n)]


def run(stream, ids):
    deltas = [stream.push(t) for t in ids]
    return deltas + [stream.flush()]


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_streamed_text_equals_one_shot_decode(kind, request):
    tok, vocab = request.getfixturevalue(kind)
    decode = text_decoder(tok)
    multibyte = 0
    for ids in sequences(vocab, 300, seed=1):
        full = decode(ids)
        multibyte += any(ord(c) > 127 and c != "\ufffd" for c in full)
        deltas = run(TextStream(decode), ids)
        assert "".join(deltas) == full, ids
        assert deltas == run(Reference(decode), ids), ids        # and sent at the same steps
    assert multibyte > 30      # the sequences did hold multi-byte characters


@pytest.mark.parametrize("kind", ["bpe", "spm"])
def test_stop_strings_and_stop_ids_stream_as_before(kind, request):
    tok, vocab = request.getfixturevalue(kind)
    decode = text_decoder(tok)
    rng = random.Random(2)
    hits = 0
    for ids in sequences(vocab, 200, seed=3, length=80):
        full = decode(ids)
        stops = []
        for _ in range(rng.randint(1, 3)):       # pieces of the text (so they occur), and strings that do not
            if full and rng.random() < 0.7:
                a = rng.randrange(len(full))
                # (a stop string holding U+FFFD is left out: the old stream matched it against a trailing
                # U+FFFD that could still become a character; the new one waits until it is settled)
                stops.append(full[a:a + rng.randint(1, 6)].replace("\ufffd", "") or "zz")
            else:
                stops.append(rng.choice(["zz", "\n\n", "é€", "<|x|>", "aaaa"]))
        stop_ids = (rng.randrange(vocab),) if rng.random() < 0.3 else ()
        a, b = TextStream(decode, stop_ids, tuple(stops)), Reference(decode, stop_ids, tuple(stops))
        assert run(a, ids) == run(b, ids), (ids, stops)
        assert a.finish_reason == b.finish_reason and a.text == b.text
        hits += a.finish_reason == "stop"
    assert hits > 50


def test_overlapping_stop_strings_and_a_stop_string_across_tokens():
    pieces = {1: "ab", 2: "ab", 3: "ac", 4: "x", 5: "\xe2", 6: "\x82", 7: "\xac", 8: "abab"}

    def decode(ids):
        return "".join(pieces[i] for i in ids).encode("latin-1").decode("utf-8", errors="replace")
    s = TextStream(decode, stop_strings=("ababac", "bx"))
    assert [s.push(1), s.push(2), s.push(2)] == ["", "", "ab"]      # held: "abab" may become "ababac"
    assert s.push(3) == "" and s.finish_reason == "stop" and s.text == "ab"
    s = TextStream(decode, stop_strings=("€!",))
    assert [s.push(4), s.push(5), s.push(6), s.push(7)] == ["x", "", "", ""]   # "€" may start "€!"
    assert s.push(4) == "€x" and s.text == "x€x"
    s = TextStream(decode, stop_strings=("bab", "abab"))           # both complete in one push: the earliest start
    assert s.push(8) == "" and s.text == ""


def test_a_long_reply_is_decoded_in_linear_time(bpe):
    """Would catch a quadratic re-decode: the ids passed to the decode function over a 4K-token reply grow
    with the reply (a few per token), not with its square (8M for decoding the whole reply each time)."""
    tok, vocab = bpe
    decode = text_decoder(tok)
    ids = [i for i in sequences(vocab, 1, seed=4, length=1)[0]]
    rng = random.Random(5)
    ids = [rng.randrange(len(SPECIALS), vocab) for _ in range(4096)]
    passed = calls = 0

    def counting(x):
        nonlocal passed, calls
        passed += len(x)
        calls += 1
        return decode(x)
    stops = ("<|never|>", "x" * 256)        # a long stop string: holding back and matching stay linear too
    stream = TextStream(counting, stop_strings=stops)
    out = "".join(stream.push(t) for t in ids) + stream.flush()
    assert out == decode(ids)
    assert calls <= 2 * len(ids) and passed <= 8 * len(ids), (calls, passed)


def test_a_long_run_of_spaces_is_decoded_in_linear_time(spm):
    """SentencePiece drops the leading spaces of a decode, so after whitespace-only tokens the window reaches
    back to the last visible character; the reach is bounded, so a long run of spaces stays linear."""
    tok, _ = spm
    decode = text_decoder(tok)
    pieces = [tok.proc.id_to_piece(i) for i in range(tok.proc.get_piece_size())]
    space = pieces.index("\u2581")
    word = next(i for i, p in enumerate(pieces) if p.startswith("\u2581") and p[1:].isalpha())
    ids = [word] + [space] * 4000 + [word]
    passed = 0

    def counting(x):
        nonlocal passed
        passed += len(x)
        return decode(x)
    stream = TextStream(counting)
    out = "".join(stream.push(t) for t in ids) + stream.flush()
    assert out == decode(ids) and out.count(" ") == 4001
    assert passed <= 200 * len(ids), passed                      # whole-reply decoding: 8M
    ids = [space] * 300 + [word] + [space] * 100 + [word]        # leading spaces: a full decode drops them
    stream = TextStream(decode)
    assert "".join(stream.push(t) for t in ids) + stream.flush() == decode(ids)


def test_generate_stops_where_the_server_stops():
    """``StopCriteria`` (generate, chat) finds stop strings with the server's TextStream: in the whole
    reply, however many tokens a stop string spans (it once read only the last 64 tokens)."""
    from hybridlm.generate import StopCriteria

    def decode(ids):
        return "".join(chr(97 + i % 26) for i in ids)
    long_stop = decode(range(10, 90))                        # 80 tokens
    finished = StopCriteria((99,), (long_stop,), decode).watch()
    assert not any(finished(t) for t in range(10, 89)) and finished(89)
    assert StopCriteria((99,), (long_stop,), decode).hit(list(range(10, 90)))
    by_id = StopCriteria((99,)).watch()
    assert not by_id(5) and by_id(99)
