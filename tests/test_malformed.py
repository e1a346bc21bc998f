"""Hostile input: malformed safetensors files, checkpoint directories and tokenizer files are refused
with one ValueError/OSError that names the file (the CLI prints it on one line and exits 2).

Every safetensors case runs the official ``safetensors`` library on the same bytes: what it refuses,
hybridlm/safetensors_io.py refuses; what hybridlm loads, it loads with the same tensors."""
import itertools
import json
import struct
import sys

import pytest
import torch

from hybridlm import HybridLM, preset
from hybridlm.cli import main
from hybridlm.safetensors_io import SafeTensorsFile, save_file

official = pytest.importorskip("safetensors.torch")

# the forms the official reader accepts and hybridlm refuses on purpose (safetensors_io's docstring)
STRICTER = ("twice in one object", "is a JSON list, not an object", "which hybridlm does not read")


def header_file(header, data: bytes = b"", raw: bytes | None = None, n: int | None = None) -> bytes:
    """8-byte size + JSON header (or ``raw`` header bytes, or a wrong size ``n``) + data."""
    h = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if n is None else n) + h + data


class Unclear(AssertionError):
    """A refusal of the promised type whose message does not name the file (or a subclass where the exact
    type is promised): a failure, but not a traceback."""


def ours(path):
    """('ok', {name: tensor}) or ('error', exception) from hybridlm's reader."""
    try:
        f = SafeTensorsFile(path)
        return "ok", {k: f.get(k).clone() for k in f.keys()}
    except Exception as e:  # noqa: BLE001 (the tests check the type)
        return "error", e


def theirs(path):
    try:
        return "ok", official.load_file(str(path))
    except Exception as e:  # noqa: BLE001 (SafetensorError, TypeError, ...)
        return "error", e


def as_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and as_bytes(a[k]) == as_bytes(b[k]) for k in a)


def assert_refused_by_both(path, words: str):
    got, err = ours(path)
    ref, ref_err = theirs(path)
    assert ref == "error", f"the official library accepts this file, so hybridlm must too: {ref_err}"
    assert got == "error" and type(err) is ValueError, f"expected a ValueError, got {got}: {err!r}"
    assert str(path) in str(err) and words in str(err), str(err)


def assert_loaded_like_official(path):
    got, tensors = ours(path)
    ref, ref_tensors = theirs(path)
    assert ref == "ok" and got == "ok", (ref_tensors, tensors)
    assert same_tensors(tensors, ref_tensors)


F32x2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
DATA = struct.pack("<2f", 1.5, -2.0)
ENTRY = b'"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'


def obj(members: bytes) -> bytes:
    return b"{" + members + b"}"


# (case, file bytes, words of hybridlm's message). The old reader loaded the first group with wrong
# weights and raised TypeError/KeyError/AttributeError/RecursionError on the second.
REFUSED = [
    ("negative begin offset (header bytes as weights)",
     header_file({"a": {**F32x2, "data_offsets": [-8, 0]}}, DATA), "is not two non-negative integers"),
    ("end offset past the file", header_file({"a": {**F32x2, "data_offsets": [8, 16]}}, DATA), "gap of 8 bytes"),
    ("offsets not dtype x shape", header_file({"a": {**F32x2, "shape": [1]}}, DATA), "needs 4"),
    ("overlapping ranges", header_file({"a": F32x2, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
                                       DATA), "overlaps the tensor before it"),
    ("gap between tensors", header_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                         "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, bytes(12)),
     "gap of 4 bytes"),
    ("trailing bytes after the last tensor", header_file({"a": F32x2}, DATA + b"\0" * 4), "trailing bytes"),
    ("truncated data", header_file({"a": F32x2}, DATA[:6]), "truncated"),
    ("end before begin", header_file({"a": {**F32x2, "data_offsets": [8, 0]}}, DATA), "hold -8 bytes"),
    ("metadata a list", header_file({"__metadata__": ["x"], "a": F32x2}, DATA), "__metadata__ must be an object"),
    ("metadata value not a string", header_file({"__metadata__": {"step": 3}, "a": F32x2}, DATA),
     "__metadata__ must be an object"),
    ("duplicate __metadata__", header_file(None, DATA, raw=b'{"__metadata__":{},"__metadata__":{},' + ENTRY + b"}"),
     "'__metadata__' twice"),
    ("duplicate field in an entry", header_file(None, DATA, raw=b'{"a":{"dtype":"F32","dtype":"F32","shape":[2],'
                                                                 b'"data_offsets":[0,8]}}'), "'dtype' twice"),
    ("shape of floats", header_file(None, DATA, raw=obj(ENTRY.replace(b"[2]", b"[2.0]"))), "shape [2.0]"),
    ("shape of booleans", header_file({"a": {**F32x2, "shape": [True, 2]}}, DATA), "shape [true, 2]"),
    ("-0 offset", header_file(None, DATA, raw=obj(ENTRY.replace(b"[0,8]", b"[-0,8]"))), "data_offsets"),
    ("offset beyond 64 bits", header_file({"a": {**F32x2, "data_offsets": [2**64, 2**64 + 8]}}, DATA),
     "data_offsets"),
    ("element count overflows 64 bits", header_file({"a": F32x2, "b": {"dtype": "U8", "shape": [2**40, 2**40, 0],
                                                                       "data_offsets": [8, 8]}}, DATA), "overflows"),
    ("three offsets", header_file({"a": {**F32x2, "data_offsets": [0, 8, 8]}}, DATA), "data_offsets"),
    ("NaN in the header", header_file(None, DATA, raw=obj(ENTRY.replace(b"[2]", b"[NaN]"))),
     "not valid JSON"),
    ("number out of range in an extra field", header_file(None, DATA, raw=b'{"a":{"dtype":"F32","shape":[2],'
                                                                           b'"data_offsets":[0,8],"x":1e999}}'),
     "out of range"),
    ("lone surrogate escape", header_file(None, DATA, raw=obj(ENTRY.replace(b'"a"', b'"\\ud800"'))),
     "lone UTF-16 surrogate"),
    ("not UTF-8", header_file(None, DATA, raw=obj(ENTRY.replace(b'"a"', b'"\xff"'))), "not UTF-8"),
    ("trailing garbage after the JSON", header_file(None, DATA, raw=b"{" + ENTRY + b"}\0\0"), "not valid JSON"),
    ("header nests 128 levels", header_file(None, DATA, raw=b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],'
                                                            b'"x":' + b"[" * 126 + b"]" * 126 + b"}}"),
     "deeper than 127 levels"),
    ("header nests 100,000 levels", header_file(None, raw=b"[" * 100_000 + b"]" * 100_000), "deeper than 127"),
    ("header is a list", header_file([1, 2]), "is a JSON list, not an object"),
    ("header is a number", header_file(7), "is a JSON int, not an object"),
    ("header is a string", header_file("a"), "is a JSON str, not an object"),
    ("entry is a number", header_file({"a": 3}, DATA), "its entry is a JSON int"),
    ("entry without dtype", header_file({"a": {"shape": [2], "data_offsets": [0, 8]}}, DATA), "has no dtype"),
    ("entry without shape", header_file({"a": {"dtype": "F32", "data_offsets": [0, 8]}}, DATA), "has no shape"),
    ("entry without data_offsets", header_file({"a": {"dtype": "F32", "shape": [2]}}, DATA), "has no data_offsets"),
    ("unknown dtype", header_file({"a": {**F32x2, "dtype": "F31"}}, DATA), "unknown dtype 'F31'"),
    ("lower-case dtype", header_file({"a": {**F32x2, "dtype": "f32"}}, DATA), "unknown dtype 'f32'"),
    ("header length beyond the file", header_file({"a": F32x2}, DATA, n=10_000), "exceeds the file"),
    ("header length 2**64 - 1", header_file({"a": F32x2}, DATA, n=2**64 - 1), "exceeds the format's limit"),
    ("empty header", header_file(None, raw=b""), "not valid JSON"),
    ("shorter than 8 bytes", b"\x02\0\0", "shorter than the 8-byte header size"),
]


@pytest.mark.parametrize("case, data, words", REFUSED, ids=[c[0] for c in REFUSED])
def test_official_refusals_are_refused_with_the_file_named(tmp_path, case, data, words):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert_refused_by_both(path, words)


def test_header_over_100_mb_is_refused_before_it_is_read(tmp_path):
    """A valid header padded past the official 100 MB limit (JSON allows trailing spaces): the old
    reader parsed it and loaded the file."""
    raw = json.dumps({"a": F32x2}).encode()
    raw += b" " * (100_000_001 - len(raw))
    path = tmp_path / "big.safetensors"
    path.write_bytes(header_file(None, DATA, raw=raw))
    assert_refused_by_both(path, "exceeds the format's limit of 100000000 bytes")


ACCEPTED = [
    ("null metadata", header_file({"__metadata__": None, "a": F32x2}, DATA)),
    ("extra fields in an entry", header_file({"a": {**F32x2, "x": [-1, {"y": None}], "z": 2**70}}, DATA)),
    ("entries out of offset order", header_file({"b": {"dtype": "I16", "shape": [2], "data_offsets": [8, 12]},
                                                 "a": F32x2}, DATA + b"\1\0\2\0")),
    ("zero-size tensors anywhere", header_file({"e": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
                                                "a": F32x2,
                                                "z": {"dtype": "U8", "shape": [0, 2**40, 2**40],
                                                      "data_offsets": [8, 8]}}, DATA)),
    ("a scalar", header_file({"s": {"dtype": "F64", "shape": [], "data_offsets": [0, 8]}}, struct.pack("<d", 3.25))),
    ("unaligned data", header_file(None, DATA, raw=b"{" + ENTRY + b"}")),
    ("whitespace around the header", header_file(None, DATA, raw=b" \t\n{" + ENTRY + b"}\r\n  ")),
    ("escaped names", header_file(None, DATA, raw=b'{"\\u00e9\\ud83d\\ude00":{"dtype":"F\\u0033\\u0032",'
                                                  b'"shape":[2],"data_offsets":[0,8]}}')),
    ("every dtype torch has", None),
    ("no tensors", header_file({})),
]


@pytest.mark.parametrize("case, data", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_what_the_official_library_loads_loads_the_same(tmp_path, case, data):
    path = tmp_path / "model.safetensors"
    path.write_bytes(data if data is not None else _every_dtype())
    assert_loaded_like_official(path)


def _every_dtype() -> bytes:
    """Two elements of each dtype torch has, packed back to back (most of them unaligned)."""
    from hybridlm.safetensors_io import _DTYPES
    header, pos = {}, 0
    for name, dtype in _DTYPES.items():
        header[name] = {"dtype": name, "shape": [2], "data_offsets": [pos, pos + 2 * dtype.itemsize]}
        pos += 2 * dtype.itemsize
    return header_file(header, bytes([0, 1]) * (pos // 2))


STRICTER_CASES = [
    ("a name given twice (official: the last wins)",
     header_file(None, DATA, raw=b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},' + ENTRY + b"}"),
     "'a' twice"),
    ("a metadata key given twice", header_file(None, DATA, raw=b'{"__metadata__":{"k":"1","k":"2"},' + ENTRY + b"}"),
     "'k' twice"),
    ("an entry as a list", header_file({"a": ["F32", [2], [0, 8]]}, DATA), "is a JSON list, not an object"),
    ("4-bit floats", header_file({"a": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, b"\1\2"),
     "dtype F4, which hybridlm does not read"),
]


@pytest.mark.parametrize("case, data, words", STRICTER_CASES, ids=[c[0] for c in STRICTER_CASES])
def test_stricter_than_official_only_where_documented(tmp_path, case, data, words):
    """The official reader accepts these; no writer produces them, and hybridlm refuses them by name."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    assert theirs(path)[0] == "ok"
    got, err = ours(path)
    assert got == "error" and type(err) is ValueError and str(path) in str(err) and words in str(err)
    assert any(s in str(err) for s in STRICTER)


def test_files_written_by_either_writer_load_in_both(tmp_path):
    tensors = {"w": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "i": torch.arange(4), "e": torch.zeros(0, 2),
               "s": torch.tensor(2.5, dtype=torch.float64)}
    save_file(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    official.save_file(tensors, str(tmp_path / "theirs.safetensors"), metadata={"format": "pt"})
    for name in ("ours", "theirs"):
        assert_loaded_like_official(tmp_path / f"{name}.safetensors")
    with pytest.raises(ValueError, match="maps strings to strings"):
        save_file(tensors, tmp_path / "x.safetensors", metadata={"step": 3})


# ---- fuzz: mutations of a valid file ------------------------------------------------------------
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_BASE_TENSORS = {"w": torch.arange(6, dtype=torch.float32).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.int16),
                 "h": torch.ones(3, dtype=torch.bfloat16), "e": torch.zeros(0, 4)}
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
                     | st.text(max_size=4) | st.sampled_from(["F32", "I16", "BF16", "F4", "U8", "F8_E4M3", "X"]),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                     max_leaves=6)
_SNIPPETS = [b",", b"-", b"0", b"1e999", b"NaN", b"[", b"]", b"{", b"}", b'"', b"\\ud800", b"-0", b" ",
             b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},', b"\xff", b"99999999999999999999"]


def _base() -> tuple[dict, bytes]:
    """A valid file's header (parsed) and its data bytes."""
    from hybridlm.safetensors_io import _NAMES
    header, data, pos = {"__metadata__": {"format": "pt"}}, b"", 0
    for k, t in _BASE_TENSORS.items():
        b = as_bytes(t)
        header[k] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(b)]}
        data, pos = data + b, pos + len(b)
    return header, data


def _field_edit(draw) -> bytes:
    header, data = _base()
    key = draw(st.sampled_from(list(header)))
    if key == "__metadata__":
        header[key] = draw(_JSON)
    else:
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra", "entry", "delete"]))
        e = header[key]
        if field == "delete":
            del e[draw(st.sampled_from(list(e)))]
        elif field == "entry":
            header[key] = draw(_JSON)
        elif field == "extra":
            e["x"] = draw(_JSON)
        elif field == "data_offsets" and draw(st.booleans()):
            i = draw(st.integers(0, 1))
            e[field][i] += draw(st.integers(-12, 12))
        elif field == "shape" and draw(st.booleans()):
            e[field] = draw(st.lists(st.integers(0, 2**65), max_size=4))
        else:
            e[field] = draw(_JSON)
    raw = json.dumps(header).encode() + b" " * draw(st.integers(0, 9))
    return header_file(None, data, raw=raw, n=len(raw) + draw(st.sampled_from([0, 0, 0, -1, 1, 8, -8])))


@st.composite
def mutated_files(draw) -> bytes:
    header, data = _base()
    raw = json.dumps(header).encode()
    valid = header_file(None, data, raw=raw)
    kind = draw(st.sampled_from(["bytes", "length", "field", "snippet"]))
    if kind == "bytes":            # flip bytes anywhere: size, header, data
        b = bytearray(valid)
        for _ in range(draw(st.integers(1, 4))):
            b[draw(st.integers(0, len(b) - 1))] = draw(st.integers(0, 255))
        return bytes(b)
    if kind == "length":           # truncate or append
        cut = draw(st.integers(0, len(valid) + 16))
        return valid[:cut] if cut <= len(valid) else valid + bytes(cut - len(valid))
    if kind == "field":            # a header field changed, removed or duplicated
        return _field_edit(draw)
    at = draw(st.integers(0, len(raw)))       # text inserted into the header JSON
    raw = raw[:at] + draw(st.sampled_from(_SNIPPETS)) + raw[at:]
    return header_file(None, data, raw=raw)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


_counter = itertools.count()


@settings(max_examples=300, deadline=1000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_files())
def test_fuzz_mutated_files_load_like_official_or_raise_valueerror(fuzz_dir, data):
    """Each example: hybridlm loads the file and the official library loads the same tensors, or
    hybridlm raises a ValueError naming the file (and then the official library refuses it too, but
    for the documented stricter cases); each within the 1 s deadline."""
    check_mutated_file(fuzz_dir, data)


def check_mutated_file(directory, data: bytes) -> str:
    """One fuzz example (also benchmarks/fuzz.py's): "ok" (loaded like the official library) or "refused"
    (a ValueError naming the file); an AssertionError for a wrong result, ``Unclear`` for an error that
    does not name the file, and any other exception hybridlm's reader raised is re-raised."""
    path = directory / f"{next(_counter)}.safetensors"     # a fresh name: earlier files may still be mapped
    path.write_bytes(data)
    got, result = ours(path)
    ref, ref_result = theirs(path)
    if got == "ok":
        assert ref == "ok", f"hybridlm loaded a file the official library refuses: {ref_result}"
        assert same_tensors(result, ref_result)
        return "ok"
    if not isinstance(result, ValueError):
        raise result
    if not (type(result) is ValueError and str(path) in str(result)):
        raise Unclear(repr(result))
    if ref == "ok":
        assert any(s in str(result) for s in STRICTER), str(result)
    return "refused"


# ---- malformed checkpoint directories ------------------------------------------------------------
def tiny_checkpoint(path, sharded: bool = True):
    cfg = preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, num_experts=2, num_experts_per_tok=1,
                 layout="mA")
    model = HybridLM(cfg).init_weights(0)
    model.save_pretrained(path, max_shard_bytes=20_000 if sharded else None)   # sharded: an index, several files
    return model


@pytest.mark.parametrize("index, words", [
    ({"metadata": {}}, 'needs a "weight_map" object'),
    ({"weight_map": ["model-00001-of-00002.safetensors"]}, 'needs a "weight_map" object'),
    ([1, 2], 'needs a "weight_map" object'),
    ({"weight_map": {"lm_head.weight": "../../etc/passwd"}}, "not file names in its directory"),
    ({"weight_map": {"lm_head.weight": 3}}, "not file names in its directory"),
])
def test_bad_index_names_the_file(tmp_path, index, words):
    tiny_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError) as e:
        HybridLM.from_pretrained(tmp_path)
    assert str(tmp_path / "model.safetensors.index.json") in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_invalid_json_names_the_file(tmp_path, name):
    tiny_checkpoint(tmp_path)
    (tmp_path / name).write_text('{"vocab_size": 64,')
    with pytest.raises(ValueError, match=f"{tmp_path / name} is not valid JSON"):
        HybridLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("config, words", [
    ([1, 2], "must be a JSON object"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
    ({"attn_layer_period": 0}, "attn_layer_period must be a positive integer"),
    ({"num_hidden_layers": 100_000}, "num_hidden_layers is 100000, more than the 4096"),
])
def test_bad_config_names_the_file_and_field(tmp_path, config, words):
    tiny_checkpoint(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**d, **config} if isinstance(config, dict) else config))
    with pytest.raises(ValueError) as e:
        HybridLM.from_pretrained(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value) and words in str(e.value)


def test_malformed_weights_name_the_shard(tmp_path):
    tiny_checkpoint(tmp_path)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    k = next(k for k in header if k != "__metadata__")
    header[k]["data_offsets"][0] -= 8                      # the old reader read header bytes as weights
    raw = json.dumps(header).encode()
    shard.write_bytes(header_file(None, bytes(data[8 + n:]), raw=raw))
    with pytest.raises(ValueError, match=f"{shard} is not a valid safetensors file"):
        HybridLM.from_pretrained(tmp_path)


def test_wrong_dtype_and_absurd_fused_experts_are_reported(tmp_path):
    """An integer tensor for a float parameter, and an empty fused-expert tensor claiming 10**18 experts
    (the old loader split it for ever): both named, nothing allocated."""
    tiny_checkpoint(tmp_path, sharded=False)
    f = SafeTensorsFile(tmp_path / "model.safetensors")
    sd = {k: f.get(k).clone() for k in f.keys()}
    del f
    a_log = next(k for k in sd if k.endswith("A_log"))
    sd[a_log] = sd[a_log].long()
    fused = "model.layers.1.feed_forward.experts.gate_up_proj"
    sd[fused] = torch.zeros(0, 2, 4)
    save_file(sd, tmp_path / "model.safetensors")
    raw = (tmp_path / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header[fused]["shape"] = [10**18, 0, 4]
    (tmp_path / "model.safetensors").write_bytes(header_file(None, raw[8 + n:], raw=json.dumps(header).encode()))
    with pytest.raises(ValueError) as e:
        HybridLM.from_pretrained(tmp_path)
    assert f"{a_log}: expected a float tensor (F32, BF16, F16, F64), found torch.int64" in str(e.value)
    assert f"unexpected tensors (1): {fused}" in str(e.value)


def test_garbage_pickle_is_a_valueerror(tmp_path):
    tiny_checkpoint(tmp_path)
    for p in tmp_path.glob("model*"):
        p.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="pytorch_model.bin is not a readable PyTorch weights file"):
        HybridLM.from_pretrained(tmp_path, allow_pickle=True)


def test_tokenizer_files_name_themselves(tmp_path):
    from hybridlm.tokenizer import load_tokenizer
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("{'bos_token': 1}")
    with pytest.raises(ValueError, match=f"{tmp_path / 'tokenizer_config.json'} is not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1]")
    with pytest.raises(ValueError, match="tokenizer_config.json must hold a JSON object"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not a readable tokenizer.json"):
        load_tokenizer(tmp_path)


def test_garbage_sentencepiece_model_names_the_file(tmp_path):
    pytest.importorskip("sentencepiece")
    from hybridlm.tokenizer import load_tokenizer
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage\xff" * 10)
    with pytest.raises(ValueError, match=f"{tmp_path / 'tokenizer.model'} is not a readable SentencePiece model"):
        load_tokenizer(tmp_path)


# ---- the CLI: one line, exit code 2 --------------------------------------------------------------
def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert all(w in err for w in words), err


def test_cli_one_line_for_malformed_checkpoints(tmp_path, capsys):
    tiny_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{")
    assert main(["inspect", str(tmp_path)]) == 2
    _one_line_error(capsys, str(tmp_path / "config.json"), "not valid JSON")
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()                       # an OSError that is not FileNotFoundError
    assert main(["inspect", str(tmp_path)]) == 2
    _one_line_error(capsys, "config.json")


def test_cli_one_line_for_malformed_weights(tmp_path, capsys):
    tiny_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    assert main(["generate", str(tmp_path), "--prompt", "1 2", "--max-new-tokens", "1"]) == 2
    _one_line_error(capsys, "model.safetensors.index.json", "weight_map")


def test_cli_names_the_extra_of_a_missing_optional_dependency(monkeypatch, capsys):
    """`hybridlm serve` without fastapi/uvicorn: the old CLI died with a ModuleNotFoundError traceback."""
    monkeypatch.setitem(sys.modules, "uvicorn", None)       # `import uvicorn` now raises ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert main(["serve", "tiny"]) == 2
    _one_line_error(capsys, "pip install 'hybridlm[serve]'")


def test_cli_extras_table_matches_pyproject():
    """The CLI names extras from its own table of import names: it must say what pyproject.toml says."""
    import re
    from pathlib import Path
    tomllib = pytest.importorskip("tomllib")
    from hybridlm.cli import EXTRAS
    extras = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for extra, modules in EXTRAS.items():
        assert set(modules) == {re.match(r"[A-Za-z0-9_.-]+", r).group().replace("-", "_") for r in extras[extra]}


# ---- chat templates: untrusted text that runs; every render is bounded ----------------------------------
HOSTILE_TEMPLATES = [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loops more than"),
    ("{{ 'x' * 10**10 }}", "repeats a sequence"),
    ("{% set n = 10**9 %}{{ 7 ** n }}", "to the power"),
    ("{{ lipsum(10**7) }}", "lipsum"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recurses"),
    ("{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}", "exceeds"),
]


@pytest.mark.parametrize("template,words", HOSTILE_TEMPLATES)
def test_hostile_chat_templates_are_refused_quickly(template, words):
    import time

    from hybridlm.chat_template import ChatTemplate
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=words):
        ChatTemplate(template).render([{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 10


def test_a_render_is_stopped_at_its_deadline(monkeypatch):
    """Work that stays under the loop and size bounds still ends at MAX_TEMPLATE_SECONDS."""
    from hybridlm import chat_template
    monkeypatch.setattr(chat_template, "MAX_TEMPLATE_SECONDS", 0.0)
    t = chat_template.ChatTemplate("{% for i in range(10000) %}{{ i }}{% endfor %}")
    with pytest.raises(ValueError, match="took more than"):
        t.render([{"role": "user", "content": "hi"}])
    monkeypatch.setattr(chat_template, "MAX_TEMPLATE_SECONDS", 10.0)
    assert t.render([{"role": "user", "content": "hi"}]) == "".join(map(str, range(10000)))
