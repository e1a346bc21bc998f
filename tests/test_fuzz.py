"""Property-based fuzzing (issue 16, part 7) of the other untrusted inputs; tests/test_malformed.py fuzzes
safetensors files. Each example mutates a valid input and asserts a clear error or a correct result
within the hypothesis deadline:

- prompt-state snapshots: ``Snapshot.load(path, model)`` raises a ValueError naming the file, allocating
  no cache, or returns a snapshot that restores into a cache the model decodes from;
- config.json: ``HybridLM.from_pretrained`` raises a ValueError/OSError naming the checkpoint, or loads a
  model whose forward gives logits of the right shape;
- chat templates: ``ChatTemplate.render`` returns text or raises ValueError (a failure of the template's
  own code is not a TypeError or ZeroDivisionError traceback);
- server request bodies: every body gets a 4xx in OpenAI's error format, or a 200 with every choice
  (a stream that ends with [DONE] and no error event).

Examples are derandomized and few (CI time: about 15 s on 2 cores)."""
import contextlib
import itertools
import json
from unittest import mock

import pytest
import torch

from hybridlm import HybridLM
from hybridlm.cache import Cache, Snapshot
from hybridlm.generate import decode_step, prefill
from tests.test_malformed import Unclear, tiny_checkpoint
from tests.test_snapshots_hostile import make_model, tokens

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FUZZ = dict(derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
_counter = itertools.count()

# values a hostile file or client sends in place of any field
_HOSTILE = st.sampled_from([None, True, False, 0, 1, -1, 2, 1.5, -0.0, 1e-300, 1e308, float("nan"), float("inf"),
                            10**6, 2**63, 2**64, -2**70, "", "x", "false", "²", "*1000000000", "mA", "7", [], [1, 2],
                            {}, {"a": 1}])
_VALUE = _HOSTILE | st.integers(-10, 10**7) | st.floats() | st.text(max_size=5) | st.lists(_HOSTILE, max_size=3)


# a byte-level mutation, applied by ``mutate_bytes``: 1-4 bytes changed at relative positions, or a cut
# (past 1.0: zeros appended)
BYTE_EDITS = (st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                                  min_size=1, max_size=4))
              | st.tuples(st.just("cut"), st.floats(0, 1.2)))


def mutate_bytes(data: bytes, edit) -> bytes:
    kind, arg = edit
    if kind == "cut":
        n = int(arg * len(data))
        return data[:n] + bytes(max(0, n - len(data)))
    b = bytearray(data)
    for at, value in arg:
        b[int(at * len(b))] = value
    return bytes(b)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second thread only adds waiting on a shared CPU (10-100x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ---- (a) prompt-state snapshots ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def snap_model():
    return make_model()


@pytest.fixture(scope="module")
def valid_snapshot(snap_model, fuzz_dir):
    """The path of a valid snapshot file (a path: hypothesis prints the arguments of a failing example)."""
    return save_valid_snapshot(snap_model, fuzz_dir)


def save_valid_snapshot(model, directory):
    cache = model.new_cache(1, 16)
    snap = cache.snapshot(prefill(model, cache, tokens(7)), model)
    snap.save(directory / "valid.safetensors")
    return directory / "valid.safetensors"


@st.composite
def snapshot_edits(draw) -> tuple:
    """("meta", key, value or None to delete) | ("tensor", name, op, arg) | ("bytes", a BYTE_EDITS edit)."""
    kind = draw(st.sampled_from(["meta", "tensor", "bytes"]))
    if kind == "meta":
        key = draw(st.sampled_from(["format", "fingerprint", "weights", "pos", "batch", "dtype", "extra"]))
        value = draw(st.none() | st.text(max_size=6) | st.sampled_from(
            ["0", "1", "6", "7", "8", "100000", "1e8", "9" * 40, "-1", " 7", "٣", "float16", "bfloat16"]))
        return ("meta", key, value)
    if kind == "tensor":
        name = draw(st.sampled_from(["layers.0.ssm", "layers.0.conv", "layers.1.k", "layers.2.v", "valid", "seen",
                                     "logits", "layers.9.ssm"]))
        op = draw(st.sampled_from(["drop", "shape", "dtype", "value"]))
        arg = {"drop": st.none(), "shape": st.lists(st.integers(0, 9), max_size=4),
               "dtype": st.sampled_from([torch.float16, torch.bfloat16, torch.int64, torch.bool, torch.float64]),
               "value": st.sampled_from([float("nan"), float("inf"), -1e30, 0.0, 1.0])}[op]
        return ("tensor", name, op, draw(arg))
    return ("bytes", draw(BYTE_EDITS))


def apply_snapshot_edit(edit, valid: bytes, path) -> None:
    if edit[0] == "bytes":
        path.write_bytes(mutate_bytes(valid, edit[1]))
        return
    path.write_bytes(valid)
    snap = Snapshot.load(path)
    tensors, meta = dict(snap.tensors), dict(snap.meta)
    if edit[0] == "meta":
        _, key, value = edit
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    else:
        _, name, op, arg = edit
        t = tensors.get(name, torch.zeros(1, 64, 8))
        if op == "drop":
            tensors.pop(name, None)
        elif op == "shape":
            tensors[name] = torch.zeros(arg, dtype=t.dtype)
        elif op == "dtype":
            tensors[name] = t.to(arg)
        else:
            t = t.clone()
            if t.numel():
                t.view(-1)[t.numel() // 2] = arg if t.is_floating_point() else int(abs(arg) < 2)
            tensors[name] = t
    Snapshot(tensors, meta).save(path)


@settings(max_examples=150, deadline=2000, **FUZZ)
@given(edit=snapshot_edits())
def test_fuzz_snapshots_refused_naming_the_file_or_restored(snap_model, valid_snapshot, fuzz_dir, edit):
    check_snapshot(snap_model, valid_snapshot, fuzz_dir, edit)


def check_snapshot(model, valid, directory, edit) -> str:
    """One example (also benchmarks/fuzz.py's): "refused" (a ValueError naming the file, no cache allocated
    while loading) or "ok" (restored, and the model decodes from it); AssertionError/``Unclear`` otherwise."""
    path = directory / f"snap{next(_counter)}.safetensors"
    apply_snapshot_edit(edit, valid.read_bytes(), path)
    refuse = mock.patch.object(Cache, "allocate", side_effect=AssertionError("a cache was allocated while loading"))
    try:
        with refuse:
            snap = Snapshot.load(path, model)
    except ValueError as e:
        if not (type(e) is ValueError and str(path) in str(e)):
            raise Unclear(repr(e)) from e
        return "refused"
    cache = snap.to_cache(model, 16)
    logits = decode_step(model, cache, torch.tensor([1]))
    assert logits.shape == (1, model.config.vocab_size) and cache.pos == snap.pos + 1
    return "ok"



@pytest.mark.parametrize("meta", [{"pos": None}, {"dtype": "float16"}, {"fingerprint": "0" * 32}, {"batch": "x"}])
def test_a_snapshot_refused_against_the_model_names_its_file(snap_model, valid_snapshot, fuzz_dir, meta):
    """Found by the fuzzer: the header and model checks of ``Snapshot.load(path, model)`` (a missing pos,
    another dtype or model) raised without naming the file."""
    snap = Snapshot.load(valid_snapshot)
    header = {k: v for k, v in {**snap.meta, **meta}.items() if v is not None}
    path = fuzz_dir / "named.safetensors"
    Snapshot(snap.tensors, header).save(path)
    with pytest.raises(ValueError) as e:
        Snapshot.load(path, snap_model)
    assert str(e.value).startswith(str(path)), str(e.value)

# ---- (b) config.json -----------------------------------------------------------------------------------
# fields hybridlm reads besides those of a saved Jamba config
_EXTRA_FIELDS = ["layout", "layers_block_type", "num_local_experts", "sliding_window", "rope_theta", "family",
                 "mamba2_dt_limit", "attn_layer_indices"]


@pytest.fixture(scope="module")
def config_checkpoint(fuzz_dir) -> tuple:
    """A tiny checkpoint and its config; each example rewrites its config.json (the weights stay)."""
    return make_config_checkpoint(fuzz_dir / "ckpt")


def make_config_checkpoint(path) -> tuple:
    tiny_checkpoint(path, sharded=False)
    return path, json.loads((path / "config.json").read_text())


@st.composite
def config_texts(draw, base: dict) -> str:
    """config.json text: a field set to a hostile value or removed, the model type changed (another family's
    reader runs), or bytes edited."""
    kind = draw(st.sampled_from(["field", "delete", "model_type", "bytes"]))
    d = dict(base)
    if kind == "field":
        d[draw(st.sampled_from(sorted(base) + _EXTRA_FIELDS))] = draw(_VALUE)
    elif kind == "delete":
        d.pop(draw(st.sampled_from(sorted(base))))
    elif kind == "model_type":
        d["model_type"] = draw(_VALUE | st.sampled_from(["jamba", "bamba", "granitemoehybrid", "nemotron_h", "mamba"]))
    text = json.dumps(d)
    if kind == "bytes":
        return mutate_bytes(text.encode(), draw(BYTE_EDITS)).decode("utf-8", "replace")
    return text


@settings(max_examples=150, deadline=3000, **FUZZ)
@given(data=st.data())
def test_fuzz_config_json_refused_naming_the_checkpoint_or_loaded(config_checkpoint, data):
    path, base = config_checkpoint
    check_config(path, data.draw(config_texts(base), label="config.json"))


def check_config(path, text: str) -> str:
    """One example (also benchmarks/fuzz.py's): ``text`` as the checkpoint's config.json is "refused" (a
    ValueError/OSError naming the checkpoint) or "ok" (loaded, logits of the right shape)."""
    (path / "config.json").write_text(text)
    try:
        model = HybridLM.from_pretrained(path)
    except (ValueError, OSError) as e:
        if str(path) not in str(e):
            raise Unclear(repr(e)) from e
        return "refused"
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, model.config.vocab_size)
    return "ok"



@pytest.mark.parametrize("fields, words", [
    ({"model_type": ["jamba"]}, "unsupported model_type ['jamba']"),
    ({"model_type": {}}, "unsupported model_type {}"),
    ({"rope_theta": 10**400}, "rope_theta must be a finite number > 0"),
    ({"rms_norm_eps": 10**400}, "rms_norm_eps must be a finite number > 0"),
])
def test_config_values_the_fuzzer_found_are_refused_naming_the_file(config_checkpoint, fields, words):
    """A list or object model_type raised TypeError (unhashable), an integer past float's range
    OverflowError, instead of a ValueError naming config.json."""
    path, base = config_checkpoint
    (path / "config.json").write_text(json.dumps({**base, **fields}))
    with pytest.raises(ValueError) as e:
        HybridLM.from_pretrained(path)
    assert str(path / "config.json") in str(e.value) and words in str(e.value), str(e.value)


def test_an_integer_rope_theta_past_int64_loads_and_runs(config_checkpoint):
    """rope_theta 2**64 passed the check and then overflowed in torch (an int64) at the first forward."""
    path, base = config_checkpoint
    (path / "config.json").write_text(json.dumps({**base, "rope_theta": 2**64}))
    model = HybridLM.from_pretrained(path)
    assert model.config.rope_theta == float(2**64)
    with torch.inference_mode():
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, base["vocab_size"])

@pytest.mark.parametrize("fields, words", [
    ({"num_hidden_layers": 3842}, "the config has 3842 layers of 2 experts, the weights hold 2 layers of 2 experts"),
    ({"num_experts": 4096}, "the config has 2 layers of 4096 experts, the weights hold 2 layers of 2 experts"),
    ({"num_hidden_layers": 4096, "num_experts": 4096}, "the config has 4096 layers of 4096 experts"),
])
def test_layer_and_expert_counts_are_checked_against_the_weights_first(config_checkpoint, fields, words):
    """Found by benchmarks/fuzz.py: num_hidden_layers 3842 over the 2-layer checkpoint built a 3,842-layer
    model (12-18 s, 110 MiB) before reporting its tensors missing; both counts at their caps, hours."""
    import time
    path, base = config_checkpoint
    (path / "config.json").write_text(json.dumps({**base, **fields}))
    t0 = time.monotonic()
    with pytest.raises(ValueError) as e:
        HybridLM.from_pretrained(path)
    assert time.monotonic() - t0 < 2 and f"checkpoint {path} does not match its config.json" in str(e.value)
    assert words in str(e.value), str(e.value)


# ---- (c) chat templates --------------------------------------------------------------------------------
_TEMPLATE_PIECES = [
    "{% for m in messages %}", "{% endfor %}", "{{ m['content'] }}", "{{ m.role }}", "{% if add_generation_prompt %}",
    "{% if m.role == 'user' %}", "{% else %}", "{% endif %}", "{{ bos_token }}", "{{ eos_token }}",
    "{{ raise_exception('roles must alternate') }}", "{{ messages[0]['content'] | upper }}", "{{ messages[9] }}",
    "{{ 1 / 0 }}", "{{ 1 + 'a' }}", "{{ none | length }}", "{{ 'a' < 1 }}", "{{ '%d' % 'a' }}",
    "{{ 'ab' | truncate(-5) }}", "{{ 1 is divisibleby 0 }}", "{{ [1] | sum(start='a') }}", "{{ 'x' * 10**9 }}",
    "{{ 2 ** 10 ** 7 }}", "{{ lipsum(10**7) }}", "{% for i in range(10**7) %}{% endfor %}", "{{ range(3) | list }}",
    "{{ m['missing'] }}", "{{ foo.bar }}", "{% set ns = namespace(n=0) %}", "{% set ns.n = ns.n + 1 %}", "{{ ns.n }}",
    "{{ tools | tojson }}", "{{ messages | tojson }}", "{{ ''.__class__.__mro__ }}", "{{ loop.index }}",
    "{% macro f(x) %}{{ f(x) }}{% endmacro %}", "{{ f(1) }}", "{{ strftime_now('%Y') }}", "{{ 'x' | indent(10**6) }}",
    "{{ 'x' | wordwrap(0) }}", "{{ messages | map(attribute='content') | join(', ') }}", "{{ cycler(1, 2).next() }}",
    "{{", "}}", "{%", "%}", "{#", "#}", "text", "\n",
]


TEMPLATES = st.lists(st.sampled_from(_TEMPLATE_PIECES) | st.text(max_size=4), max_size=8)


@settings(max_examples=150, deadline=3000, **FUZZ)
@given(pieces=TEMPLATES, tools=st.booleans())
def test_fuzz_chat_templates_render_or_raise_valueerror(pieces, tools):
    check_template(pieces, tools)


def check_template(pieces: list[str], tools: bool) -> str:
    """One example (also benchmarks/fuzz.py's): the joined template renders ("ok", text within the size
    bound) or is "refused" with a ValueError that says something."""
    from hybridlm import chat_template
    template = chat_template.ChatTemplate("".join(pieces), {"bos_token": "<s>", "eos_token": "</s>"},
                                          origin="fuzz/tokenizer_config.json")
    conversation = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f"}}]}]
    tool_list = [{"type": "function", "function": {"name": "f", "parameters": {}}}] if tools else None
    # a render that stays under the loop and size bounds still ends at the time bound: 1 s here
    with mock.patch.object(chat_template, "MAX_TEMPLATE_SECONDS", 1.0):
        try:
            text = template.render(conversation, tool_list)
        except ValueError as e:
            if not (type(e) is ValueError and str(e)):
                raise Unclear(repr(e)) from e
            return "refused"
    assert isinstance(text, str) and len(text) <= chat_template.MAX_TEMPLATE_CHARS
    return "ok"


@pytest.mark.parametrize("template", ["{{ 1 / 0 }}", "{{ 1 + 'a' }}", "{{ none | length }}", "{{ 'a' < 1 }}",
                                      "{{ [1] | sum(start='a') }}", "{{ 'ab' | truncate(-5) }}",
                                      "{{ 1 is divisibleby 0 }}"])
def test_a_failure_in_the_templates_own_code_is_a_valueerror_naming_it(template):
    """Found by the fuzzer: these raised ZeroDivisionError/TypeError/AssertionError out of ``render`` (and
    the server answered 500 where a broken template is refused like any other)."""
    from hybridlm.chat_template import ChatTemplate
    with pytest.raises(ValueError, match="chat template from fuzz/chat_template.jinja failed: [A-Za-z]+Error"):
        ChatTemplate(template, origin="fuzz/chat_template.jinja").render([{"role": "user", "content": "hi"}])


# ---- (d) server request bodies -------------------------------------------------------------------------
SERVED = "tiny-chat"
_FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
           "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "n", "stream", "stream_options",
           "stop", "seed", "user", "tools", "tool_choice", "logprobs", "response_format", "echo", "suffix", "best_of"]
_FIELD_VALUES = _VALUE | st.sampled_from([
    SERVED, [{"role": "user", "content": "hi"}], [{"role": "tool", "content": None}], [1, 2, 3], [[1, 2], [3]],
    [10**9], ["a", "b"], {"include_usage": True}, {"²": 5}, {"5": 1e300}, {"3": -100}, "x" * 300, ["x"] * 5,
    [{"type": "function", "function": {"name": "f"}}], {"type": "json_object"}, 10**9, 2**63 - 1])


class ServerError(AssertionError):
    """A 5xx: an exception escaped the request's own error handling (a traceback in the server)."""


@pytest.fixture(scope="module")
def client(fuzz_dir):
    pytest.importorskip("fastapi")
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    with serving_client(fuzz_dir) as c:
        yield c


@contextlib.contextmanager
def serving_client(directory):
    """A test client of the server over a tiny chat checkpoint in ``directory``, with small limits."""
    from starlette.testclient import TestClient

    from hybridlm.serve import Limits, create_app
    from hybridlm.tokenizer import load_tokenizer
    from tests.test_chat import make_chat_checkpoint
    ckpt = make_chat_checkpoint(directory / "chat")
    limits = Limits(context=64, max_new_tokens=4, max_body_bytes=64 << 10, read_timeout=5)
    app = create_app(HybridLM.from_pretrained(ckpt), load_tokenizer(ckpt), name=SERVED, checkpoint_dir=ckpt,
                     limits=limits)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@st.composite
def request_bodies(draw) -> tuple[str, bytes]:
    """(path, body): a valid chat or completion request with a field set to a hostile value, removed, or a
    message changed; or its JSON text with bytes edited."""
    chat = draw(st.booleans())
    body = {"model": SERVED, "max_tokens": 2, "temperature": 0,
            **({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})}
    kind = draw(st.sampled_from(["field", "field", "delete", "message", "bytes"]))
    if kind == "field":
        body[draw(st.sampled_from(_FIELDS))] = draw(_FIELD_VALUES)
    elif kind == "delete":
        body.pop(draw(st.sampled_from(sorted(body))))
    elif kind == "message":
        message = {"role": "user", "content": "hi"}
        message[draw(st.sampled_from(["role", "content", "name", "tool_calls", "x"]))] = draw(_FIELD_VALUES)
        body["messages" if chat else "prompt"] = [message]
    raw = json.dumps(body).encode()
    if kind == "bytes":
        raw = mutate_bytes(raw, draw(BYTE_EDITS))
    return ("/v1/chat/completions" if chat else "/v1/completions"), raw


@settings(max_examples=300, deadline=5000, **FUZZ)
@given(sent=request_bodies())
def test_fuzz_request_bodies_get_a_4xx_or_every_choice(client, sent):
    check_request(client, sent)


def check_request(client, sent: tuple[str, bytes]) -> str:
    """One example (also benchmarks/fuzz.py's): "refused" (a 4xx in OpenAI's error format) or "ok" (a 200
    with every choice, or a stream that ends with [DONE] and no error event); ``ServerError`` for a 5xx."""
    path, raw = sent
    r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    hypothesis.event(f"status {r.status_code}")
    if r.status_code != 200:
        if r.status_code >= 500:
            raise ServerError(r.status_code, r.text[:300])
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        return "refused"
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.split("\n\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), r.text[-500:]
        return "ok"
    body = json.loads(raw)
    prompts = body["prompt"] if path == "/v1/completions" and isinstance(body["prompt"], list) and \
        body["prompt"] and not isinstance(body["prompt"][0], int) else [None]
    assert len(r.json()["choices"]) == len(prompts) * body.get("n", 1)
    return "ok"
