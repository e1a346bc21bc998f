"""The text side of a checkpoint: tokenizer, chat template, streamed detokenization, tool calls.

Tokenizer: ``hybridlm.tokenizer.load_tokenizer`` (tokenizer.json, else tokenizer.model).

Chat template, looked up as transformers does: ``chat_template.jinja`` if present (the format
transformers >= 4.50 writes), else ``tokenizer_config.json``'s ``chat_template`` (a string, or a list
of named templates: ``tool_use`` is taken when tools are given, else ``default``). It is rendered as
``tokenizer.apply_chat_template`` renders it: a sandboxed jinja2 environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, transformers' ``tojson`` (no HTML escaping),
``raise_exception`` and ``strftime_now``, the special tokens (``bos_token``, ``eos_token``, ...) as
variables, message keys whose value is None dropped, and the result tokenized without adding special
tokens (the template writes them).

When a checkpoint has no template, ``DEFAULT_TEMPLATE`` is used: ChatML (``<|im_start|>role\\n...
<|im_end|>\\n``), with tools listed in the system turn and calls written as
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (the Hermes / Qwen convention).
"""
from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- 'You can call functions. Their JSON schemas:\\n' }}
{%- for tool in tools %}{{- (tool.function or tool) | tojson + '\\n' }}{%- endfor %}
{{- 'To call one, answer with <tool_call>{"name": NAME, "arguments": {...}}</tool_call> for each call.<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' + (message.content or '') }}
{%- for call in message.tool_calls or [] %}
{%- set fn = call.function or call %}
{{- '<tool_call>' + {'name': fn.name, 'arguments': fn.arguments} | tojson + '</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""
DEFAULT_END_OF_TURN = "<|im_end|>"

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


# ---- tokenizer ----------------------------------------------------------------------------------------
def single_token(tokenizer, text: str) -> int | None:
    """The id of ``text`` when the tokenizer reads it as one token (a special token), else None."""
    if hasattr(tokenizer, "token_to_id"):
        i = tokenizer.token_to_id(text)
        if i is not None:
            return i
    ids = tokenizer.encode(text)
    return ids[0] if len(ids) == 1 else None


def text_decoder(tokenizer, skip_special_tokens: bool = True) -> Callable[[list[int]], str]:
    """Generated ids -> text; without special tokens for replies (the end-of-turn token is not part of
    a reply), with them to reproduce the exact prompt text the ids stand for."""
    try:
        tokenizer.decode([], skip_special_tokens=skip_special_tokens)
    except TypeError:
        return tokenizer.decode
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


# ---- chat template ----------------------------------------------------------------------------------
def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for transformers' training masks;
        rendering it is just its body, but templates that use it must still parse."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; transformers' does not, and templates rely on that
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        from datetime import datetime
        return datetime.now().strftime(fmt)

    class Bounded(ImmutableSandboxedEnvironment):
        """The sandbox blocks unsafe attribute access, not unbounded work: a template is untrusted input
        (it comes with a downloaded checkpoint), so ``'x' * 10**10`` and ``n ** 10**9`` are refused here,
        and loops and output are bounded per render (``_RenderBudget``)."""
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_TEMPLATE_CHARS:
                        raise jinja2.exceptions.SecurityError(f"the template repeats a sequence of {len(seq)} "
                                                              f"{n} times (limit {MAX_TEMPLATE_CHARS:,} items)")
            if operator == "**" and isinstance(right, int) and isinstance(left, int) and abs(left) > 1 and right > 64:
                raise jinja2.exceptions.SecurityError(f"the template raises {left} to the power {right}")
            return super().call_binop(context, operator, left, right)

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.globals.pop("lipsum", None)   # a text generator no chat template needs (lipsum(10**7) is minutes of work)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


# Per render of a chat template: loop iterations over range(), characters of output, seconds. Real
# templates use a few thousand iterations and emit the conversation (a 256K-token context is ~1M chars).
MAX_TEMPLATE_LOOPS = 1_000_000
MAX_TEMPLATE_CHARS = 16_000_000
MAX_TEMPLATE_SECONDS = 10.0


class _RenderBudget:
    """Bounds one render: ``range`` counts every iteration of every loop over it, and the output is
    collected chunk by chunk; either checks the clock. Exceeding a bound raises TemplateError."""

    def __init__(self):
        import time
        self._clock = time.monotonic
        self._deadline = self._clock() + MAX_TEMPLATE_SECONDS
        self.loops = 0

    def _check_time(self):
        import jinja2
        if self._clock() > self._deadline:
            raise jinja2.exceptions.TemplateError(f"rendering took more than {MAX_TEMPLATE_SECONDS:g} s")

    def range(self, *args):
        import jinja2
        for i in range(*args):
            self.loops += 1
            if self.loops > MAX_TEMPLATE_LOOPS:
                raise jinja2.exceptions.TemplateError(f"the template loops more than {MAX_TEMPLATE_LOOPS:,} times")
            if self.loops % 4096 == 0:
                self._check_time()
            yield i

    def collect(self, chunks) -> str:
        import jinja2
        out, n = [], 0
        for c in chunks:
            n += len(c)
            if n > MAX_TEMPLATE_CHARS:
                raise jinja2.exceptions.TemplateError(f"the rendered prompt exceeds {MAX_TEMPLATE_CHARS:,} characters")
            out.append(c)
            self._check_time()
        return "".join(out)


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A jinja chat template (or a set of named ones) plus the special-token variables it may use."""

    def __init__(self, templates: str | dict[str, str], special_tokens: dict[str, str] | None = None,
                 origin: str = "given"):
        self.templates = {"default": templates} if isinstance(templates, str) else dict(templates)
        if "default" not in self.templates:
            raise ValueError(f"chat templates from {origin} have no 'default' entry "
                             f"(found: {', '.join(self.templates)})")
        self.special_tokens = dict(special_tokens or {})
        self.origin = origin
        self._compiled: dict[str, object] = {}

    @classmethod
    def from_dir(cls, path: str | Path | None, tokenizer=None) -> ChatTemplate:
        """The checkpoint's template (chat_template.jinja, then tokenizer_config.json; a GGUF file's
        metadata), else the default (also for ``path`` None). ``tokenizer``: a GGUF's, already loaded."""
        if path is None:
            return cls(DEFAULT_TEMPLATE, origin="default (ChatML)")
        path = Path(path)
        if path.suffix.lower() == ".gguf":   # the template and special tokens travel in the GGUF's metadata
            from .tokenizer import load_tokenizer
            return cls.from_config((tokenizer or load_tokenizer(path)).config, str(path))
        config = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):   # the latter wins, as in transformers
            f = path / name
            if f.exists():
                try:
                    config.update(json.loads(f.read_text()))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{f} is not valid JSON: {e}") from None
        jinja_file = path / "chat_template.jinja"
        if jinja_file.exists():
            return cls(jinja_file.read_text(), _special_tokens(config), origin=str(jinja_file))
        return cls.from_config(config, str(path / "tokenizer_config.json"))

    @classmethod
    def from_config(cls, config: dict, origin: str) -> ChatTemplate:
        """From tokenizer_config.json's contents (``chat_template``, special tokens), else the default."""
        special = _special_tokens(config)
        raw = config.get("chat_template")
        if isinstance(raw, list):
            raw = {t["name"]: t["template"] for t in raw}
        if raw:
            return cls(raw, special, origin=origin)
        return cls(DEFAULT_TEMPLATE, special, origin="default (ChatML)")

    @property
    def is_default(self) -> bool:
        return self.templates["default"] is DEFAULT_TEMPLATE

    def _pick(self, tools) -> str:
        return "tool_use" if tools and "tool_use" in self.templates else "default"

    def supports_tools(self) -> bool:
        """Whether the template reads the ``tools`` variable at all (else tools would be silently dropped)."""
        return re.search(r"\btools\b", self.templates[self._pick(True)]) is not None

    def render(self, messages: Sequence[dict], tools: list[dict] | None = None, add_generation_prompt: bool = True,
               documents: list[dict] | None = None, **kwargs) -> str:
        """The prompt text of a conversation; a template error (``raise_exception``) or a failure of the
        template's own code (``1 / 0``) raises ValueError."""
        import jinja2
        if not messages:
            raise ValueError("a conversation needs at least one message")
        name = self._pick(tools)
        if name not in self._compiled:
            try:
                self._compiled[name] = _environment().from_string(self.templates[name])
            except jinja2.TemplateSyntaxError as e:
                raise ValueError(f"chat template from {self.origin} does not parse: {e}") from None
        # OpenAI clients send content=None / tool_calls=None; templates handle missing keys, not None
        clean = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {**self.special_tokens, **kwargs}
        budget = _RenderBudget()
        try:
            return budget.collect(self._compiled[name].generate(
                messages=clean, tools=tools or None, documents=documents,
                add_generation_prompt=add_generation_prompt, **variables, range=budget.range))
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template refused the conversation: {e}") from None
        except RecursionError:
            raise ValueError(f"chat template from {self.origin} recurses without end") from None
        except Exception as e:   # the template's own code failed (1/0, 1 + 'a', none|length): its error, not ours
            raise ValueError(f"chat template from {self.origin} failed: {type(e).__name__}: {e}") from None


def _special_tokens(config: dict) -> dict[str, str]:
    return {k: t for k in _SPECIAL_TOKEN_KEYS if (t := _token_text(config.get(k))) is not None}


@dataclass
class ChatFormat:
    """Everything needed to turn a conversation into token ids and generated ids back into text."""
    tokenizer: object
    template: ChatTemplate
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()

    @classmethod
    def from_dir(cls, path: str | Path | None, tokenizer=None) -> ChatFormat:
        """Tokenizer, template and end-of-turn tokens of a checkpoint directory (``path`` None: the given
        tokenizer with the default template). Stop tokens: the tokenizer's eos, the configured eos_token,
        generation_config.json's eos_token_id (one or a list), and the default template's end-of-turn."""
        if tokenizer is None and path is None:
            raise ValueError("give a checkpoint directory or a tokenizer")
        if tokenizer is None:
            from .tokenizer import load_tokenizer
            tokenizer = load_tokenizer(path)
        tok = tokenizer
        template = ChatTemplate.from_dir(path, tokenizer)
        stop_ids, stop_strings = set(), []
        if getattr(tok, "eos_id", None) is not None:
            stop_ids.add(tok.eos_id)
        gen_cfg = Path(path) / "generation_config.json" if path is not None else None
        if gen_cfg is not None and gen_cfg.exists():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            stop_ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
        markers = [template.special_tokens.get("eos_token")]
        if template.is_default:
            markers.append(DEFAULT_END_OF_TURN)
        for text in filter(None, markers):
            i = single_token(tok, text)
            if i is not None:
                stop_ids.add(i)
            elif text == DEFAULT_END_OF_TURN:   # not a special token here: stop on the text instead
                stop_strings.append(text)
        return cls(tok, template, tuple(sorted(stop_ids)), tuple(stop_strings))

    def encode(self, text: str, known: KnownTexts | None = None) -> list[int]:
        """Token ids of prompt text. With ``known``, a prefix of ``text`` whose ids are known from
        generation keeps those ids (see ``KnownTexts``) and only the rest is tokenized."""
        if known is not None:
            head, head_ids = known.longest_prefix(text)
            if head:
                return head_ids + (list(self.tokenizer.encode(text[len(head):])) if len(head) < len(text) else [])
        ids = list(self.tokenizer.encode(text))
        # a tokenizer that adds BOS itself, reading a template that writes it too, would double it
        bos = getattr(self.tokenizer, "bos_id", None)
        bos_text = self.template.special_tokens.get("bos_token")
        if bos is not None and bos_text and text.startswith(bos_text) and ids[:2] == [bos, bos]:
            ids = ids[1:]
        return ids

    def encode_chat(self, messages: Sequence[dict], tools: list[dict] | None = None,
                    add_generation_prompt: bool = True, known: KnownTexts | None = None) -> Prompt:
        """The prompt of a conversation: its text, ids and message boundaries (token counts after the
        first message and after the messages before the last one, where those are exact token prefixes
        of the prompt). Boundaries are where a later conversation is likely to continue (the same system
        prompt or document, the same history), so the prefix cache keeps state there."""
        text = self.template.render(messages, tools, add_generation_prompt)
        ids = self.encode(text, known)
        boundaries = []
        for k in sorted({1, len(messages) - 2, len(messages) - 1}):
            if not 1 <= k < len(messages):
                continue
            try:
                part = self.template.render(messages[:k], tools, add_generation_prompt=False)
            except ValueError:   # some templates refuse partial conversations (e.g. ending on a system turn)
                continue
            if not part or not text.startswith(part):
                continue
            head = self.encode(part)
            if 0 < len(head) < len(ids) and ids[:len(head)] == head:
                boundaries.append(len(head))
        return Prompt(text, ids, boundaries)


@dataclass
class Prompt:
    text: str | None        # None for a prompt given as token ids
    ids: list[int]
    boundaries: list[int] = field(default_factory=list)


class KnownTexts:
    """Texts whose token ids are known because the model produced them: a prompt plus the reply
    generated for it. The next turn renders that reply back as text, and tokenizing it again need not
    give the same ids (a model may generate a non-canonical split, e.g. "a"+"b" where BPE would merge
    "ab"); then the saved state after the reply would not match the new prompt. Keeping the generated
    ids for that stretch of text makes the new prompt continue the state exactly, and it is what the
    model actually read. Bounded LRU; thread-safe."""

    def __init__(self, max_entries: int = 256):
        import threading
        from collections import OrderedDict
        self.max_entries = max_entries
        self._entries: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, text: str, ids: list[int]):
        if not text or self.max_entries <= 0:
            return
        with self._lock:
            self._entries[text] = list(ids)
            self._entries.move_to_end(text)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def longest_prefix(self, text: str) -> tuple[str, list[int]]:
        with self._lock:
            best = max((t for t in self._entries if text.startswith(t)), key=len, default="")
            if not best:
                return "", []
            self._entries.move_to_end(best)
            return best, list(self._entries[best])


# ---- streamed detokenization ------------------------------------------------------------------------
# a character held back this many tokens (its UTF-8 bytes still incomplete) is given up on and sent as
# decoded (U+FFFD): no real character spans that many tokens, and it bounds the window decoded per token
_MAX_PENDING = 64


class Detokenizer:
    """Token ids -> text, decoding only a small window of recent tokens at each step (O(1) per token,
    where decoding the whole reply each time is O(n) per token).

    The window is the tokens of the last step that produced text (their text is known) plus the tokens
    since; the new text is what decoding the window adds to the known part. Decoding with that context
    keeps what depends on it right: SentencePiece drops the leading spaces of a decode (so the context
    reaches back to a visible character), and byte-level tokens join into characters across tokens. A
    window whose text ends in an incomplete UTF-8 character (decoded as U+FFFD) waits for more tokens.
    Tokens that add no text (special tokens, skipped) are left out of the window. This is the "prefix
    offset / read offset" scheme of Hugging Face's text-generation-inference and of ``tokenizers``'
    ``DecodeStream``, for any ``decode(ids) -> str`` (a tokenizer's or a GGUF vocabulary's alike).

    ``push(token)`` -> (text now final, text not final yet): the second is the decoded tail that may still
    change (a trailing U+FFFD); it is replaced at the next push."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self._known: list[int] = []      # tokens whose text is known and final
        self._known_text = ""            # decode(_known)
        self._pending: list[int] = []    # tokens since, whose text may still change
        self._given = 0                  # chars of the pending text already returned as final
        self._anchor: list[int] = []     # the last tokens known whose text is not only whitespace
        self._run: list[int] = []        # tokens known since, all whitespace

    def push(self, token: int) -> tuple[str, str]:
        window = self._pending + [token]
        text = self.decode(self._known + window)
        new = text[len(self._known_text):]
        if not new and not self._pending:
            return "", ""                # adds no text (a skipped special token): not needed as context
        if new.endswith("\ufffd") and len(window) < _MAX_PENDING:
            self._pending = window
            stable = new.rstrip("\ufffd")
            out, self._given = stable[self._given:], max(self._given, len(stable))
            return out, new[len(stable):]
        out = new[self._given:]
        self._pending, self._given = [], 0
        text = self.decode(window)
        if text.strip():
            self._anchor, self._run = window, []
            self._known, self._known_text = window, text
        else:
            # whitespace alone is not context enough: SentencePiece drops every leading space of a decode, so
            # keep the tokens back to the last visible character (or the reply's start, as a full decode has)
            # (a long run needs only its end: what follows the anchor's character is kept whatever its length)
            self._run = (self._run + window)[-_MAX_PENDING:]
            self._known = self._anchor + self._run
            self._known_text = self.decode(self._known)
        return out, ""


def _failure(s: str) -> list[int]:
    """KMP failure table: f[i] = length of the longest proper prefix of s[:i + 1] that is also its suffix."""
    f, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = f[k - 1]
        if s[i] == s[k]:
            k += 1
        f[i] = k
    return f


class TextStream:
    """Generated ids -> text deltas that are safe to send: text that could still become a stop string,
    and a trailing incomplete UTF-8 character (decoded as U+FFFD), are held back until resolved.

    ``push`` returns the new text; ``finish_reason`` becomes "stop" at a stop token or stop string
    (neither is part of the text). Each push decodes a few tokens (``Detokenizer``) and reads each new
    character once: the stop strings are matched incrementally (Knuth-Morris-Pratt, one state per stop
    string: the longest prefix of it the text ends with, which is also how much text is held back), so a
    reply of n tokens costs O(n) whatever its length and its stop strings'."""

    def __init__(self, decode: Callable[[list[int]], str], stop_ids: Sequence[int] = (),
                 stop_strings: Sequence[str] = ()):
        self.decode = decode
        self.stop_ids = tuple(stop_ids)
        self.stop_strings = tuple(s for s in stop_strings if s)   # an empty stop string cannot be matched
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.sent = 0                      # characters sent
        self._detok = Detokenizer(decode)
        self._pieces: list[str] = []       # the final text, in pieces (joined when read)
        self._unsent = ""                  # the end of the final text not sent yet (at most the hold-back)
        self._tail = ""                    # decoded text that may still change (a trailing U+FFFD)
        self._tables = [_failure(s) for s in self.stop_strings]
        self._states = [0] * len(self.stop_strings)

    @property
    def text(self) -> str:
        """The reply's text so far (without a stop string and what followed it)."""
        return "".join(self._pieces) + self._tail

    def push(self, token: int) -> str:
        if self.finish_reason is not None:
            return ""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self.flush()
        self.tokens.append(token)
        new, self._tail = self._detok.push(token)
        if self.stop_strings:
            cut = self._match(new)
            if cut is not None:             # keep the text before the stop string; drop the rest
                self.finish_reason, self._tail = "stop", ""
                if cut >= 0:
                    self._append(new[:cut])
                else:                       # it began in text held back (unsent) at earlier pushes
                    self._drop(-cut)
                return self.flush()
        self._append(new)
        hold = max(self._states, default=0)
        delta = self._unsent[:max(len(self._unsent) - hold, 0)]
        self._unsent = self._unsent[len(delta):]
        self.sent += len(delta)
        return delta

    def flush(self) -> str:
        """All text not sent yet (at the end of generation)."""
        delta = self._unsent + self._tail
        if self._tail:
            self._pieces.append(self._tail)
            self._tail = ""
        self._unsent = ""
        self.sent += len(delta)
        return delta

    def _match(self, new: str) -> int | None:
        """Feed ``new`` to every stop string's matcher; the index in ``new`` where the earliest completed
        stop string starts (negative: it starts in text held back before ``new``), or None."""
        first = None
        for j, (s, f) in enumerate(zip(self.stop_strings, self._tables)):
            k = self._states[j]
            for i, c in enumerate(new):
                while k and c != s[k]:
                    k = f[k - 1]
                if c == s[k]:
                    k += 1
                if k == len(s):
                    start = i + 1 - len(s)
                    first = start if first is None else min(first, start)
                    break
            self._states[j] = k
        return first

    def _append(self, new: str):
        if new:
            self._pieces.append(new)
            self._unsent += new

    def _drop(self, n: int):
        """Remove the last ``n`` characters of the final text (all held back, so none was sent)."""
        self._unsent = self._unsent[:len(self._unsent) - n]
        while n:
            last = self._pieces.pop()
            if len(last) > n:
                self._pieces.append(last[:len(last) - n])
                break
            n -= len(last)


# ---- tool calls -------------------------------------------------------------------------------------
# <tool_call>{...}</tool_call> per call (Hermes, Qwen, our default) or <tool_calls>[{...}, ...]</tool_calls>
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_TOOL_CALLS = re.compile(r"<tool_calls>\s*(.*?)\s*(?:</tool_calls>|$)", re.DOTALL)
TOOL_CALL_MARKERS = ("<tool_call>", "<tool_calls>")


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """Split generated text into (content, OpenAI-style tool calls). Text that does not hold a
    well-formed call ({"name": str, "arguments": object}) stays content, so nothing is lost."""
    calls: list[dict] = []
    spans = []
    for pattern, is_list in ((_TOOL_CALLS, True), (_TOOL_CALL, False)):
        for m in pattern.finditer(text):
            if any(a <= m.start() < b for a, b in spans):
                continue
            try:
                payload = json.loads(m.group(1))
            except json.JSONDecodeError:
                continue
            items = payload if is_list and isinstance(payload, list) else [payload]
            parsed = [_as_call(x) for x in items]
            if parsed and all(parsed):
                calls.extend(parsed)
                spans.append((m.start(), m.end()))
    if not calls:
        return text, []
    content = text
    for a, b in sorted(spans, reverse=True):
        content = content[:a] + content[b:]
    # the text around the calls is kept as generated (streaming has already sent it that way)
    return content if content.strip() else None, calls


def _as_call(x) -> dict | None:
    if not isinstance(x, dict) or not isinstance(x.get("name"), str):
        return None
    args = x.get("arguments", x.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": x["name"], "arguments": json.dumps(args, ensure_ascii=False)}}
