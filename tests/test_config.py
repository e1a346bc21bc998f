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
def test_parameter_counts_equal_transformers(name):
    from transformers import JambaConfig, JambaForCausalLM
    cfg = preset(name)
    with torch.device("meta"):
        ours = HybridLM(cfg)
        ref = JambaForCausalLM(JambaConfig(**{k: v for k, v in cfg.to_dict().items()
                                              if k not in ("architectures", "model_type")}))
    assert ours.num_params() == sum(p.numel() for p in ref.parameters())
    if name == "bench-88m":
        assert ours.num_params() == 88_557_504
