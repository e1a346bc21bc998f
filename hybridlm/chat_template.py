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

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


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
        """The prompt text of a conversation; a template error (``raise_exception``) raises ValueError."""
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
        try:
            return self._compiled[name].render(messages=clean, tools=tools or None, documents=documents,
                                               add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template refused the conversation: {e}") from None


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
@dataclass
class TextStream:
    """Generated ids -> text deltas that are safe to send: text that could still become a stop string,
    and a trailing incomplete UTF-8 character (decoded as U+FFFD), are held back until resolved.

    ``push`` returns the new text; ``finish_reason`` becomes "stop" at a stop token or stop string
    (neither is part of the text)."""
    decode: Callable[[list[int]], str]
    stop_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish_reason: str | None = None

    def push(self, token: int) -> str:
        if self.finish_reason is not None:
            return ""
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return self.flush()
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        if self.stop_strings:
            # only the unsent tail (plus room for a stop string straddling it) can hold a new match
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

    def flush(self) -> str:
        """All text not sent yet (at the end of generation)."""
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta


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
