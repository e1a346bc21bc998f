"""Inference: parallel (chunked) prefill into a preallocated cache, one-token decode steps, sampling,
streaming, batches of prompts of different lengths.

Split as gpt-fast does: ``prefill`` (the prompt, in chunks of ``prefill_chunk`` tokens so memory stays
bounded whatever the prompt length; each chunk continues from the state the previous one left),
``decode_step`` (one token per row), ``sample`` (logits -> token), and ``stream`` / ``generate`` on top.
The loop itself is engine.py's (``engine.Batch.step``), the one the server's engine runs; the chat CLI
uses ``stream`` too. With ``Generation.speculative`` (speculative.py) a step verifies several drafted
tokens in one forward and yields each token it decides.

Batches: prompts are left-padded to one length; the pad mask keeps padding out of the Mamba state and
out of every attention window, so each row generates what it would generate alone.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .cache import Cache

if TYPE_CHECKING:
    from .chat_template import TextStream
    from .speculative import Speculative

DEFAULT_PREFILL_CHUNK = 2048
# below this temperature sampling is greedy: logits / t would overflow fp32 (t = 1e-45 gives inf, then NaN)
GREEDY_BELOW = 1e-5


@dataclass
class Sampling:
    """How the next token is chosen. temperature 0 (or below ``GREEDY_BELOW``) = greedy (the other
    knobs are then moot)."""
    temperature: float = 0.0
    top_k: int = 0                 # 0: off
    top_p: float = 1.0             # 1.0: off
    repetition_penalty: float = 1.0  # CTRL-style (Keskar et al. 2019): >1 discourages tokens already seen
    seed: int | None = None
    # ---- OpenAI's logit transforms (the server's; any caller may set them), applied before the above ----
    presence_penalty: float = 0.0    # minus this for every token already generated (``counts`` > 0)
    frequency_penalty: float = 0.0   # minus this times how often a token was generated
    logit_bias: dict[int, float] = field(default_factory=dict)   # token id -> added to its logit
    vocab_limit: int = 0             # ids >= this are never sampled (a vocabulary padded past the tokenizer's); 0: off
    _bias: tuple | None = field(default=None, init=False, repr=False, compare=False)   # logit_bias as tensors

    def __post_init__(self):
        if not all(math.isfinite(x) for x in (self.presence_penalty, self.frequency_penalty,
                                              *self.logit_bias.values())):
            raise ValueError("presence_penalty, frequency_penalty and logit_bias values must be finite numbers")
        if self.vocab_limit < 0:
            raise ValueError(f"vocab_limit must be >= 0, got {self.vocab_limit}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def transform(logits: torch.Tensor, s: Sampling, seen: torch.Tensor | None = None,
              counts: torch.Tensor | None = None) -> torch.Tensor:
    """logits [..., v] -> the fp32 logits ``sample`` draws from: the vocabulary limit, logit bias and
    presence/frequency penalties, the repetition penalty, then (unless greedy) temperature, top-k and
    top-p. ``seen`` [..., v] bool marks tokens to penalise; ``counts`` [..., v] how often each token was
    generated (presence/frequency penalties). Speculative decoding (speculative.py) reads the same
    distribution, softmax(transform(...)), to verify drafts."""
    logits = logits.float()
    logits = _openai_transforms(logits, s, counts)
    if s.repetition_penalty != 1.0 and seen is not None:
        penalised = torch.where(logits > 0, logits / s.repetition_penalty, logits * s.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if s.temperature < GREEDY_BELOW:
        return logits
    logits = logits / s.temperature
    if s.top_k:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = probs.cumsum(-1) - probs >= s.top_p
        drop[..., 0] = False   # the top token always stays (a top_p that rounds to 0 in fp32 would drop it)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def sample(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """logits [b, v] -> tokens [b]. ``seen`` [b, v] bool marks tokens to penalise (repetition penalty);
    ``counts`` [b, v] counts each token generated so far (presence and frequency penalties)."""
    logits = transform(logits, s, seen, counts)
    if s.temperature < GREEDY_BELOW:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _openai_transforms(logits: torch.Tensor, s: Sampling, counts: torch.Tensor | None) -> torch.Tensor:
    """The server's transforms, in OpenAI's order: never sample ids past ``vocab_limit``, add
    ``logit_bias``, subtract presence and frequency penalties (counts of the completion so far). fp32
    logits in; a new tensor out when anything applies."""
    if s.vocab_limit and s.vocab_limit < logits.shape[-1]:
        logits = logits.clone()
        logits[..., s.vocab_limit:] = float("-inf")
    if s.logit_bias:
        if s._bias is None or s._bias[0].device != logits.device:
            # one indexed add, not one per entry: a request may bias the whole vocabulary
            s._bias = (torch.tensor(list(s.logit_bias), dtype=torch.long, device=logits.device),
                       torch.tensor(list(s.logit_bias.values()), dtype=torch.float32, device=logits.device))
        logits = logits.index_add(-1, s._bias[0], s._bias[1].expand(*logits.shape[:-1], -1))
    if (s.presence_penalty or s.frequency_penalty) and counts is not None:
        counts = counts.to(logits)
        logits = logits - (s.frequency_penalty * counts + s.presence_penalty * (counts > 0).to(logits))
    return logits


@torch.no_grad()
def prefill(model, cache: Cache, input_ids: torch.Tensor, mask: torch.Tensor | None = None,
            chunk: int = DEFAULT_PREFILL_CHUNK, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Run the prompt [b, l] through the model in chunks, filling ``cache``; returns last logits [b, v].
    Only the last position's logits are computed (never [b, l, v])."""
    if chunk < 1:
        raise ValueError(f"prefill chunk must be >= 1, got {chunk}")
    l = input_ids.shape[1]
    if l == 0:
        raise ValueError("empty prompt: give at least one token")
    logits = None
    for i in range(0, l, chunk):
        m = mask[:, i:i + chunk] if mask is not None else None
        logits = model(input_ids[:, i:i + chunk], cache, mask=m, last_only=True)
        if progress is not None:
            progress(min(i + chunk, l), l)
    return logits[:, -1]


@torch.no_grad()
def decode_step(model, cache: Cache, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [b] -> next-token logits [b, v], advancing the cache by one position."""
    return model(tokens[:, None], cache)[:, -1]


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths -> (ids [b, l_max], mask [b, l_max]) padded on the left."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    l = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), l), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), l, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, l - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, l - len(p):] = True
    return ids, mask


@dataclass
class StopCriteria:
    """When a row is finished: a stop token id, or a stop string appearing in its decoded new text."""
    token_ids: tuple[int, ...] = ()
    strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None

    def __post_init__(self):
        if self.strings and self.decode is None:
            raise ValueError("stop strings need a decode function (a tokenizer) to read the generated text")

    def reader(self, text: bool = False) -> "TextStream | _StopTokens":
        """What reads one row's tokens: ``push(token)`` returns the text safe to send (with ``text``, else
        ""), and ``finish_reason`` becomes "stop" at a stop token or stop string. Stop strings are found as
        the server finds them (``chat_template.TextStream``: the decoded text, read incrementally), so a
        token costs the same however long the reply. The one place stop tokens and strings are checked."""
        if not (self.strings or text):
            return _StopTokens(self.token_ids)
        if self.decode is None:
            raise ValueError("text needs a decode function (a tokenizer)")
        from .chat_template import TextStream
        return TextStream(self.decode, self.token_ids, self.strings)

    def watch(self) -> Callable[[int], bool]:
        """A checker for one row: give it each new token; True once the row is finished."""
        reader = self.reader()

        def finished(token: int) -> bool:
            reader.push(token)
            return reader.finish_reason is not None
        return finished

    def hit(self, new_tokens: list[int]) -> bool:
        """Whether a row that generated ``new_tokens`` is finished (reads them all; per step, ``watch``)."""
        finished = self.watch()
        return any(finished(t) for t in new_tokens)


class _StopTokens:
    """``StopCriteria.reader`` without text: stop tokens only, nothing decoded."""

    def __init__(self, token_ids: tuple[int, ...]):
        self.ids = frozenset(token_ids)
        self.finish_reason: str | None = None

    def push(self, token: int) -> str:
        if self.finish_reason is None and token in self.ids:
            self.finish_reason = "stop"
        return ""

    def flush(self) -> str:
        return ""


@dataclass
class Generation:
    """Everything ``stream`` needs beyond the model and the prompt."""
    max_new_tokens: int = 64
    sampling: Sampling = field(default_factory=Sampling)
    stop: StopCriteria = field(default_factory=StopCriteria)
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    speculative: "Speculative | None" = None   # speculative.py: several tokens verified per target forward


@torch.no_grad()
def stream(model, input_ids: torch.Tensor, gen: Generation, mask: torch.Tensor | None = None,
           cache: Cache | None = None, logits: torch.Tensor | None = None,
           history: list[list[int]] | None = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row [b] per step; finished rows yield -1 from then on.

    The steps are ``engine.Batch.step`` (the server's too) over one group of rows (``engine.Rows``: one
    sampling, one generator drawing all rows at once, a stop reader per row).
    With ``cache`` given, ``input_ids`` continue from its state (an empty ``input_ids`` plus the
    ``logits`` the cache ended on continue without any prefill: a restored snapshot); ``history`` (the
    tokens already in that cache, per row) is what a speculative drafter looks up and a draft model reads.
    With ``gen.speculative``, closing the generator early (``break`` in a for loop) rolls the cache back to
    the tokens consumed, so it always ends as plain decoding leaves it: every yielded token but the last fed
    (with several rows, as far as the last step's checkpoint reaches: a row that ran ahead of the others in
    earlier steps, its tokens waiting here to be yielded, keeps those in the cache; ``engine.Batch.settle``).
    """
    from .engine import Batch, Rows   # engine.py builds on this module
    from .speculative import hole_room
    b, l = input_ids.shape
    if gen.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {gen.max_new_tokens}")
    if cache is None:
        holes = hole_room(b, gen.max_new_tokens) if gen.speculative is not None else 0
        cache = model.new_cache(b, l + gen.max_new_tokens + holes)
    elif cache.pos + l + gen.max_new_tokens > cache.max_len:
        raise ValueError(f"cache holds {cache.max_len} positions; {cache.pos} used + {l} prompt + "
                         f"{gen.max_new_tokens} new do not fit")
    if l:
        logits = prefill(model, cache, input_ids, mask, gen.prefill_chunk)
    elif logits is None:
        raise ValueError("nothing to continue from: give prompt tokens or the logits the cache ended on")
    s = gen.sampling
    g = torch.Generator(device=logits.device).manual_seed(s.seed) if s.seed is not None else None
    rows = Rows(b, s, gen.stop, gen.max_new_tokens, g, input_ids if l else None, mask)
    # speculative decoding (speculative.py): a step verifies drafted tokens and decides several
    if gen.speculative is not None:
        rows.spec = gen.speculative.start(model, cache, input_ids, mask, history, gen)
    batch = Batch(model, cache, [rows], logits)
    # per row, tokens decided and not yet yielded: with speculation rows keep their own counts per step, and
    # a row ahead of the others waits here, so every yield holds each row's next token
    pending = [deque() for _ in range(b)]
    try:
        while gen.max_new_tokens:
            done = rows.done.tolist()
            if any(not d and not p for d, p in zip(done, pending)):
                for out in batch.step():
                    for p, t in zip(pending, out.tolist()):
                        if t >= 0:
                            p.append(t)
                continue
            if not any(pending):
                break
            yield torch.tensor([p.popleft() if p else -1 for p in pending], device=logits.device)
    finally:
        batch.settle([len(p) for p in pending])     # tokens decided but not taken leave the cache


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
             stop_token_ids: tuple[int, ...] | list[int] = (), stop_strings: tuple[str, ...] | list[str] = (),
             decode: Callable[[list[int]], str] | None = None, attention_mask: torch.Tensor | None = None,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK, pad_token_id: int | None = None,
             speculative: "Speculative | str | None" = None) -> torch.Tensor:
    """[b, l] -> [b, l + n]: the prompt followed by up to ``max_new_tokens`` tokens per row.

    Rows that stop early (a stop token or stop string) are filled with ``pad_token_id`` (default: the
    config's) after their last token; ``attention_mask`` [b, l] (1 = token, 0 = left padding) lets a
    batch hold prompts of different lengths. ``speculative``: "lookup" or a ``speculative.Speculative``
    (same output distribution, fewer target forwards; its ``stats`` say how many tokens each took).
    """
    if isinstance(speculative, str):
        from .speculative import Speculative
        speculative = Speculative(speculative)
    gen = Generation(max_new_tokens, Sampling(temperature, top_k, top_p, repetition_penalty, seed),
                     StopCriteria(tuple(stop_token_ids), tuple(stop_strings), decode), prefill_chunk, speculative)
    mask = attention_mask.bool() if attention_mask is not None else None
    pad = model.config.pad_token_id if pad_token_id is None else pad_token_id
    steps = [t.masked_fill(t < 0, pad if pad is not None else 0) for t in stream(model, input_ids, gen, mask)]
    if not steps:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(steps, 1).to(input_ids.device)], 1)


def generate_cli(model: str, prompt: str = "", max_new_tokens: int = 64, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int = 0,
                 dtype: str = "auto", stop: list[str] | None = None, prompt_file: str = "", quantize: str = "",
                 speculative: str = "", draft_k: int = 4) -> int:
    """Generate a continuation of a prompt with a checkpoint, streaming tokens as they come.

    Args:
        model: checkpoint directory (with a tokenizer), .gguf file, or a preset name (random weights, token ids)
        prompt: the prompt text (with a preset: space-separated token ids)
        max_new_tokens: how many tokens to generate at most
        temperature: 0 for greedy decoding
        top_k: sample among the k most likely tokens (0: off)
        top_p: nucleus sampling mass (1.0: off)
        repetition_penalty: >1 discourages repeating tokens
        seed: random seed for sampling
        dtype: weight dtype: auto (the checkpoint's), bfloat16, float32
        stop: stop strings
        prompt_file: read the prompt from this file instead
        quantize: quantize the weights while loading: int8, int4, or a spec such as int4:g32 (empty: off)
        speculative: speculative decoding: lookup (drafts copied from the context) or draft:PATH
            (a small model with the same tokenizer); same output, fewer forwards of the model (empty: off)
        draft_k: tokens drafted per verifying forward with --speculative

    Examples:
        hybridlm generate ./out --prompt "def fibonacci(n):" --max-new-tokens 80
        hybridlm generate bench-88m --prompt "1 2 3" --max-new-tokens 8
        hybridlm generate ./out --prompt-file code.py --speculative lookup --draft-k 6
    """
    import sys
    import time
    from pathlib import Path

    from .checkpoint import load_model, parse_dtype
    text = Path(prompt_file).read_text() if prompt_file else prompt
    m = load_model(model, dtype=parse_dtype(dtype), quantize=quantize)
    tok = None
    if Path(model).is_dir() or str(model).lower().endswith(".gguf"):
        from .tokenizer import load_tokenizer
        tok = load_tokenizer(model)
    if tok is not None:
        ids = tok.encode(text)
        decode = tok.decode
        stop_ids = tuple(i for i in (tok.eos_id,) if i is not None)
    else:
        try:
            ids = [int(t) for t in text.split()] or [m.config.bos_token_id or 0]
        except ValueError:
            raise ValueError("this model has no tokenizer: give the prompt as space-separated token ids") from None
        decode = lambda t: " ".join(map(str, t)) + " "  # noqa: E731
        stop_ids = ()
    room = m.config.max_position_embeddings - len(ids)
    if not 0 < max_new_tokens <= room:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: the prompt's {len(ids)} tokens leave room for 1 to "
                         f"{max(room, 0)} new tokens in the model's context of {m.config.max_position_embeddings} "
                         f"(max_position_embeddings); the cache is allocated for them up front")
    from .speculative import from_flag
    spec = from_flag(speculative, draft_k, m, dtype)
    gen = Generation(max_new_tokens, Sampling(temperature, top_k, top_p, repetition_penalty, seed),
                     StopCriteria(stop_ids, tuple(stop or ()), decode if stop else None), speculative=spec)
    t0 = time.perf_counter()
    out: list[int] = []
    from .chat_template import TextStream
    text = TextStream(decode)   # decodes only the new tokens; holds an incomplete character back
    for step, t in enumerate(stream(m, torch.tensor([ids]), gen)):
        if step == 0:
            ttft = time.perf_counter() - t0
        if int(t[0]) < 0:
            break
        out.append(int(t[0]))
        sys.stdout.write(text.push(int(t[0])))
        sys.stdout.flush()
    sys.stdout.write(text.flush())
    dt = time.perf_counter() - t0
    n = len(out)
    print(f"\n[{len(ids)} prompt tokens, {n} new; first token {ttft if n else 0:.2f}s; "
          f"{n / dt:.1f} tok/s overall]", file=sys.stderr)
    if spec is not None:
        print(f"[{spec.stats.summary()}]", file=sys.stderr)
    return 0
