"""Config: layouts, Jamba field compatibility, validation messages, presets."""
import json

import pytest
import torch

from hybridlm import PRESETS, HybridConfig, HybridLM, preset
from hybridlm.config import expand_pattern


def test_jamba_fields_give_the_jamba_layout():
    cfg = preset("jamba-v0.1")
    assert cfg.pattern == "mMmMaMmM" * 4
    assert [i for i in range(32) if cfg.mixer(i) == "attention"] == [4, 12, 20, 28]
    assert [i for i in range(32) if cfg.is_moe(i)] == list(range(1, 32, 2))


def test_pattern_notation():
    assert expand_pattern("mMmM aMmM") == "mMmMaMmM"
    assert expand_pattern("mMmMaMmM*2") == "mMmMaMmM" * 2
    assert expand_pattern("mm|aa") == "mmaa"
    assert expand_pattern("(mmma)*2+wW") == "mmmammmawW"
    cfg = HybridConfig(**{**PRESETS["tiny"], "layout": "mamwMAMW", "sliding_window": 16})
    assert [cfg.mixer(i) for i in range(8)] == ["mamba", "attention", "mamba", "local"] * 2
    assert [cfg.is_moe(i) for i in range(8)] == [False] * 4 + [True] * 4


def test_pattern_written_as_jamba_fields_when_periodic(tmp_path):
    cfg = HybridConfig(**{**PRESETS["tiny"], "layout": "mmmammma"})
    d = cfg.to_dict()
    assert (d["attn_layer_period"], d["attn_layer_offset"]) == (4, 3)
    assert "layout" not in d
    back = HybridConfig.from_dict(d)
    assert back.pattern == "mmmammma"


def test_non_periodic_pattern_round_trips(tmp_path):
    cfg = HybridConfig(**{**PRESETS["tiny"], "layout": "aAmmmaMm"})
    cfg.to_json(tmp_path / "config.json")
    d = json.loads((tmp_path / "config.json").read_text())
    assert d["model_type"] == "jamba" and d["layout"] == "aAmmmaMm"
    assert HybridConfig.from_json(tmp_path / "config.json").pattern == "aAmmmaMm"


def test_transformers_reads_our_config(tmp_path):
    from transformers import JambaConfig
    cfg = preset("bench-88m")
    cfg.to_json(tmp_path / "config.json")
    hf = JambaConfig.from_pretrained(tmp_path)
    assert hf.layers_block_type == ["attention" if cfg.mixer(i) == "attention" else "mamba" for i in range(8)]
    assert hf.layers_num_experts == [4 if cfg.is_moe(i) else 1 for i in range(8)]
    assert hf.mamba_dt_rank == cfg.mamba_dt_rank == 32


@pytest.mark.parametrize("kw, words", [
    (dict(attn_layer_period=4, attn_layer_offset=4), "attn_layer_offset (4) must be smaller than attn_layer_period (4)"),
    (dict(expert_layer_period=2, expert_layer_offset=3), "expert_layer_offset (3) must be smaller"),
    (dict(hidden_size=100, num_attention_heads=8), "num_attention_heads (8) must divide hidden_size (100)"),
    (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads (3) must divide num_attention_heads (4)"),
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok (5) cannot exceed num_experts (4)"),
    (dict(layout="mmxa"), "unknown symbol(s) ['x']"),
    (dict(layout="mmma"), "layout has 4 layers but num_hidden_layers is 8"),
    (dict(layout="mmmammmw"), "sliding_window is not set"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
])
def test_validation_messages(kw, words):
    with pytest.raises(ValueError) as e:
        HybridConfig(**{**PRESETS["tiny"], **kw})
    assert words in str(e.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="available: tiny, bench-88m, jamba-v0.1"):
        preset("bench88m")


def test_unsupported_model_type():
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        HybridConfig.from_dict({"model_type": "llama"})


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts_equal_transformers(name, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, JambaConfig, JambaForCausalLM
    cfg = preset(name)
    with torch.device("meta"):
        ours = HybridLM(cfg)
        if "s" in cfg.pattern.lower():       # a Mamba-2 preset: against its family's transformers class
            cfg.replace(family=cfg.family or "granitemoehybrid").to_json(tmp_path / "config.json")
            ref = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path))
        else:
            ref = JambaForCausalLM(JambaConfig(**{k: v for k, v in cfg.to_dict().items()
                                                  if k not in ("architectures", "model_type")}))
    assert ours.num_params() == sum(p.numel() for p in ref.parameters())
    if name == "bench-88m":
        assert ours.num_params() == 88_557_504


# ---- hostile or corrupt config.json --------------------------------------------------------------
@pytest.mark.parametrize("field, value, words", [
    ("attn_layer_period", 0, "attn_layer_period must be a positive integer, got 0"),
    ("expert_layer_period", -2, "expert_layer_period must be a positive integer"),
    ("attn_layer_offset", -1, "attn_layer_offset must be an integer >= 0, got -1"),
    ("rms_norm_eps", "1e-6", "rms_norm_eps must be a finite number > 0, got '1e-6'"),
    ("rms_norm_eps", -1e-6, "rms_norm_eps must be a finite number > 0"),
    ("rms_norm_eps", 0, "rms_norm_eps must be a finite number > 0"),
    ("rms_norm_eps", float("inf"), "rms_norm_eps must be a finite number > 0"),
    ("initializer_range", float("nan"), "initializer_range must be a finite number >= 0"),
    ("rope_theta", -1.0, "rope_theta must be a finite number > 0"),
    ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false (a JSON boolean), got 'false'"),
    ("mamba_conv_bias", 1, "mamba_conv_bias must be true or false"),
    ("hidden_size", True, "hidden_size must be a positive integer, got True (a boolean)"),
    ("hidden_size", 128.0, "hidden_size must be a positive integer, got 128.0 (a float)"),
    ("vocab_size", "4096", "vocab_size must be a positive integer, got '4096' (a string)"),
    ("mamba_dt_rank", "16", "mamba_dt_rank must be a positive integer"),
    ("head_dim", 0, "head_dim must be a positive integer"),
    ("sliding_window", "64", "sliding_window must be a positive integer"),
    ("max_position_embeddings", None, "max_position_embeddings must be a positive integer"),
    ("num_hidden_layers", 100_000, "num_hidden_layers is 100000, more than the 4096 hybridlm accepts"),
    ("num_experts", 100_000, "num_experts is 100000, more than the 4096 hybridlm accepts"),
    ("vocab_size", 2**40, "vocab_size is 1099511627776, more than the 2147483647"),
    ("eos_token_id", "2", "eos_token_id must be a token id"),
    ("layout", 5, "layout must be a pattern string"),
    ("layout", "m*1000000000", "has more than 4096 layers"),
    ("layout", "mmmm*99999999999999999999999", "has more than 4096 layers"),
])
def test_config_json_values_are_checked(field, value, words):
    d = {**preset("tiny").to_dict(), field: value}
    with pytest.raises(ValueError) as e:
        HybridConfig.from_dict(d)
    assert words in str(e.value)


def test_json_booleans_are_read_as_booleans():
    d = preset("tiny").to_dict()
    assert HybridConfig.from_dict({**d, "tie_word_embeddings": False}).tie_word_embeddings is False
    assert HybridConfig.from_dict({**d, "tie_word_embeddings": True}).tie_word_embeddings is True


def test_parameter_bound_refuses_absurd_sizes():
    """Each field within its own bound, the model as a whole beyond 10**13 parameters."""
    with pytest.raises(ValueError, match=r"describes a model of 1.41e\+14 parameters, more than the 1e\+13"):
        preset("tiny", vocab_size=2**31 - 1, hidden_size=2**15, num_attention_heads=4)


def test_num_params_matches_the_model():
    cfgs = [preset(n) for n in PRESETS] + [
        preset("tiny", layout="mAwMaMmW", sliding_window=8, head_dim=24, mamba_conv_bias=False,
               mamba_proj_bias=True, tie_word_embeddings=True),
        preset("tiny", num_experts=1, num_experts_per_tok=1)]
    for cfg in cfgs:
        with torch.device("meta"):
            assert HybridLM(cfg).num_params() == cfg.num_params()


def test_huge_layouts_are_refused_quickly_without_allocating():
    import time
    import tracemalloc
    tracemalloc.start()
    t = time.perf_counter()
    for kw in (dict(layout="mMmMaMmM*1000000000"), dict(num_hidden_layers=100_000),
               dict(num_experts=100_000), dict(layout="m" * 10**7)):
        with pytest.raises(ValueError):
            preset("tiny", **kw)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - t < 1.0
    assert peak < 64 * 2**20            # the 10**7-symbol string itself is 10 MB; nothing expanded


def test_layout_is_built_once_for_deep_stacks():
    """4096 layers: mixer()/is_moe() for every layer and the Jamba fields of a pattern in milliseconds
    (the old code rebuilt the pattern per layer, and searched periods in O(n^3))."""
    import time
    t = time.perf_counter()
    cfg = preset("tiny", num_hidden_layers=4096)
    kinds = [(cfg.mixer(i), cfg.is_moe(i)) for i in range(4096)]
    irregular = preset("tiny", num_hidden_layers=4096, layout="a" + "m" * 4094 + "a")
    assert irregular.to_dict()["attn_layer_period"] == 4095
    assert cfg.replace(layout=cfg.pattern).to_dict()["attn_layer_period"] == 8
    assert time.perf_counter() - t < 1.0
    assert kinds[4] == ("attention", False) and kinds[1] == ("mamba", True)
    cfg.num_hidden_layers = 8                        # the cache follows the fields it was built from
    assert cfg.pattern == "mMmMaMmM"


@pytest.mark.parametrize("layout", ["mmmammma", "aAmmmaMm", "mMmMaMmM", "amamamam", "mmmmmmmm", "MmmmmmmA", "a"])
def test_periodic_fields_agree_with_a_brute_force_search(layout):
    cfg = HybridConfig(**{**PRESETS["tiny"], "layout": layout, "num_hidden_layers": len(layout)})
    n = len(layout)

    def brute(idx):
        for period in range(1, n + 1):
            for offset in range(period):
                if [i for i in range(n) if i % period == offset] == idx:
                    return period, offset
        return None
    attn = [i for i, c in enumerate(layout) if c.lower() == "a"]
    moe = [i for i, c in enumerate(layout) if c.isupper()]
    a = brute(attn) if attn else (n + 1, n)
    e = brute(moe) if moe else (n + 1, n)
    want = None if a is None or e is None else {"attn_layer_period": a[0], "attn_layer_offset": a[1],
                                                "expert_layer_period": e[0], "expert_layer_offset": e[1]}
    assert cfg.periodic_fields() == want


def test_config_file_errors_name_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"vocab_size": 10,')
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        HybridConfig.from_json(path)
    path.write_bytes(b'{"vocab_size": "\xff"}')
    with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
        HybridConfig.from_json(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"{path}: a config must be a JSON object"):
        HybridConfig.from_json(path)
    path.write_text(json.dumps({**preset("tiny").to_dict(), "rms_norm_eps": "1e-6"}))
    with pytest.raises(ValueError, match=f"{path}: rms_norm_eps must be a finite number"):
        HybridConfig.from_json(path)
