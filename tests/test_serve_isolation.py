"""The server against a hostile client (issue 16): a failure while serving one request fails that request
alone; out-of-range values are refused before they reach the model thread; one request or one client
cannot take the queue; work stops when its client goes away; slow heads and bodies time out; and the
prefix cache does not tell one client about another's prompts."""
import concurrent.futures
import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from hybridlm import HybridLM  # noqa: E402
from hybridlm.chat_template import ChatFormat  # noqa: E402
from hybridlm.generate import Sampling, sample  # noqa: E402
from hybridlm.prefix_cache import PrefixCache  # noqa: E402
from hybridlm.engine import Rows  # noqa: E402
from hybridlm.serve import Engine, Job, Limits, create_app, http_protocol  # noqa: E402
from hybridlm.tokenizer import load_tokenizer  # noqa: E402
from tests.test_chat import make_chat_checkpoint  # noqa: E402
from tests.test_serve import LiveServer  # noqa: E402

MODEL = "tiny-chat"
CONTEXT = 512


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.set_num_threads(1)
    return make_chat_checkpoint(tmp_path_factory.mktemp("isolation") / "ckpt")


@pytest.fixture(scope="module")
def model(ckpt):
    return HybridLM.from_pretrained(ckpt)


@pytest.fixture
def serve(ckpt, model):
    """serve(**limits) -> a live server on loopback; stopped at the end of the test."""
    servers = []

    def start(model_=None, prefix_cache=None, http=None, **limits):
        limits = Limits(**{"context": CONTEXT, "max_new_tokens": 64, "max_body_bytes": 64 << 10, **limits})
        app = create_app(model_ or model, load_tokenizer(ckpt), name=MODEL, checkpoint_dir=ckpt, limits=limits,
                         prefix_cache=prefix_cache)
        servers.append(LiveServer(app, **({"http": http} if http else {})))
        return servers[-1], app
    yield start
    for s in servers:
        s.stop()


class Slow(torch.nn.Module):
    """The tiny model, ``delay`` seconds slower per forward: long enough to act while a job runs."""

    def __init__(self, base, delay):
        super().__init__()
        self.base, self.config, self.delay = base, base.config, delay

    def new_cache(self, *args, **kw):
        return self.base.new_cache(*args, **kw)

    def fingerprint(self):
        return self.base.fingerprint()

    def forward(self, input_ids, cache=None, mask=None, last_only=False):
        time.sleep(self.delay)
        return self.base(input_ids, cache, mask, last_only)


def no_stop(ckpt) -> dict:
    """logit_bias that keeps the end-of-turn tokens out, so a reply runs to max_tokens."""
    return {str(i): -100 for i in ChatFormat.from_dir(ckpt).stop_ids}


def chat_body(content, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6, "temperature": 0,
            **kw}


def post(url, body, path="/v1/chat/completions", **kw) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=30, **kw)


def text_of(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text[:300]
    return [c["message"]["content"] for c in r.json()["choices"]]


def sse(r: httpx.Response) -> list:
    """The data lines of a server-sent event stream, parsed ("[DONE]" kept as a string)."""
    lines = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def drained(engine, seconds: float = 5.0) -> bool:
    """The engine has no job left within ``seconds`` (a finished row leaves just after its "end" event)."""
    deadline = time.time() + seconds
    while engine.load() and time.time() < deadline:
        time.sleep(0.01)
    return engine.load() == 0


def assert_openai_error(r: httpx.Response, status: int, param=None, code=None) -> dict:
    assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


# ---- 1. one request's failure is its own ---------------------------------------------------------------
# hostile values the schema used to accept: (request fields, expected status, the parameter a 400 names).
# Temperatures below 1e-5 are greedy; a top_p that rounds to 0 keeps the top token.
HOSTILE = [
    ({"temperature": 1e-300}, 200, None),
    ({"temperature": 1e-45}, 200, None),
    ({"temperature": 1.0, "top_p": 1e-300}, 200, None),
    ({"repetition_penalty": 1e-300}, 400, "repetition_penalty"),
    ({"repetition_penalty": 1e300}, 400, "repetition_penalty"),
    ({"temperature": 1.0, "seed": 2**64}, 400, "seed"),
    ({"temperature": 1.0, "seed": -2**70}, 400, "seed"),
    ({"temperature": 1.0, "seed": 2**64 - 1, "n": 2}, 400, "seed"),
    ({"temperature": 1.0, "seed": 2**63 - 1, "n": 2}, 200, None),   # seed + 1 passes 2**63 - 1: still fine
    ({"logit_bias": {"²": 5}}, 400, "logit_bias"),
    ({"logit_bias": {"9" * 5000: 5}}, 400, "logit_bias"),
    ({"logit_bias": {"-1": 5}}, 400, "logit_bias"),
]


def test_hostile_values_among_concurrent_requests(serve):
    server, app = serve()
    prompts = [f"question {i}: where is the fox?" for i in range(5)]
    alone = {p: text_of(post(server.url, chat_body(p))) for p in prompts}
    greedy = text_of(post(server.url, chat_body("hostile")))
    for fields, status, param in HOSTILE:
        bodies = [chat_body(p) for p in prompts] + [chat_body("hostile", **fields)]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            *normal, hostile = pool.map(lambda b: post(server.url, b), bodies)
        for p, r in zip(prompts, normal):
            assert text_of(r) == alone[p], fields
        if status == 400:
            assert_openai_error(hostile, 400, param, "invalid_value")
        else:
            texts = text_of(hostile)
            assert len(texts) == fields.get("n", 1)
            if fields.get("temperature", 0) < 1e-5 or "top_p" in fields:
                assert texts == greedy, fields
    assert drained(app.state.engine)


def test_tiny_temperature_and_top_p_sample_the_top_token():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 5
    g = torch.Generator().manual_seed(0)
    for s in (Sampling(temperature=1e-45), Sampling(temperature=1e-300), Sampling(temperature=1.0, top_p=1e-300),
              Sampling(temperature=1e-6, top_p=1e-300)):
        assert torch.equal(sample(logits, s, g), logits.argmax(-1)), s


def test_an_exception_in_one_job_fails_that_request_alone(serve, ckpt, monkeypatch):
    server, app = serve(max_batch=2)   # most of the others wait in the queue meanwhile
    engine = app.state.engine
    bias = no_stop(ckpt)
    prompts = [f"question {i}: where is the fox?" for i in range(4)]
    alone = {p: text_of(post(server.url, chat_body(p, logit_bias=bias))) for p in prompts}
    real_sample = Rows.sample

    def poisoned(rows, logits):
        # seed 4242 fails on its first token (while starting), 4243 on its third (a row of the batch)
        if rows.sampling.seed == 4242 or rows.sampling.seed == 4243 and len(rows.tokens[0]) == 2:
            raise RuntimeError("injected failure")
        return real_sample(rows, logits)
    monkeypatch.setattr(Rows, "sample", poisoned)

    bodies = [chat_body(p, logit_bias=bias) for p in prompts]
    bodies += [chat_body("poison", seed=4242, logit_bias=bias),
               chat_body("poison", seed=4243, logit_bias=bias, stream=True)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        *normal, failed, streamed = pool.map(lambda b: post(server.url, b), bodies)
    for p, r in zip(prompts, normal):
        assert text_of(r) == alone[p]
    err = assert_openai_error(failed, 500, code="engine_error")
    assert err["type"] == "server_error" and "injected failure" in err["message"]
    # streaming: the status is out, so the text so far, an error event, then the end of the stream
    events = sse(streamed)
    assert streamed.status_code == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "engine_error" and "injected failure" in events[-2]["error"]["message"]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and "error" not in events[-3]
    assert drained(engine)
    # and it serves on
    monkeypatch.undo()
    assert text_of(post(server.url, chat_body(prompts[0], logit_bias=bias))) == alone[prompts[0]]


def test_a_failed_batch_step_fails_its_rows_and_serves_the_queue(model, ckpt, monkeypatch):
    """A decode step of the whole batch raises (out of memory, say): no one job to blame, so the row in the
    batch fails; the job waiting behind it is served."""
    import hybridlm.engine
    tok = load_tokenizer(ckpt)
    engine = Engine(model, tok, Limits(context=CONTEXT, max_batch=1), store=None)
    real, calls = hybridlm.engine.decode_step, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args)
    monkeypatch.setattr(hybridlm.engine, "decode_step", flaky)
    ends, done = [], threading.Event()

    def emit(e):
        if e[0] in ("end", "error"):
            ends.append(e[:2])
            if len(ends) == 2:
                done.set()
    bias = {int(k): v for k, v in no_stop(ckpt).items()}
    ids = tok.encode("hello there")
    engine.submit([Job(ids, 5, Sampling(0.0), emit, index=i, logit_bias=bias) for i in range(2)])
    engine.start()
    try:
        assert done.wait(30)
    finally:
        engine.stop()
    assert ends == [("error", 0), ("end", 1)]


def _raw(sock: socket.socket, request: bytes) -> tuple[int, dict, bytes]:
    """Send one HTTP/1.1 request on ``sock``; read one response: (status, headers, body)."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status = int(head.split(b" ")[1])
    headers = dict(line.decode().lower().split(": ", 1) for line in head.split(b"\r\n")[1:])
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection"
        body += chunk
    return status, headers, body


def test_an_internal_error_is_an_openai_500_and_keeps_the_connection(serve, monkeypatch):
    server, _ = serve()

    def broken(*args):
        raise RuntimeError("injected bug")
    monkeypatch.setattr("hybridlm.serve._encode_prompts", broken)
    body = json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        status, _, payload = _raw(sock, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                        b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        err = json.loads(payload)["error"]
        assert status == 500 and err["code"] == "internal_error" and "injected bug" in err["message"]
        # the same connection serves the next request
        status, _, payload = _raw(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and json.loads(payload)["status"] == "ok"


# ---- 2. caps ------------------------------------------------------------------------------------------
def test_jobs_per_request_are_capped(serve):
    server, app = serve()
    url = server.url
    r = post(url, {"model": MODEL, "prompt": ["a"] * 16, "n": 16, "max_tokens": 1}, "/v1/completions")
    err = assert_openai_error(r, 400, "n", "too_many_completions")
    assert "256 completions" in err["message"] and "at most 16" in err["message"]
    r = post(url, {"model": MODEL, "prompt": ["a"] * 17, "max_tokens": 1}, "/v1/completions")
    assert_openai_error(r, 400, "prompt", "too_many_completions")
    r = post(url, {"model": MODEL, "prompt": ["a", "b"], "n": 8, "max_tokens": 1}, "/v1/completions")
    assert r.status_code == 200 and len(r.json()["choices"]) == 16
    server2, _ = serve(max_request_jobs=2)
    assert_openai_error(post(server2.url, chat_body("hi", n=3)), 400, "n", "too_many_completions")
    assert drained(app.state.engine)


def test_stop_strings_are_capped(serve):
    server, _ = serve()
    assert_openai_error(post(server.url, chat_body("hi", stop=["a", "b", "c", "d", "e"])), 400, "stop", "invalid_value")
    assert_openai_error(post(server.url, chat_body("hi", stop="x" * 257)), 400, "stop", "invalid_value")
    r = post(server.url, chat_body("hi", stop=[c * 256 for c in "wxyz"]))
    assert r.status_code == 200


def test_one_client_cannot_hold_the_queue(serve, model, ckpt):
    server, app = serve(model_=Slow(model, 0.02), max_client_jobs=4)
    bias = no_stop(ckpt)
    alice = {"Authorization": "Bearer alice"}
    held = {}
    first = threading.Thread(target=lambda: held.setdefault("r", post(
        server.url, chat_body("a long one", n=4, max_tokens=40, logit_bias=bias), headers=alice)))
    first.start()
    deadline = time.time() + 10
    while app.state.engine.load() < 4 and time.time() < deadline:
        time.sleep(0.01)
    # alice holds her four; one more is refused with 429 (the official client retries those)
    r = post(server.url, chat_body("one more"), headers=alice)
    err = assert_openai_error(r, 429, code="rate_limit_exceeded")
    assert "limit per client is 4" in err["message"]
    # bob is served meanwhile
    r = post(server.url, chat_body("hi"), headers={"Authorization": "Bearer bob"})
    assert r.status_code == 200
    first.join(30)
    assert held["r"].status_code == 200 and len(held["r"].json()["choices"]) == 4


def test_engine_takes_turns_between_clients(model, ckpt):
    """One row: alice's three jobs were queued before bob's one, and bob's goes second, not last."""
    tok = load_tokenizer(ckpt)
    engine = Engine(model, tok, Limits(context=CONTEXT, max_batch=1), store=None)
    order, done = [], threading.Event()

    def emit(e):
        if e[0] == "end":
            order.append(e[1])
            if len(order) == 4:
                done.set()
    ids = tok.encode("hello there")
    engine.submit([Job(ids, 2, Sampling(0.0), emit, index=i, client=1) for i in range(3)])
    engine.submit([Job(ids, 2, Sampling(0.0), emit, index=9, client=2)])
    engine.start()
    try:
        assert done.wait(30)
    finally:
        engine.stop()
    assert order == [0, 9, 1, 2]


# ---- 3. cancellation and timeouts ---------------------------------------------------------------------
def test_a_disconnected_non_streaming_client_cancels_its_job(serve, model, ckpt):
    server, app = serve(model_=Slow(model, 0.05))
    engine = app.state.engine
    body = chat_body("a long answer", max_tokens=60, logit_bias=no_stop(ckpt))   # about 3 s of work
    with pytest.raises(httpx.ReadTimeout):   # the client gives up and closes its connection
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    gave_up = time.time()
    while engine.load() and time.time() < gave_up + 10:
        time.sleep(0.02)
    assert engine.load() == 0 and time.time() - gave_up < 2   # the 60 tokens would take 3 s or more
    assert engine.steps < 45


def test_slow_heads_and_bodies_time_out(serve):
    server, _ = serve(read_timeout=0.5, http=http_protocol(0.5))
    port = server.port
    # half a body: 408 in OpenAI's format, then the connection closes
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        t0 = time.time()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"model\": ")
        status, headers, payload = _raw(sock, b"")
        assert status == 408 and json.loads(payload)["error"]["code"] == "request_timeout"
        assert headers.get("connection") == "close" and sock.recv(1) == b""
        assert time.time() - t0 < 5
    # half a head, or nothing at all: the connection closes
    for sent in (b"POST /v1/completions HTT", b"GET /health HTTP/1.1\r\nHost: x\r\n", b""):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            t0 = time.time()
            sock.sendall(sent)
            assert sock.recv(1) == b"" and time.time() - t0 < 5, sent
    # a request sent at once is unaffected, and so is the next one on the same connection
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(2):
            assert _raw(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
            time.sleep(0.7)   # longer than the head deadline, between requests: uvicorn's keep-alive (5 s) rules


# ---- 4. the prefix cache is per client ---------------------------------------------------------------
def test_cached_tokens_tell_nothing_about_another_clients_prompt(serve):
    server, _ = serve(prefix_cache=PrefixCache(64 << 20))
    alice, bob = (openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)
                  for key in ("alice", "bob"))
    secret = "the launch code is 7 4 1 9 and the vault is in Oslo"

    def cached(client, prompt) -> int:
        usage = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0).usage
        return usage.prompt_tokens_details.cached_tokens
    n = alice.completions.create(model=MODEL, prompt=secret, max_tokens=1, temperature=0).usage.prompt_tokens
    # bob's right guess looks exactly like a wrong one
    assert cached(bob, secret) == 0
    assert cached(bob, secret.replace("Oslo", "Rome")) == 0
    # and so does a client without an API key (told apart by its address)
    r = post(server.url, {"model": MODEL, "prompt": secret, "max_tokens": 1}, "/v1/completions")
    assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # each client still reuses its own prompts
    assert cached(alice, secret) == n and cached(bob, secret) == n
