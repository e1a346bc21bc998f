"""The OpenAI-compatible server, exercised with the official ``openai`` client against a live uvicorn
server on 127.0.0.1 (chat, streaming, completions, concurrency, bad requests, prompt-state reuse),
plus the engine's batching, tool calls, disconnects, graceful shutdown and the ``serve`` command."""
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from hybridlm import HybridLM, preset  # noqa: E402
from hybridlm.chat_template import ChatFormat  # noqa: E402
from hybridlm.generate import Sampling, decode_step, generate, prefill  # noqa: E402
from hybridlm.prefix_cache import PrefixCache  # noqa: E402
from hybridlm.cache import Cache  # noqa: E402
from hybridlm.serve import Engine, Job, Limits, create_app  # noqa: E402
from hybridlm.tokenizer import load_tokenizer  # noqa: E402
from tests.test_chat import ZEPHYR, make_chat_checkpoint  # noqa: E402

MODEL = "tiny-chat"
CONTEXT = 512


class LiveServer:
    """uvicorn in a background thread on 127.0.0.1, on a port the OS picks."""

    def __init__(self, app, **config):
        import uvicorn
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    timeout_graceful_shutdown=20, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.set_num_threads(1)
    return make_chat_checkpoint(tmp_path_factory.mktemp("serve") / "ckpt")


@pytest.fixture(scope="module")
def model(ckpt):
    return HybridLM.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def live(ckpt, model):
    app = create_app(model, load_tokenizer(ckpt), name=MODEL, checkpoint_dir=ckpt, prefix_cache=PrefixCache(64 << 20),
                     limits=Limits(context=CONTEXT, max_new_tokens=64, max_body_bytes=64 << 10))
    server = LiveServer(app)
    yield server, app
    server.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0].url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, content, **kw):
    kw = {"max_tokens": 8, "temperature": 0, **kw}
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    health = httpx.get(live[0].url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_chat_completion(client, ckpt, model):
    r = chat(client, "hello world", max_tokens=6)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    fmt = ChatFormat.from_dir(ckpt)
    ids = fmt.encode_chat([{"role": "user", "content": "hello world"}]).ids
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the server's text is what greedy generation gives in process
    out = generate(model, torch.tensor([ids]), max_new_tokens=6, stop_token_ids=fmt.stop_ids)[0, len(ids):].tolist()
    stop = next((i for i, t in enumerate(out) if t in fmt.stop_ids), None)
    out = out if stop is None else out[:stop + 1]
    assert r.usage.completion_tokens == len(out)   # the end-of-turn token counts, as with OpenAI
    want = [t for t in out if t not in fmt.stop_ids]
    assert choice.message.content == fmt.tokenizer.decode(want, skip_special_tokens=True)


def test_streaming_equals_non_streaming_under_greedy(client):
    for content in ("tell me about the fox", "the lazy dog"):
        full = chat(client, content, max_tokens=12)
        chunks = list(chat(client, content, max_tokens=12, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == full.choices[0].message.content
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == [full.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # completions too
    plain = client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=10, temperature=0)
    streamed = client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=10, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_completions(client, ckpt):
    tok = load_tokenizer(ckpt)
    r = client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode("the quick brown")) and r.usage.completion_tokens == 5
    echo = client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=5, temperature=0, echo=True)
    assert echo.choices[0].text == "the quick brown" + r.choices[0].text
    ids = client.completions.create(model=MODEL, prompt=tok.encode("the quick brown"), max_tokens=5, temperature=0)
    assert ids.choices[0].text == r.choices[0].text
    many = client.completions.create(model=MODEL, prompt=["the quick brown", "hello"], max_tokens=3, temperature=0,
                                     n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text == many.choices[1].text
    # greedy: 3 tokens begin what 5 tokens say (up to a character the third token leaves incomplete)
    assert r.choices[0].text.startswith(many.choices[0].text.rstrip("\ufffd"))
    assert many.usage.prompt_tokens == len(tok.encode("the quick brown")) + len(tok.encode("hello"))
    # a stop string ends the text before it
    if len(r.choices[0].text) > 2:
        cut = r.choices[0].text[2:4]
        stopped = client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=5, temperature=0,
                                            stop=[cut])
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == r.choices[0].text[:r.choices[0].text.index(cut)]


def test_seeded_sampling_is_reproducible(client):
    a = chat(client, "pick words", temperature=1.0, top_p=0.9, seed=7, max_tokens=10)
    b = chat(client, "pick words", temperature=1.0, top_p=0.9, seed=7, max_tokens=10)
    assert a.choices[0].message.content == b.choices[0].message.content
    c = [chat(client, "pick words", temperature=1.5, seed=s, max_tokens=10).choices[0].message.content
         for s in (1, 2, 3)]
    assert len(set(c)) > 1


def test_sixteen_concurrent_requests(live, client):
    prompts = [f"question number {i}: what about the fox?" for i in range(16)]
    alone = {p: chat(client, p, max_tokens=10).choices[0].message.content for p in prompts[:4]}
    before = live[1].state.engine.max_rows_seen
    live[1].state.engine.max_rows_seen = 0
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: chat(client, p, max_tokens=10), prompts))
    assert all(r.choices[0].finish_reason in ("stop", "length") for r in results)
    # decoded together, in one batch, and each row got what it gets alone
    assert live[1].state.engine.max_rows_seen > 1
    live[1].state.engine.max_rows_seen = max(before, live[1].state.engine.max_rows_seen)
    for p, r in zip(prompts, results):
        if p in alone:
            assert r.choices[0].message.content == alone[p]
    assert len({r.id for r in results}) == 16


BAD_BODIES = [
    ("{not json", 400, "invalid_json", None),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), 400, "missing_required_parameter", "model"),
    (json.dumps({"model": MODEL}), 400, "missing_required_parameter", "messages"),
    ("[]", 400, "invalid_value", None),
    (json.dumps({"model": MODEL, "messages": [{"role": "user"}]}), 400, "missing_required_parameter",
     "messages.0.content"),
    (json.dumps({"model": MODEL, "messages": "hi"}), 400, "invalid_value", "messages"),
    (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}), 400, "invalid_value",
     "messages.0.role"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}), 400,
     "invalid_value", "temperature"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}), 400,
     "invalid_value", "max_tokens"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}), 400,
     "invalid_value", "max_tokens"),
    (json.dumps({"model": MODEL, "messages": [], "max_tokens": 5}), 400, "invalid_value", "messages"),
    (json.dumps({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}), 404, "model_not_found", "model"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "the fox " * 300}]}), 400,
     "context_length_exceeded", "messages"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60,
                 "stop": [""]}), 400, "invalid_value", "stop"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
                 "tools": [{"type": "function", "function": {"name": "f"}}]}), 400, "unsupported_parameter",
     "tool_choice"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (70 << 10)}]}), 413,
     "request_too_large", None),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(live, client):
    url = live[0].url
    for body, status, code, param in BAD_BODIES:
        r = httpx.post(url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == status, (body[:80], r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["param"] == param and err["message"], (body[:80], err)
        assert err["type"] == "invalid_request_error"
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": [10**6], "max_tokens": 2})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    r = httpx.get(url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    # the same mistakes through the official client raise its typed errors
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        chat(client, "the fox " * 300)
    with pytest.raises(openai.BadRequestError):
        chat(client, "hi", max_tokens=-1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=CONTEXT)
    # and it still serves
    assert chat(client, "still there?", max_tokens=3).choices[0].finish_reason in ("stop", "length")


def test_next_turn_reuses_the_conversation_state(client):
    history = [{"role": "system", "content": "You are a helpful assistant. " * 6},
               {"role": "user", "content": "What is the weather in Paris?"}]
    t1 = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0)
    history += [{"role": "assistant", "content": t1.choices[0].message.content},
                {"role": "user", "content": "And tomorrow?"}]
    t2 = client.chat.completions.create(model=MODEL, messages=history, max_tokens=8, temperature=0)
    # turn 2 starts from the state after turn 1's prompt and reply when the reply's text tokenizes back to
    # the ids generated (the rule for a trained model; a random one often emits non-canonical splits),
    # else from the state after turn 1's prompt
    assert t2.usage.prompt_tokens_details.cached_tokens in (t1.usage.prompt_tokens + t1.usage.completion_tokens,
                                                            t1.usage.prompt_tokens)
    # another conversation with the same system prompt reuses the system prompt's state
    other = client.chat.completions.create(model=MODEL, messages=[history[0], {"role": "user", "content": "Hi"}],
                                           max_tokens=2, temperature=0)
    assert 30 < other.usage.prompt_tokens_details.cached_tokens < other.usage.prompt_tokens


def test_client_disconnect_frees_the_row(live):
    engine = live[1].state.engine
    with httpx.stream("POST", live[0].url + "/v1/chat/completions",
                      json={"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 60,
                            "temperature": 0, "stream": True,
                            "logit_bias": {str(i): -100 for i in live[1].state.served.fmt.stop_ids}}) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
    deadline = time.time() + 10
    while engine.load() and time.time() < deadline:
        time.sleep(0.05)
    assert engine.load() == 0


# ---- in process: engine batching, tool calls, shutdown ------------------------------------------------
@pytest.mark.parametrize("layout", ["mMaMwMmM", "mMaMmMaM"])
def test_gather_keeps_each_rows_state(layout):
    """Rows gathered from caches of different lengths decode exactly as they do alone."""
    torch.manual_seed(0)
    m = HybridLM(preset("tiny", vocab_size=101, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                        num_key_value_heads=1, mamba_d_state=8, layout=layout, sliding_window=6)).init_weights(0)
    prompts = [torch.randint(0, 101, (1, n)) for n in (9, 3, 14)]
    alone, parts = [], []
    for p in prompts:
        c = m.new_cache(1, 40)
        logits = prefill(m, c, p)
        parts.append((c, 0))
        steps, tok, c2 = [], logits.argmax(-1), m.new_cache(1, 40)
        c2.restore(c.snapshot())
        for _ in range(8):
            steps.append(int(tok))
            tok = decode_step(m, c2, tok).argmax(-1)
        alone.append(steps)
    batch = Cache.gather(parts, room=10)
    tok = torch.tensor([a[0] for a in alone])
    out = [[] for _ in prompts]
    for step in range(8):
        for i in range(3):
            out[i].append(int(tok[i]))
        logits = decode_step(m, batch, tok)
        tok = logits.argmax(-1)
        if step == 3:   # a row leaves halfway: the survivors are gathered again, left padding dropped
            batch = Cache.gather([(batch, 0), (batch, 1), (batch, 2)], room=10)
    assert out == alone


def test_engine_keeps_the_state_after_each_reply(model, ckpt):
    tok = load_tokenizer(ckpt)
    store = PrefixCache()
    engine = Engine(model, tok, Limits(context=CONTEXT), store)
    done = threading.Event()
    engine.start()
    try:
        first = Job(tok.encode("the quick brown fox"), 6, Sampling(0.0), lambda e: e[0] == "end" and done.set())
        engine.submit([first])
        assert done.wait(30)
        done.clear()
        # a continuation of prompt + reply (token ids, as a completions client may send) reuses all of it
        ended = []
        follow = Job(first.ids + first.generated + tok.encode(" and more"), 2, Sampling(0.0),
                     lambda e: e[0] == "end" and (ended.append(e), done.set()))
        engine.submit([follow])
        assert done.wait(30)
    finally:
        engine.stop()
    assert ended[0][4] == len(first.ids) + len(first.generated)


def test_engine_rows_joining_at_different_times_match_alone(model, ckpt):
    tok = load_tokenizer(ckpt)
    prompts = [tok.encode(t) for t in ("the quick brown fox", "hello", "def add(a, b):\n    return a + b")]
    new = [40, 24, 12]
    alone = [generate(model, torch.tensor([p]), max_new_tokens=n)[0, len(p):].tolist() for p, n in zip(prompts, new)]
    engine = Engine(model, tok, Limits(context=CONTEXT, prefill_slice=4), store=None)
    events = []
    got = threading.Event()
    submitted = [0]

    def submit(i):
        submitted[0] = i + 1
        engine.submit([Job(prompts[i], new[i], Sampling(0.0), emit, index=i)])

    def emit(e):
        events.append(e)
        # the next prompt arrives on the previous one's first text: while it is still decoding
        if e[0] == "text" and e[1] == submitted[0] - 1 and submitted[0] < len(prompts):
            submit(submitted[0])
        if sum(x[0] == "end" for x in events) == len(prompts):
            got.set()
    engine.start()
    try:
        submit(0)
        assert got.wait(60)
    finally:
        engine.stop()
    texts = ["".join(e[2] for e in events if e[0] == "text" and e[1] == i) for i in range(len(prompts))]
    assert texts == [tok.decode(a, skip_special_tokens=True) for a in alone]
    assert engine.max_rows_seen >= 2


class Scripted(torch.nn.Module):
    """The tiny model, except that after each prompt its logits spell out ``script`` (batch of one)."""

    def __init__(self, base, script):
        super().__init__()
        self.base, self.config, self.script, self.start = base, base.config, script, 0

    def new_cache(self, *args, **kw):
        return self.base.new_cache(*args, **kw)

    def fingerprint(self):
        return self.base.fingerprint()

    def forward(self, input_ids, cache=None, mask=None, last_only=False):
        logits = self.base(input_ids, cache, mask, last_only)
        if input_ids.shape[1] > 1:   # a prompt: the script starts after it
            self.start = int(cache.seen[0])
        k = min(int(cache.seen[0]) - self.start, len(self.script) - 1)
        forced = torch.full_like(logits[:, -1], -1e4)
        forced[:, self.script[k]] = 1e4
        logits[:, -1] = forced
        return logits


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_tool_calls(model, ckpt):
    from fastapi.testclient import TestClient
    fmt = ChatFormat.from_dir(ckpt)
    script = fmt.encode('Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>')
    app = create_app(Scripted(model, script + [fmt.stop_ids[0]]), chat_format=fmt, name=MODEL,
                     limits=Limits(context=CONTEXT, max_new_tokens=len(script) + 1))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "weather in Paris?"}], "tools": TOOLS,
            "max_tokens": len(script) + 1, "temperature": 0}
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json=body).json()
        choice = r["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Checking. "
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        # streamed: content first, then one tool_calls delta, then finish_reason "tool_calls"
        r = c.post("/v1/chat/completions", json={**body, "stream": True})
        chunks = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
        deltas = [ch["choices"][0]["delta"] for ch in chunks]
        assert "".join(d.get("content") or "" for d in deltas) == "Checking. "
        calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
        assert len(calls) == 1 and calls[0][0]["function"]["name"] == "get_weather" and calls[0][0]["index"] == 0
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        assert r.text.endswith("data: [DONE]\n\n")
        # the conversation continues with the tool's answer (arguments sent back as a JSON string)
        follow = {**body, "messages": body["messages"] + [
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}]}
        assert c.post("/v1/chat/completions", json=follow).status_code == 200
        # tool_choice none: no tools in the prompt, no parsing
        r = c.post("/v1/chat/completions", json={**body, "tool_choice": "none"}).json()
        assert r["choices"][0]["finish_reason"] == "stop" and "<tool_call>" in r["choices"][0]["message"]["content"]


def test_tools_refused_when_the_template_cannot_show_them(tmp_path, model):
    from fastapi.testclient import TestClient
    d = make_chat_checkpoint(tmp_path / "zephyr", chat_template=ZEPHYR)
    app = create_app(model, load_tokenizer(d), checkpoint_dir=d, name=MODEL)
    with TestClient(app) as c:
        r = c.post("/v1/chat/completions", json={"model": MODEL, "tools": TOOLS, "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "tools_unsupported"
        r = c.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2,
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200


def test_graceful_shutdown_finishes_open_requests(model, ckpt):
    app = create_app(model, load_tokenizer(ckpt), checkpoint_dir=ckpt, name=MODEL,
                     limits=Limits(context=CONTEXT, max_new_tokens=64))
    server = LiveServer(app)
    stops = {str(i): -100 for i in ChatFormat.from_dir(ckpt).stop_ids}
    result = {}

    def request():
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = chat(client, "a long answer please", max_tokens=40, stream=True, logit_bias=stops,
                      stream_options={"include_usage": True})
        result["chunks"] = [c for c in stream]

    t = threading.Thread(target=request)
    t.start()
    deadline = time.time() + 30
    while app.state.engine.steps < 3 and time.time() < deadline:
        time.sleep(0.01)
    server.stop()   # as Ctrl-C does: stop accepting, finish what is open, then end the model thread
    t.join(30)
    assert not server.thread.is_alive() and not app.state.engine._thread.is_alive()
    chunks = result["chunks"]
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 40


# ---- the command ----------------------------------------------------------------------------------------
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command(ckpt):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "hybridlm", "serve", "--model", str(ckpt), "--port", str(port),
                             "--threads", "1", "--log-level", "warning"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "serve did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        (card,) = client.models.list().data
        assert card.id == ckpt.name
        r = client.chat.completions.create(model=card.id, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.choices[0].message.content is not None
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"serving {ckpt.name} on http://127.0.0.1:{port}/v1" in out


def test_serve_command_errors(tmp_path, capsys):
    from hybridlm.cli import main
    with pytest.raises(SystemExit) as e:
        main(["serve"])
    assert e.value.code == 2 and "give the model" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "neither a checkpoint directory nor a preset" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path)]) == 2
    assert "not a Jamba checkpoint" in capsys.readouterr().err
    assert main(["serve", "--model", "tiny"]) == 2
    assert "is a preset" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["serve", "--model", str(tmp_path), "--port", "http"])
    assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err
