"""An OpenAI-compatible HTTP server: /v1/models, /v1/completions, /v1/chat/completions, /health.

Structure: this file is HTTP and OpenAI's formats only. The event loop (FastAPI on uvicorn) parses and
validates requests, renders the chat template and tokenizes in a worker thread, and hands each
completion (a ``Job``) to the ``Engine`` (engine.py: the package's one generator), which owns the model
on one thread of its own, batches the requests, lets them join and leave the batch at any step and
prefills long prompts in slices between decode steps. Tokens come back as text deltas through an
asyncio queue per HTTP request, so the event loop never waits on the model.

Prompt-state reuse (``prefix_cache``): each prompt starts from the longest stored prefix state; the
states at message boundaries, at the end of each prompt and after each reply are stored, so the next
turn of a conversation, or another request of the same client with the same system prompt or
document, skips most of its prefill. ``usage.prompt_tokens_details.cached_tokens`` reports how many
prompt tokens were reused.
Prompts are always tokenized afresh (a cache must not change results), so the state after a reply
serves the next turn when the reply's text tokenizes back to the ids generated, which is the rule for
a trained model; otherwise the turn continues from the state after the previous prompt.
With ``serve --prefix-cache-dir`` the states are also written to disk (``prefix_cache.SnapshotDir``), so a
restarted server answers the next turn of a conversation without reading it again.

Clients are told apart by API key (the Authorization header), else by address (``client_id``). A
client's prompt states are stored in its own part of the prefix cache, so ``cached_tokens`` (or the time
to a first token) never tells one client what another sent. Each client may hold ``max_client_jobs`` of
the queue, and waiting jobs take batch rows in turns between clients (``engine.Engine._admit``).

Errors follow OpenAI's format, ``{"error": {"message", "type", "param", "code"}}``, with 400 for
invalid requests and prompts past the context, 404 for an unknown model or route, 408 for a body that
does not arrive in time, 413 for an oversized body, 429 when the client holds its share of the queue,
503 when the queue is full. A failure while generating fails that request alone: a 500, or in a stream
an error event and the end of the stream.
"""
# no `from __future__ import annotations`: FastAPI reads the handlers' annotations (``Request``, imported
# inside create_app) as objects
import asyncio
import hashlib
import json
import logging
import secrets
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache

from .chat_template import TOOL_CALL_MARKERS, ChatFormat, Prompt, parse_tool_calls
from .engine import Engine, Job, Limits, Overloaded, RateLimited
from .generate import Sampling
from .prefix_cache import PrefixCache
from .speculative import Speculative, for_request

log = logging.getLogger("hybridlm.serve")


# ---- HTTP ---------------------------------------------------------------------------------------------
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@lru_cache(maxsize=1)
def _schemas():
    """Request models, built on first use so that ``hybridlm --help`` does not import pydantic."""
    from typing import Any, Literal

    from pydantic import BaseModel, ConfigDict, Field

    class Open(BaseModel):
        # unknown fields are ignored (clients send vendor fields), but known ones are type-checked strictly
        model_config = ConfigDict(extra="allow", strict=True)

    class FunctionCall(Open):
        name: str
        arguments: str | dict = "{}"

    class ToolCall(Open):
        id: str = ""
        type: Literal["function"] = "function"
        function: FunctionCall

    class ContentPart(Open):
        type: str
        text: str | None = None

    class Message(Open):
        role: Literal["system", "developer", "user", "assistant", "tool"]
        content: str | list[ContentPart] | None = None
        name: str | None = None
        tool_calls: list[ToolCall] | None = None
        tool_call_id: str | None = None

    class FunctionDef(Open):
        name: str
        description: str | None = None
        parameters: dict | None = None

    class Tool(Open):
        type: Literal["function"]
        function: FunctionDef

    class StreamOptions(Open):
        include_usage: bool = False

    class Common(Open):
        model: str
        max_tokens: int | None = Field(default=None, ge=1)
        temperature: float = Field(default=1.0, ge=0, le=2)
        top_p: float = Field(default=1.0, gt=0, le=1)
        top_k: int = Field(default=0, ge=0)                           # extension (vLLM, llama-server)
        # extension; bounded so that logits / penalty stays finite in fp32
        repetition_penalty: float = Field(default=1.0, ge=0.01, le=100)
        presence_penalty: float = Field(default=0.0, ge=-2, le=2)
        frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
        logit_bias: dict[str, float] | None = None
        n: int = Field(default=1, ge=1, le=16)
        stream: bool = False
        stream_options: StreamOptions | None = None
        stop: str | list[str] | None = None
        seed: int | None = Field(default=None, ge=-2**63, le=2**63 - 1)   # torch's generators take 64 bits
        user: str | None = None
        # extension: speculative decoding (speculative.for_request says what it takes; checked there)
        speculative: Any = None

    class ChatRequest(Common):
        messages: list[Message] = Field(min_length=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)
        tools: list[Tool] | None = None
        tool_choice: Literal["none", "auto", "required"] | dict | None = None
        logprobs: bool | None = None
        response_format: dict | None = None

    class CompletionRequest(Common):
        prompt: str | list[str] | list[int] | list[list[int]]
        max_tokens: int | None = Field(default=16, ge=1)               # OpenAI's default for completions
        echo: bool = False
        logprobs: int | None = None
        suffix: str | None = None
        best_of: int | None = None

    return ChatRequest, CompletionRequest


def _validation_error(e) -> APIError:
    err = e.errors()[0]
    if err["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err['msg'])}",
                        code="invalid_json")
    param = ".".join(str(x) for x in err["loc"]) or None
    if param is None:
        return APIError(400, f"the request body must be a JSON object: {err['msg']}", code="invalid_value")
    if err["type"] == "missing":
        return APIError(400, f"missing required parameter '{param}'", param, "missing_required_parameter")
    got = err.get("input")
    got = "" if isinstance(got, (dict, list)) else f" (got {json.dumps(got) if got is not None else 'null'})"
    return APIError(400, f"invalid value for '{param}': {err['msg']}{got}", param, "invalid_value")


@dataclass
class Served:
    """What the HTTP layer needs besides the engine."""
    name: str
    fmt: ChatFormat
    limits: Limits
    created: int = field(default_factory=lambda: int(time.time()))
    fingerprint: str = ""
    speculative: Speculative | None = None   # for requests that do not say (serve --speculative)


def create_app(model, tokenizer=None, name: str = "hybridlm", chat_format: ChatFormat | None = None,
               limits: Limits | None = None, prefix_cache: PrefixCache | None = None, checkpoint_dir=None,
               speculative: Speculative | None = None):
    """The FastAPI app serving ``model``. Give ``chat_format`` (tokenizer + chat template + stop tokens),
    or a ``tokenizer`` and a ``checkpoint_dir`` to read the template from (the default ChatML template
    when it has none). ``speculative``: how requests that do not say speculate, and the draft model those
    that ask for "draft" use. The engine thread starts and stops with the app's lifespan."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if chat_format is None:
        if tokenizer is None:
            raise ValueError("create_app needs a tokenizer or a chat_format")
        chat_format = ChatFormat.from_dir(checkpoint_dir, tokenizer)
    fmt = chat_format
    limits = limits or Limits(context=model.config.max_position_embeddings)
    engine = Engine(model, fmt.tokenizer, limits, prefix_cache)
    if speculative is not None:
        speculative.check(model)
    served = Served(name, fmt, limits, fingerprint="fp_" + model.fingerprint()[:10], speculative=speculative)
    ChatRequest, CompletionRequest = _schemas()

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            # uvicorn has already waited for open requests (graceful shutdown); end the model thread, then
            # finish writing the prompt states queued for disk
            await asyncio.to_thread(engine.stop)
            if prefix_cache is not None:
                await asyncio.to_thread(prefix_cache.close)

    app = FastAPI(title="hybridlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.served, app.state.prefix_cache = engine, served, prefix_cache
    app.add_middleware(_InternalErrors)
    # with states on disk, the key that scopes them to clients must outlive the process, or a restarted
    # server would never find a client's stored prompts again
    disk = prefix_cache.disk if prefix_cache is not None else None
    client_key = disk.secret() if disk is not None else secrets.token_bytes(16)

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        msg = {404: f"unknown route {request.method} {request.url.path}; this server has /v1/models, "
                    f"/v1/completions, /v1/chat/completions, /health",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, msg, code=code).body(), status_code=e.status_code)

    async def read_json(request: Request, schema):
        from pydantic import ValidationError
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limits.max_body_bytes}",
                           code="request_too_large")

        async def read() -> bytearray:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    raise APIError(413, f"request body exceeds the limit of {limits.max_body_bytes} bytes",
                                   code="request_too_large")
            return body
        try:
            body = await asyncio.wait_for(read(), limits.read_timeout)
        except asyncio.TimeoutError:
            # the rest of the body may still come: close the connection rather than read it as the next request
            raise APIError(408, f"the request body did not arrive within {limits.read_timeout:g} s",
                           code="request_timeout", headers={"Connection": "close"}) from None
        if not body:
            raise APIError(400, "the request has no body; send a JSON object", code="invalid_json")
        try:
            req = schema.model_validate_json(bytes(body))
        except ValidationError as e:
            raise _validation_error(e) from None
        if req.model != served.name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{served.name}'",
                           "model", "model_not_found")
        return req

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "engine": engine.stats(),
                "prefix_cache": prefix_cache.stats() if prefix_cache is not None else None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str):
        if model_id != served.name:
            raise APIError(404, f"the model '{model_id}' does not exist; this server serves '{served.name}'",
                           "model", "model_not_found")
        return _model_card(served)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_json(request, ChatRequest)
        messages, tools = _chat_inputs(req, fmt)
        _check_jobs(1, req.n, limits)
        prompt = await asyncio.to_thread(_encode_chat, fmt, messages, tools)
        max_new = _max_new(req.max_completion_tokens or req.max_tokens, len(prompt.ids), limits)
        return await _respond(request, engine, served, req, [prompt], max_new, chat=True,
                              tools=bool(tools), client=client_id(request, client_key))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read_json(request, CompletionRequest)
        for param, bad in (("logprobs", req.logprobs is not None), ("suffix", req.suffix is not None),
                           ("best_of", req.best_of not in (None, 1))):
            if bad:
                raise APIError(400, f"'{param}' is not supported by this server", param, "unsupported_parameter")
        one = isinstance(req.prompt, str) or bool(req.prompt) and isinstance(req.prompt[0], int)
        _check_jobs(1 if one else len(req.prompt), req.n, limits)   # before tokenizing them
        prompts = await asyncio.to_thread(_encode_prompts, fmt, req.prompt, model.config.vocab_size)
        max_new = min(_max_new(req.max_tokens, len(p.ids), limits) for p in prompts)
        return await _respond(request, engine, served, req, prompts, max_new, chat=False, tools=False,
                              client=client_id(request, client_key))

    return app


class _InternalErrors:
    """ASGI middleware: an unexpected exception becomes a 500 in OpenAI's format. (Starlette's handler for
    ``Exception`` answers and then raises again, so uvicorn closes the client's keep-alive connection;
    this answers and stops there.)"""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_)
        except Exception as e:
            if started:   # too late for a status: end the response the only way left
                raise
            from fastapi.responses import JSONResponse
            log.exception("request failed")
            err = APIError(500, f"internal server error: {type(e).__name__}: {e}", code="internal_error",
                           type_="server_error")
            await JSONResponse(err.body(), status_code=500)(scope, receive, send)


def client_id(request, key: bytes) -> int:
    """Who sent ``request``, as a 48-bit number: its API key (the Authorization header) or, without one,
    its address. A hash keyed by a per-server secret, so the number says nothing about the key."""
    auth = request.headers.get("authorization")
    who = f"key {auth}" if auth else f"addr {request.client.host if request.client else ''}"
    return int.from_bytes(hashlib.blake2b(who.encode(), key=key, digest_size=6).digest(), "big")


def _check_jobs(prompts: int, n: int, limits: Limits):
    if prompts * n > limits.max_request_jobs:
        raise APIError(400, f"this request asks for {prompts * n} completions ({prompts} prompts x n={n}); this "
                            f"server allows at most {limits.max_request_jobs} per request (serve --max-request-jobs)",
                       "n" if n > 1 else "prompt", "too_many_completions")


def _model_card(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "hybridlm",
            "max_model_len": served.limits.context}


def _text_content(content, i: int) -> str | None:
    if content is None or isinstance(content, str):
        return content
    parts = []
    for k, p in enumerate(content):
        if p.type != "text" or p.text is None:
            raise APIError(400, f"content part of type '{p.type}' is not supported (text only)",
                           f"messages.{i}.content.{k}.type", "unsupported_content")
        parts.append(p.text)
    return "".join(parts)


def _chat_inputs(req, fmt: ChatFormat) -> tuple[list[dict], list[dict] | None]:
    if req.n != 1 and req.stream and req.tools:
        raise APIError(400, "streaming tool calls with n > 1 is not supported", "n", "unsupported_parameter")
    if req.logprobs:
        raise APIError(400, "'logprobs' is not supported by this server", "logprobs", "unsupported_parameter")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {'type': 'text'} is supported (no constrained decoding)",
                       "response_format", "unsupported_parameter")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    if tools:
        choice = req.tool_choice if req.tool_choice is not None else "auto"
        if choice == "none":
            tools = None
        elif choice != "auto":
            raise APIError(400, "tool_choice 'required' or a named function would need constrained decoding, "
                                "which this server does not do; use 'auto' or 'none'", "tool_choice",
                           "unsupported_parameter")
        elif not fmt.template.supports_tools():
            raise APIError(400, f"this model's chat template ({fmt.template.origin}) does not support tools",
                           "tools", "tools_unsupported")
    messages = []
    for i, m in enumerate(req.messages):
        if m.content is None and m.role != "assistant":
            raise APIError(400, f"missing required parameter 'messages.{i}.content' (only assistant messages with "
                                f"tool_calls may omit it)", f"messages.{i}.content", "missing_required_parameter")
        d = m.model_dump(exclude_none=True)
        d["content"] = _text_content(m.content, i)
        if d["content"] is None:
            d.pop("content")
        for call in d.get("tool_calls", []):
            # templates expect arguments as an object (transformers' convention); OpenAI sends a JSON string
            args = call["function"].get("arguments")
            if isinstance(args, str):
                try:
                    call["function"]["arguments"] = json.loads(args) if args.strip() else {}
                except json.JSONDecodeError:
                    pass
        messages.append(d)
    return messages, tools


def _encode_chat(fmt: ChatFormat, messages, tools) -> Prompt:
    try:
        return fmt.encode_chat(messages, tools)
    except ValueError as e:
        raise APIError(400, str(e), "messages", "invalid_messages") from None


def _encode_prompts(fmt: ChatFormat, prompt, vocab: int) -> list[Prompt]:
    """A completions ``prompt``: a string, strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        prompts = [Prompt(prompt, fmt.encode(prompt))]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [Prompt(None, list(prompt))]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = [Prompt(p, fmt.encode(p)) for p in prompt]
    else:
        prompts = [Prompt(None, list(p)) for p in prompt]
    if not prompts:
        raise APIError(400, "prompt is empty", "prompt", "invalid_value")
    for p in prompts:
        if not p.ids:
            raise APIError(400, "prompt has no tokens", "prompt", "invalid_value")
        bad = [t for t in p.ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt", "invalid_value")
    return prompts


def _max_new(requested: int | None, n_prompt: int, limits: Limits) -> int:
    room = limits.context - n_prompt
    if room <= 0:
        raise APIError(400, f"this model's maximum context length is {limits.context} tokens, but the prompt "
                            f"has {n_prompt} tokens; shorten it", "messages", "context_length_exceeded")
    if requested is None:
        return min(limits.max_new_tokens, room)
    if requested > limits.max_new_tokens:
        raise APIError(400, f"max_tokens is {requested} but this server allows at most {limits.max_new_tokens} "
                            f"new tokens per request (serve --max-new-tokens)", "max_tokens", "invalid_value")
    if requested > room:
        raise APIError(400, f"this model's maximum context length is {limits.context} tokens; you requested "
                            f"{n_prompt + requested} ({n_prompt} in the prompt, {requested} for the completion)",
                       "max_tokens", "context_length_exceeded")
    return requested


def _stops(req, fmt: ChatFormat, limits: Limits) -> tuple[str, ...]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > limits.max_stops or any(not 0 < len(s) <= limits.max_stop_chars for s in stop):
        raise APIError(400, f"stop must be up to {limits.max_stops} non-empty strings of at most "
                            f"{limits.max_stop_chars} characters", "stop", "invalid_value")
    return tuple(stop) + fmt.stop_strings


def _bias(req, vocab: int) -> dict[int, float]:
    out = {}
    for k, v in (req.logit_bias or {}).items():
        # ASCII digits only: "²".isdigit() is True but int("²") raises
        t = int(k) if k.isascii() and k.isdigit() and len(k) <= 12 else -1
        if not 0 <= t < vocab or not -100 <= v <= 100:
            raise APIError(400, f"logit_bias needs token ids in [0, {vocab}) and biases in [-100, 100]; "
                                f"got {k[:20]!r}: {v}", "logit_bias", "invalid_value")
        out[t] = v
    return out


async def _respond(request, engine: Engine, served: Served, req, prompts, max_new: int, chat: bool, tools: bool,
                   client: int | None = None):
    """Submit one job per (prompt, choice) and answer as one JSON body or as server-sent events. The jobs
    are cancelled when the client goes away, whether the answer streams or not."""
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    fmt = served.fmt
    try:
        stops, bias = _stops(req, fmt, served.limits), _bias(req, engine.model.config.vocab_size)
        sampling = Sampling(req.temperature, req.top_k, req.top_p, req.repetition_penalty, req.seed,
                            presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                            logit_bias=bias)
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_value") from None
    try:
        spec = for_request(req.speculative, served.speculative)
    except ValueError as e:
        raise APIError(400, str(e), "speculative", "invalid_value") from None
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(event):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:   # the event loop is gone (shutdown); nobody is listening
            pass

    jobs = []
    for p, prompt in enumerate(prompts):
        for c in range(req.n):
            # seed + c may pass 2**63 - 1: torch's generators take seeds up to 2**64 - 1
            s = sampling if req.seed is None or c == 0 else replace(sampling, seed=req.seed + c)
            jobs.append(Job(prompt.ids, max_new, s, emit, fmt.stop_ids, stops, index=p * req.n + c,
                            boundaries=prompt.boundaries, client=client, speculative=spec))
    kind = "chatcmpl" if chat else "cmpl"
    rid = f"{kind}-{secrets.token_hex(12)}"
    created = int(time.time())
    prompt_tokens = sum(len(p.ids) for p in prompts)
    echo = getattr(req, "echo", False)
    prompt_texts = [p.text if p.text is not None else engine.decode(p.ids) for p in prompts] if echo else []
    try:
        engine.submit(jobs)
    except RateLimited as e:
        raise APIError(429, str(e), code="rate_limit_exceeded", type_="requests") from None
    except Overloaded as e:
        raise APIError(503, str(e), code="overloaded", type_="server_error") from None
    watcher = asyncio.ensure_future(_watch_disconnect(request, queue))

    def usage(done: dict) -> dict:
        completion = sum(d[1] for d in done.values())
        cached = sum(d[2] for i, d in done.items() if i % req.n == 0)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": cached}}

    def cancel():
        for j in jobs:
            j.cancelled = True

    if not req.stream:
        texts: dict[int, str] = {j.index: "" for j in jobs}
        done: dict[int, tuple] = {}
        try:
            while len(done) < len(jobs):
                event = await queue.get()
                if event[0] == "text":
                    texts[event[1]] += event[2]
                elif event[0] == "end":
                    done[event[1]] = event[2:]
                elif event[0] == "gone":
                    cancel()
                    return Response(status_code=499)   # nginx's "client closed request"; nobody reads it
                else:
                    raise APIError(500, event[2], code="engine_error", type_="server_error")
        except BaseException:
            cancel()
            raise
        finally:
            watcher.cancel()
        choices = []
        for i in sorted(texts):
            finish = done[i][0]
            if chat:
                message = {"role": "assistant", "content": texts[i]}
                if tools:
                    content, calls = parse_tool_calls(texts[i])
                    if calls:
                        message = {"role": "assistant", "content": content, "tool_calls": calls}
                        finish = "tool_calls"
                choices.append({"index": i, "message": message, "logprobs": None, "finish_reason": finish})
            else:
                text = (prompt_texts[i // req.n] if echo else "") + texts[i]
                choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish})
        body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": served.name, "system_fingerprint": served.fingerprint, "choices": choices,
                "usage": usage(done)}
        return JSONResponse(body)

    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, usage_=None) -> str:
        body = {"id": rid, "object": obj, "created": created, "model": served.name,
                "system_fingerprint": served.fingerprint, "choices": choices}
        if include_usage:
            body["usage"] = usage_
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def piece(i: int, text: str | None = None, finish: str | None = None, role: bool = False, calls=None) -> dict:
        if chat:
            delta = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif text is not None:
                delta = {"content": text}
            if calls:
                delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}

    def failed(message: str) -> str:   # OpenAI's way: an error event, then the stream ends
        err = APIError(500, message, code="engine_error", type_="server_error")
        return f"data: {json.dumps(err.body())}\n\ndata: [DONE]\n\n"

    async def events():
        done: dict[int, tuple] = {}
        held: dict[int, str] = {j.index: "" for j in jobs}   # text from a tool-call marker on, parsed at the end
        try:
            for j in jobs:
                if chat:
                    yield chunk([piece(j.index, role=True)])
                elif echo:
                    yield chunk([piece(j.index, prompt_texts[j.index // req.n])])
            while len(done) < len(jobs):
                event = await queue.get()
                if event[0] == "gone":
                    return
                i = event[1]
                if event[0] == "error":
                    yield failed(event[2])
                    return
                if event[0] == "text":
                    text = event[2]
                    if tools:
                        text, held[i] = _hold_tool_calls(held[i] + text)
                    if text:
                        yield chunk([piece(i, text)])
                    continue
                done[i] = event[2:]
                finish, calls = event[2], None
                if tools and held[i]:
                    content, calls = parse_tool_calls(held[i])
                    if calls:
                        finish = "tool_calls"
                        if content:
                            yield chunk([piece(i, content)])
                        yield chunk([piece(i, calls=calls)])
                    else:
                        yield chunk([piece(i, held[i])])
                yield chunk([piece(i, finish=finish)])
            if include_usage:
                yield chunk([], usage(done))
            yield "data: [DONE]\n\n"
        except Exception as e:   # the status is sent already: the error goes in the stream, the connection stays
            log.exception("streaming a response failed")
            yield failed(f"internal server error: {type(e).__name__}: {e}")
        finally:
            watcher.cancel()
            if len(done) < len(jobs):   # the client went away (or a job failed): free the rows
                cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _watch_disconnect(request, queue: asyncio.Queue):
    """Put ("gone",) on ``queue`` when the client disconnects. The body has been read, so the next ASGI
    message is the disconnect (as Starlette's StreamingResponse listens for it)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    queue.put_nowait(("gone",))


def _hold_tool_calls(text: str) -> tuple[str, str]:
    """Split streamed text into (send now, hold): from a tool-call marker (or what may become one) on,
    text is held until the end, when it is parsed into tool calls."""
    for marker in TOOL_CALL_MARKERS:
        at = text.find(marker)
        if at >= 0:
            return text[:at], text[at:]
    for k in range(max(map(len, TOOL_CALL_MARKERS)) - 1, 0, -1):
        if any(m.startswith(text[-k:]) for m in TOOL_CALL_MARKERS) and len(text) >= k:
            return text[:-k], text[-k:]
    return text, ""


# ---- the command --------------------------------------------------------------------------------------
def serve(model: str, host: str = "127.0.0.1", port: int = 8000, name: str = "", dtype: str = "auto",
          context: int = 0, max_new_tokens: int = 2048, max_batch: int = 16, max_queue: int = 256,
          max_body: str = "4MB", prefix_cache: str = "512MB", snapshot_every: int = 1024, threads: int = 0,
          log_level: str = "info", quantize: str = "", max_request_jobs: int = 16, max_client_jobs: int = 64,
          read_timeout: float = 30.0, prefix_cache_dir: str = "", prefix_cache_disk: str = "4GB",
          speculative: str = "", draft_k: int = 4) -> int:
    """Serve a checkpoint over the OpenAI API on /v1 (chat completions with streaming and tools, completions,
    models; /health); prompt states are kept and reused. Ctrl-C stops it after open requests finish.

    Requests are batched on one model thread; the hybrid state of each prompt and reply is kept in an
    in-memory LRU, so the next turn of a conversation, or a repeated system prompt or document, does not
    prefill that prefix again.

    Args:
        model: checkpoint directory (config.json, safetensors, tokenizer.json or tokenizer.model)
        host: interface to listen on (127.0.0.1: this machine only)
        port: TCP port
        name: model id clients send; empty: the directory name
        dtype: weight dtype: auto (the checkpoint's), bfloat16, float32
        quantize: quantize the weights while loading: int8, int4, or a spec such as int4:g32 (empty: off)
        context: longest prompt + completion in tokens; 0: the model's max_position_embeddings
        max_new_tokens: largest max_tokens a request may ask for
        max_batch: requests decoded together
        max_queue: requests waiting or running before new ones get 503
        max_request_jobs: completions (prompts x n) one request may ask for
        max_client_jobs: completions one client (API key, else address) may have waiting or running before
            its new requests get 429
        read_timeout: seconds a client has to send a request's head, and then its body
        max_body: largest request body, e.g. 4MB
        prefix_cache: memory for saved prompt states, e.g. 512MB (0 turns reuse off, unless on disk)
        prefix_cache_dir: also keep prompt states in this directory, so that a restarted server continues
            a conversation without reading it again (files of another model there are skipped)
        prefix_cache_disk: disk space for the states in --prefix-cache-dir, e.g. 4GB (least recently used
            ones are deleted)
        snapshot_every: also save the state every N tokens of a long prompt (0: only at message ends)
        threads: torch CPU threads (0: torch's default)
        log_level: uvicorn log level (debug, info, warning, error)
        speculative: speculative decoding for requests that do not say ("speculative" in a request: false,
            true, "lookup", "draft" or {"method": ..., "k": ...}): lookup or draft:PATH (a small model with the
            same tokenizer, which requests asking for "draft" use); same output, fewer forwards (empty: off)
        draft_k: tokens drafted per verifying forward with --speculative

    Examples:
        hybridlm serve --model ./out --port 8000
        curl -s 127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
            -d '{"model": "out", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'
    """
    from pathlib import Path

    import uvicorn

    from .checkpoint import load_model, parse_dtype
    from .cli import CLIError, set_threads
    from .config import PRESETS
    from .summary import parse_bytes
    if model in PRESETS:
        raise CLIError(f"'{model}' is a preset (random weights, no tokenizer); serve a checkpoint directory")
    if not 1 <= port <= 65535:
        raise CLIError(f"--port must be in 1..65535, got {port}")
    if min(max_request_jobs, max_client_jobs) < 1 or not read_timeout > 0:
        raise CLIError("--max-request-jobs and --max-client-jobs must be >= 1, --read-timeout > 0")
    set_threads(threads)
    m = load_model(model, dtype=parse_dtype(dtype), quantize=quantize)
    fmt = ChatFormat.from_dir(model)
    cap = m.config.max_position_embeddings
    if context < 0 or context > cap:
        raise CLIError(f"--context must be in 1..{cap} (the model's max_position_embeddings), got {context}")
    limits = Limits(context=context or cap, max_new_tokens=max_new_tokens, max_batch=max_batch,
                    max_queue=max_queue, max_body_bytes=parse_bytes(max_body), snapshot_every=snapshot_every,
                    max_request_jobs=max_request_jobs, max_client_jobs=max_client_jobs, read_timeout=read_timeout)
    budget = parse_bytes(prefix_cache)
    disk = None
    if prefix_cache_dir:
        from .prefix_cache import SnapshotDir
        try:
            disk = SnapshotDir(prefix_cache_dir, parse_bytes(prefix_cache_disk), m)
        except OSError as e:
            raise CLIError(f"--prefix-cache-dir {prefix_cache_dir}: {e}") from None
    store = PrefixCache(budget, disk) if budget > 0 or disk is not None else None
    served_name = name or Path(model).resolve().name
    from .speculative import from_flag
    try:
        spec = from_flag(speculative, draft_k, m, dtype)
    except ValueError as e:
        raise CLIError(str(e)) from None
    app = create_app(m, name=served_name, chat_format=fmt, limits=limits, prefix_cache=store, speculative=spec)
    print(f"serving {served_name} on http://{host}:{port}/v1 (chat template: {fmt.template.origin}; "
          f"context {limits.context}; prefix cache {prefix_cache if store is not None else 'off'}"
          + (f", on disk {prefix_cache_disk} in {disk.path} ({len(disk)} states)" if disk is not None else "")
          + (f"; speculative {speculative}, k {draft_k}" if spec is not None else "") + ")", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30,
                http=http_protocol(limits.read_timeout))
    return 0


def http_protocol(head_timeout: float):
    """uvicorn's h11 protocol with a deadline on each request's head (request line and headers).

    uvicorn times out only idle keep-alive connections, and not once a byte has come: a client that sends
    half a request line holds its connection for ever. The deadline runs from the connection (or the
    first byte after a response) to the complete head; the body has its own (``Limits.read_timeout``,
    in ``read_json``)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11(H11Protocol):
        _head_timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes):
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()   # the head is in: the app is reading the body or answering
            else:
                self._arm()

        def connection_lost(self, exc):
            self._disarm()
            super().connection_lost(exc)

        def _arm(self):
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(head_timeout, self._expire)

        def _disarm(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _expire(self):
            self._head_timer = None
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

    return TimedH11
