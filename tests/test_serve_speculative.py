"""Speculative decoding in the server (issue 14): a request's ``"speculative"`` field, its errors, greedy
replies identical to those without it (alone and batched with requests that do not speculate), seeded
sampled replies, and the server-wide default with a draft model."""
import concurrent.futures

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from hybridlm import HybridLM  # noqa: E402
from hybridlm import engine as engine_mod  # noqa: E402
from hybridlm.serve import Limits, create_app  # noqa: E402
from hybridlm.speculative import Speculative  # noqa: E402
from hybridlm.tokenizer import load_tokenizer  # noqa: E402
from tests.test_chat import make_chat_checkpoint  # noqa: E402
from tests.test_serve import LiveServer  # noqa: E402

MODEL = "tiny-spec"
# copy-heavy prompts (lookup finds its drafts) and one that is not
PROMPTS = ["the fox and the dog, the fox and the dog, the fox and the dog, the fox and",
           "one two three one two three one two three one two",
           "hello"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.set_num_threads(1)
    return make_chat_checkpoint(tmp_path_factory.mktemp("serve-spec") / "ckpt", initializer_range=0.2)


@pytest.fixture(scope="module")
def model(ckpt):
    return HybridLM.from_pretrained(ckpt).eval()


def server(ckpt, model, speculative=None):
    app = create_app(model, load_tokenizer(ckpt), name=MODEL, checkpoint_dir=ckpt, speculative=speculative,
                     limits=Limits(context=256, max_new_tokens=32))
    return LiveServer(app), app


@pytest.fixture(scope="module")
def live(ckpt, model):
    s, app = server(ckpt, model)
    yield s, app
    s.stop()


def complete(url, prompt, **kw):
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 24,
                                                  "temperature": 0, **kw}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.fixture
def verified(monkeypatch):
    """The rows of every speculative step the engine runs."""
    rows, real = [], engine_mod.Batch._speculate

    def spy(self, failed, cap):
        rows.append(self.rows)
        return real(self, failed, cap)
    monkeypatch.setattr(engine_mod.Batch, "_speculate", spy)
    return rows


def test_greedy_requests_with_lookup_give_the_tokens_without_it(live, verified):
    url = live[0].url
    plain = [complete(url, p) for p in PROMPTS]
    for value in ("lookup", {"method": "lookup", "k": 3}, True):
        assert [complete(url, p, speculative=value) for p in PROMPTS] == plain
    assert verified
    # batched: the speculating requests and the others in one batch, each with its own reply
    engine = live[1].state.engine
    engine.max_rows_seen = 0
    verified.clear()
    asks = [(p, spec) for p in PROMPTS for spec in ("lookup", False)] * 2
    with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
        got = list(pool.map(lambda a: complete(url, a[0], speculative=a[1]), asks))
    assert got == [plain[PROMPTS.index(p)] for p, _ in asks]
    assert engine.max_rows_seen > 1 and max(verified) > 1


def test_bad_speculative_values_get_a_400_that_says_what_is_allowed(live):
    url = live[0].url
    for value in ("medusa", 3, {"method": "lookup", "k": 0}, {"k": 99}, {"method": "lookup", "depth": 2},
                  {"method": "lookup", "k": True}, ["lookup"]):
        r = httpx.post(url + "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}], "speculative": value})
        assert r.status_code == 400, (value, r.text)
        err = r.json()["error"]
        assert err["param"] == "speculative" and err["code"] == "invalid_value"
        assert '"lookup"' in err["message"] and "allowed" in err["message"], err
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "speculative": "draft"})
    assert r.status_code == 400 and "no draft model" in r.json()["error"]["message"]
    assert complete(url, "still serving", max_tokens=2)["finish_reason"] in ("stop", "length")


def test_seeded_sampled_request_with_speculation(live, verified):
    url = live[0].url
    kw = dict(temperature=0.8, seed=7, speculative={"method": "lookup", "k": 4})
    a = complete(url, PROMPTS[0], **kw)
    assert a["finish_reason"] in ("stop", "length") and isinstance(a["text"], str) and verified
    # its own generator: the same reply again, whoever else is in the batch
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda p: complete(url, p, **kw), [PROMPTS[0], PROMPTS[1], PROMPTS[0]]))
    assert replies[0] == replies[2] == a


def test_server_default_with_a_draft_model(ckpt, model, verified):
    """``serve --speculative draft:PATH``: requests speculate with the draft model unless they say otherwise,
    and greedy replies are the plain ones."""
    plain_server, _ = server(ckpt, model)
    try:
        plain = [complete(plain_server.url, p) for p in PROMPTS]
    finally:
        plain_server.stop()
    draft = HybridLM.from_pretrained(ckpt).eval()
    s, _ = server(ckpt, model, Speculative("draft", k=3, draft=draft))
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            assert list(pool.map(lambda p: complete(s.url, p), PROMPTS)) == plain
        assert verified
        assert [complete(s.url, p, speculative=v) for p, v in zip(PROMPTS, ("draft", False, "lookup"))] == plain
    finally:
        s.stop()
