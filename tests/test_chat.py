"""Chat: templates rendered as transformers renders them, streamed text, tool-call parsing, the chat
session (state reuse, /save, /load) and the ``chat`` command driven through stdin."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridlm import HybridLM, preset
from hybridlm.chat import ChatSession, repl
from hybridlm.chat_template import DEFAULT_TEMPLATE, ChatFormat, ChatTemplate, TextStream, parse_tool_calls
from hybridlm.generate import Sampling, generate
from hybridlm.prefix_cache import PrefixCache

pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

CORPUS = ["hello world, the quick brown fox jumps over the lazy dog",
          'Checking. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
          "You are a helpful assistant. What is the weather in Paris today?",
          "def add(a, b):\n    return a + b\n"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# a Zephyr-style template: different from the default, so tests see which one was read
ZEPHYR = ("{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, mamba_d_state=8,
             max_position_embeddings=512)


def make_chat_checkpoint(path, chat_template: str | None = None, seed: int = 0, **config) -> Path:
    """A tiny random model with a byte-level BPE tokenizer.json and tokenizer_config.json in ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "bos_token": None,
           "pad_token": "<|endoftext|>"}
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    torch.manual_seed(seed)
    model = HybridLM(preset("tiny", vocab_size=tok.get_vocab_size(), **{**SMALL, **config})).init_weights(seed)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    torch.set_num_threads(1)   # tiny matrices: threads only add overhead on a shared CPU
    return make_chat_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt")


@pytest.fixture(scope="module")
def model(ckpt):
    return HybridLM.from_pretrained(ckpt)


CONVERSATIONS = [
    [{"role": "user", "content": "hello"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "hello there"}, {"role": "user", "content": "weather?"}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.mark.parametrize("source", ["tokenizer_config", "jinja_file", "default"])
def test_template_renders_and_tokenizes_like_transformers(tmp_path, ckpt, source):
    transformers = pytest.importorskip("transformers")
    d = tmp_path / source
    d.mkdir()
    (d / "tokenizer.json").write_bytes((ckpt / "tokenizer.json").read_bytes())
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    if source == "tokenizer_config":
        cfg["chat_template"] = ZEPHYR
    elif source == "jinja_file":
        # the .jinja file wins over tokenizer_config.json, in transformers and here
        cfg["chat_template"] = "{{ raise_exception('the config template must not be used') }}"
        (d / "chat_template.jinja").write_text(ZEPHYR)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    fmt = ChatFormat.from_dir(d)
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(d)
    if source == "default":
        hf.chat_template = DEFAULT_TEMPLATE
        assert fmt.template.origin.startswith("default")
    for conv in CONVERSATIONS:
        for gen_prompt in (True, False):
            ours = fmt.template.render(conv, add_generation_prompt=gen_prompt)
            theirs = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen_prompt)
            assert ours == theirs
        ids = hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert fmt.encode_chat(conv).ids == list(ids)
    if source == "default":   # tools in the system turn, tool calls in assistant turns
        conv = CONVERSATIONS[1] + [
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                "name": "get_weather", "arguments": {"city": "Paris"}}}]},
            {"role": "tool", "content": "sunny"}]
        ours = fmt.template.render(conv, tools=TOOLS)
        assert ours == hf.apply_chat_template(conv, tools=TOOLS, tokenize=False, add_generation_prompt=True)
        assert '"name": "get_weather"' in ours and '<tool_call>{"name": "get_weather", "arguments": {"city": ' \
            '"Paris"}}</tool_call>' in ours


def test_named_templates_and_template_errors(tmp_path, ckpt):
    (tmp_path / "tokenizer.json").write_bytes((ckpt / "tokenizer.json").read_bytes())
    cfg = {"eos_token": "<|im_end|>", "chat_template": [
        {"name": "default", "template": "plain:{{ messages[-1].content }}"},
        {"name": "tool_use", "template": "tools:{{ tools | length }}:{{ messages[-1].content }}"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = ChatTemplate.from_dir(tmp_path)
    assert t.render([{"role": "user", "content": "x"}]) == "plain:x"
    assert t.render([{"role": "user", "content": "x"}], tools=TOOLS) == "tools:1:x"
    bad = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        bad.render([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="does not parse"):
        ChatTemplate("{% for %}").render([{"role": "user", "content": "x"}])
    assert ChatTemplate(ZEPHYR).supports_tools() is False and ChatTemplate(DEFAULT_TEMPLATE).supports_tools()


def test_stop_tokens_and_message_boundaries(ckpt):
    fmt = ChatFormat.from_dir(ckpt)
    assert fmt.stop_ids == (fmt.tokenizer.token_to_id("<|im_end|>"),)
    p = fmt.encode_chat(CONVERSATIONS[1])
    ids, bounds = p.ids, p.boundaries
    sys_ids = fmt.encode(fmt.template.render(CONVERSATIONS[1][:1], add_generation_prompt=False))
    assert bounds[0] == len(sys_ids) and ids[:len(sys_ids)] == sys_ids
    assert all(0 < b < len(ids) for b in bounds) and bounds == sorted(bounds)


def test_text_stream_holds_back_stop_strings_and_partial_characters():
    pieces = {1: "Hel", 2: "lo <", 3: "|st", 4: "op|> more", 5: "\xe2", 6: "\x82\xac"}

    def decode(ids):   # bytes decoded as a byte-level tokenizer does: an incomplete character is U+FFFD
        raw = "".join(pieces[i] for i in ids).encode("latin-1")
        return raw.decode("utf-8", errors="replace")

    s = TextStream(decode, stop_ids=(9,), stop_strings=("<|stop|>",))
    assert [s.push(1), s.push(2), s.push(3)] == ["Hel", "lo ", ""]
    assert s.push(4) == "" and s.finish_reason == "stop" and s.text == "Hello "
    s = TextStream(decode, stop_ids=(9,))
    assert [s.push(1), s.push(5), s.push(6), s.push(9)] == ["Hel", "", "€", ""]
    assert s.finish_reason == "stop" and s.text == "Hel€"


def test_parse_tool_calls():
    content, calls = parse_tool_calls('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
                                      '</tool_call><tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert content == "Let me check. "
    assert [c["function"]["name"] for c in calls] == ["get_weather", "f"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert json.loads(calls[1]["function"]["arguments"]) == {"x": 1}
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    _, calls = parse_tool_calls('<tool_calls>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {}}]'
                                '</tool_calls>')
    assert [c["function"]["name"] for c in calls] == ["a", "b"]
    # an unterminated call at the end of the reply (stopped by the end-of-turn token) still counts
    assert parse_tool_calls('<tool_call>{"name": "a", "arguments": {"k": 2}}')[1][0]["function"]["name"] == "a"
    for text in ("no calls here", "<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>'):
        assert parse_tool_calls(text) == (text, [])


def test_session_reuses_state_and_matches_uncached_generation(model, ckpt):
    fmt = ChatFormat.from_dir(ckpt)
    session = ChatSession(model, fmt, system="be brief", max_new_tokens=6, sampling=Sampling(0.0))
    streamed = []
    t1 = session.reply("hello", streamed.append)
    assert t1.reused_tokens == 0 and t1.new_tokens >= 1
    assert "".join(streamed) == session.messages[-1]["content"]
    state_tokens = session.tokens
    assert len(state_tokens) == t1.prompt_tokens + t1.new_tokens
    t2 = session.reply("and the weather?")
    # turn 2 restores the state after turn 1's prompt and reply (its generated ids are kept for the
    # reply's text, whatever a fresh tokenization of that text would give)
    assert t2.reused_tokens == len(state_tokens)
    # and the reply is what greedy generation from the same ids gives with no state reused
    ids = session.tokens[:t2.prompt_tokens]
    assert ids[:len(state_tokens)] == state_tokens
    fresh = generate(model, torch.tensor([ids]), max_new_tokens=6, stop_token_ids=fmt.stop_ids)[0, len(ids):]
    fresh = [t for t in fresh.tolist() if t not in fmt.stop_ids]
    assert session.messages[-1]["content"] == fmt.tokenizer.decode(fresh, skip_special_tokens=True)


def test_session_save_load_resumes_without_prefill(model, ckpt, tmp_path):
    fmt = ChatFormat.from_dir(ckpt)
    a = ChatSession(model, fmt, max_new_tokens=5, sampling=Sampling(0.0))
    a.reply("hello")
    a.save(tmp_path / "conv.state")
    b = ChatSession(model, fmt, max_new_tokens=5, sampling=Sampling(0.0), store=PrefixCache())
    b.load(tmp_path / "conv.state")
    assert b.messages == a.messages and b.tokens == a.tokens
    before = list(a.tokens)
    ta, tb = a.reply("more"), b.reply("more")
    assert a.messages[-1] == b.messages[-1]
    assert tb.reused_tokens == ta.reused_tokens == len(before)   # b never ran turn 1: its state came from the file
    with pytest.raises(ValueError, match="nothing to save"):
        ChatSession(model, fmt).save(tmp_path / "empty.state")


def test_sentencepiece_checkpoint(tmp_path):
    """A checkpoint with only tokenizer.model: the default template, eos from the model, a chat turn."""
    import io
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 20), model_writer=buf, vocab_size=96,
                                   user_defined_symbols=["<|im_start|>", "<|im_end|>"], hard_vocab_limit=False,
                                   character_coverage=1.0, minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(buf.getvalue())
    fmt = ChatFormat.from_dir(tmp_path)
    end = fmt.tokenizer.token_to_id("<|im_end|>")
    assert end in fmt.stop_ids and fmt.tokenizer.eos_id in fmt.stop_ids and not fmt.stop_strings
    model = HybridLM(preset("tiny", vocab_size=fmt.tokenizer.vocab_size, **SMALL)).init_weights(0)
    session = ChatSession(model, fmt, max_new_tokens=4, sampling=Sampling(0.0))
    turn = session.reply("hello world")
    assert turn.prompt_tokens == len(fmt.encode_chat(session.messages[:1]).ids) and turn.new_tokens >= 1


def test_repl_commands_with_injected_streams(model, ckpt, tmp_path):
    import io
    fmt = ChatFormat.from_dir(ckpt)
    session = ChatSession(model, fmt, max_new_tokens=4, sampling=Sampling(0.0))
    state = tmp_path / "s.state"
    script = f"hello\n/save {state}\n/reset\n/bogus\n/load {state}\nagain\n/quit\nnever read\n"
    out, err = io.StringIO(), io.StringIO()
    assert repl(session, io.StringIO(script), out, err) == 0
    log = err.getvalue()
    assert "[saved 2 messages" in log and "[new conversation]" in log and "unknown command /bogus" in log
    assert "[loaded 2 messages" in log and log.count("prompt tokens") == 2
    assert len(session.messages) == 4   # hello, reply, again, reply: the loaded history continued
    assert session.messages[0]["content"] == "hello"


def test_chat_command_through_stdin(ckpt, tmp_path, monkeypatch, capsys):
    import io

    from hybridlm.cli import main
    state = tmp_path / "c.state"
    r = subprocess.run([sys.executable, "-m", "hybridlm", "chat", "--model", str(ckpt), "--temperature", "0",
                        "--max-new-tokens", "4"], input=f"hello\n/save {state}\nbye\n", capture_output=True,
                       text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("prompt tokens") == 2 and state.exists()
    # resume it (in process: stdin replaced)
    monkeypatch.setattr(sys, "stdin", io.StringIO("next\n"))
    assert main(["chat", "--model", str(ckpt), "--load", str(state), "--temperature", "0",
                 "--max-new-tokens", "4", "--no-stats"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "prompt tokens" not in captured.err


def test_chat_command_errors(tmp_path, capsys):
    from hybridlm.cli import main
    assert main(["chat", "--model", str(tmp_path / "missing")]) == 2
    assert "neither a checkpoint directory nor a preset" in capsys.readouterr().err
    assert main(["chat", "--model", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["chat"])
    assert e.value.code == 2 and "give the model" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["chat", "--model", str(tmp_path), "--temperature", "warm"])
    assert e.value.code == 2 and "invalid float value" in capsys.readouterr().err
