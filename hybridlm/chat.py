"""Interactive chat with a checkpoint: streamed replies, history, and the conversation's state.

Each turn renders the whole conversation with the chat template, but only the new tokens are run
through the model: the hybrid state after the previous reply is kept (``prefix_cache``), and a prompt
that starts with the tokens of a kept state continues from it. As in llama.cpp's interactive mode, the
conversation continues from the reply's generated ids, not from a fresh tokenization of its text
(``chat_template.KnownTexts``), so that state always applies. ``/save PATH`` writes that state with
the conversation (a safetensors snapshot, the messages in its header); ``/load PATH`` brings both back,
so a long conversation resumes without reprocessing a single token.
"""
from __future__ import annotations

import json
import sys
import time
from contextlib import closing
from dataclasses import dataclass

import torch

from .cache import Snapshot
from .chat_template import ChatFormat, KnownTexts, TextStream, text_decoder
from .generate import Generation, Sampling, StopCriteria, stream
from .prefix_cache import PrefillJob, PrefixCache, remember_reply
from .speculative import Speculative

HELP = """commands: /reset (new conversation), /save PATH, /load PATH, /help, /quit"""


@dataclass
class Turn:
    """What one reply cost."""
    prompt_tokens: int
    reused_tokens: int
    new_tokens: int
    first_token_s: float
    seconds: float
    finish_reason: str
    speculative: str = ""       # speculative decoding's acceptance, when on


class ChatSession:
    """A conversation with a model: history, sampling settings and the saved state of the last turn."""

    def __init__(self, model, fmt: ChatFormat, system: str = "", max_new_tokens: int = 512,
                 sampling: Sampling | None = None, store: PrefixCache | None = None, context: int | None = None,
                 speculative: Speculative | None = None):
        self.model, self.fmt = model, fmt
        self.speculative = speculative
        self.system = system
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling or Sampling()
        self.store = store if store is not None else PrefixCache()
        self.context = context or model.config.max_position_embeddings
        self.decode = text_decoder(fmt.tokenizer)
        self.decode_raw = text_decoder(fmt.tokenizer, skip_special_tokens=False)
        self.reset()

    def reset(self):
        """Forget the conversation (stored prefix states stay: they are keyed by tokens, and the system
        prompt's is reused)."""
        self.known = KnownTexts()
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.tokens: list[int] = []            # prompt + reply tokens behind the state of the last turn
        self.text = ""                          # the text those tokens stand for
        self.state: Snapshot | None = None

    @torch.no_grad()
    def reply(self, text: str, on_text=lambda s: None) -> Turn:
        """Add a user message, stream the reply through ``on_text``, add the reply to the history."""
        messages = self.messages + [{"role": "user", "content": text}]
        prompt = self.fmt.encode_chat(messages, known=self.known)
        ids = prompt.ids
        room = self.context - len(ids)
        if room < 1:
            raise ValueError(f"the conversation is {len(ids)} tokens, the model's context is {self.context}; "
                             f"/reset to start a new one")
        max_new = min(self.max_new_tokens, room)
        t0 = time.perf_counter()
        job = PrefillJob(self.model, ids, len(ids) + max_new + 1, self.store, prompt.boundaries).run()
        text_out = TextStream(self.decode, self.fmt.stop_ids, self.fmt.stop_strings)
        gen = Generation(max_new, self.sampling, StopCriteria(self.fmt.stop_ids), speculative=self.speculative)
        empty = torch.empty(1, 0, dtype=torch.long)
        generated: list[int] = []
        first = None
        interrupted = False
        try:
            # closing: a speculative stream left early rolls the cache back to the tokens taken
            with closing(stream(self.model, empty, gen, cache=job.cache, logits=job.logits, history=[ids])) as steps:
                for step in steps:
                    token = int(step[0])
                    if first is None:
                        first = time.perf_counter() - t0
                    generated.append(token)
                    on_text(text_out.push(token))
                    if text_out.finish_reason:
                        break
        except KeyboardInterrupt:
            # the cache may be mid-update: keep the text, not the state
            interrupted = True
        on_text(text_out.flush())
        finish = "interrupted" if interrupted else text_out.finish_reason or "length"
        self.messages = messages + [{"role": "assistant", "content": text_out.text}]
        if generated and not interrupted:
            self.tokens, self.text = ids + generated, prompt.text + self.decode_raw(generated)
            self.state = remember_reply(self.model, job.cache, self.tokens, generated[-1], self.store)
            self.known.add(self.text, self.tokens)
        else:
            self.tokens, self.text, self.state = [], "", None
        spec = self.speculative.stats.summary() if self.speculative is not None else ""
        return Turn(len(ids), job.reused, len(generated), first or 0.0, time.perf_counter() - t0, finish, spec)

    def save(self, path: str):
        """The state after the last reply plus the conversation, in one snapshot file."""
        if self.state is None:
            raise ValueError("nothing to save yet: the state is kept after a completed reply")
        meta = {**self.state.meta, "conversation": json.dumps(self.messages, ensure_ascii=False),
                "tokens": json.dumps(self.tokens), "text": self.text}
        Snapshot(self.state.tensors, meta).save(path)

    def load(self, path: str):
        """Resume a conversation saved with ``save`` (same model and dtype)."""
        snap = Snapshot.load(path, self.model)   # checked against this model before its tensors are read
        if not {"conversation", "tokens", "text"} <= snap.meta.keys():
            raise ValueError(f"{path} is a state snapshot without a conversation; save one with /save in chat")
        tokens = json.loads(snap.meta["tokens"])
        self.store.store(tokens, snap)
        self.messages = json.loads(snap.meta["conversation"])
        self.tokens, self.text, self.state = tokens, snap.meta["text"], snap
        self.known.add(self.text, tokens)


def repl(session: ChatSession, inp=None, out=None, err=None, show_stats: bool = True) -> int:
    """Read lines from ``inp``, answer on ``out``; commands start with '/'. Returns an exit code."""
    inp, out, err = inp or sys.stdin, out or sys.stdout, err or sys.stderr
    interactive = hasattr(inp, "isatty") and inp.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        print(f"chat with {session.fmt.template.origin} template; {HELP}", file=err)

    def write(s: str):
        if s:
            out.write(s)
            out.flush()

    while True:
        try:
            if interactive:
                line = input("> ")
            else:
                line = inp.readline()
                if not line:
                    return 0
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print(file=err)
            return 0
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            cmd, _, arg = line.strip().partition(" ")
            arg = arg.strip()
            try:
                if cmd in ("/quit", "/exit"):
                    return 0
                elif cmd == "/reset":
                    session.reset()
                    print("[new conversation]", file=err)
                elif cmd == "/save":
                    if not arg:
                        raise ValueError("usage: /save PATH")
                    session.save(arg)
                    print(f"[saved {len(session.messages)} messages and the state after "
                          f"{len(session.tokens)} tokens to {arg}]", file=err)
                elif cmd == "/load":
                    if not arg:
                        raise ValueError("usage: /load PATH")
                    session.load(arg)
                    print(f"[loaded {len(session.messages)} messages; state after {len(session.tokens)} tokens]",
                          file=err)
                elif cmd == "/help":
                    print(HELP, file=err)
                else:
                    raise ValueError(f"unknown command {cmd}; {HELP}")
            except (ValueError, OSError) as e:
                print(f"error: {e}", file=err)
            continue
        try:
            turn = session.reply(line, write)
        except ValueError as e:
            print(f"error: {e}", file=err)
            continue
        write("\n")
        if show_stats:
            rate = turn.new_tokens / turn.seconds if turn.seconds > 0 else 0.0
            print(f"[{turn.prompt_tokens} prompt tokens ({turn.reused_tokens} reused), {turn.new_tokens} new; "
                  f"first token {turn.first_token_s:.2f}s; {rate:.1f} tok/s; {turn.finish_reason}]", file=err)
            if turn.speculative:
                print(f"[{turn.speculative}]", file=err)


def chat(model: str, system: str = "", max_new_tokens: int = 512, temperature: float = 0.8,
         top_p: float = 0.95, top_k: int = 0, repetition_penalty: float = 1.0, seed: int = 0, dtype: str = "auto",
         prefix_cache: str = "256MB", load: str = "", threads: int = 0, stats: bool = True, quantize: str = "",
         speculative: str = "", draft_k: int = 4) -> int:
    """Chat with a checkpoint in the terminal, replies streamed; commands /reset, /save PATH, /load PATH,
    /quit. The conversation's state is kept, so each turn processes only its new tokens.

    /reset starts over, /save PATH writes the conversation and its state, /load PATH resumes one, /quit
    leaves (so do Ctrl-D and Ctrl-C at the prompt; Ctrl-C during a reply stops the reply). Reads lines
    from standard input, so a script can be piped in.

    Args:
        model: checkpoint directory (config.json, safetensors, tokenizer.json or tokenizer.model)
        system: system prompt
        max_new_tokens: longest reply in tokens
        temperature: 0 for greedy decoding
        top_p: nucleus sampling mass (1.0: off)
        top_k: sample among the k most likely tokens (0: off)
        repetition_penalty: >1 discourages repeating tokens
        seed: random seed for sampling
        dtype: weight dtype: auto (the checkpoint's), bfloat16, float32
        quantize: quantize the weights while loading: int8, int4, or a spec such as int4:g32 (empty: off)
        prefix_cache: memory for kept states, e.g. 256MB
        load: resume a conversation saved with /save
        threads: torch CPU threads (0: torch's default)
        stats: print tokens, time to first token and speed after each reply (to stderr)
        speculative: speculative decoding: lookup (drafts copied from the conversation) or draft:PATH
            (a small model with the same tokenizer); same replies, fewer forwards of the model (empty: off)
        draft_k: tokens drafted per verifying forward with --speculative

    Examples:
        hybridlm chat --model ./out --system "You are a terse assistant."
        printf 'Hello\\n/save chat.state\\n' | hybridlm chat --model ./out --temperature 0
        hybridlm chat --model ./out --load chat.state
    """
    from .checkpoint import load_model, parse_dtype
    from .cli import CLIError, set_threads
    from .config import PRESETS
    from .summary import parse_bytes
    if model in PRESETS:
        raise CLIError(f"'{model}' is a preset (random weights, no tokenizer); chat needs a checkpoint directory")
    set_threads(threads)
    m = load_model(model, dtype=parse_dtype(dtype), quantize=quantize)
    fmt = ChatFormat.from_dir(model)
    from .speculative import from_flag
    session = ChatSession(m, fmt, system, max_new_tokens, Sampling(temperature, top_k, top_p, repetition_penalty, seed),
                          PrefixCache(parse_bytes(prefix_cache)), speculative=from_flag(speculative, draft_k, m, dtype))
    if load:
        session.load(load)
    return repl(session, show_stats=stats)
