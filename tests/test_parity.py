"""Logits parity with transformers' JambaForCausalLM, through the real loader and exporter."""
import pytest
import torch

from hybridlm import HybridLM

from .conftest import make_hf_checkpoint

CONFIGS = {
    # MoE on odd layers, attention period 2 offset 1, GQA 4/2, d_state 8
    "moe-gqa": dict(),
    # dense everywhere, attention at offset 0, one kv head, odd dt_rank, d_conv 3, no conv bias, proj bias
    "dense-offset0-mqa": dict(num_experts=1, attn_layer_period=3, attn_layer_offset=0, num_key_value_heads=1,
                              mamba_dt_rank=3, mamba_d_conv=3, mamba_conv_bias=False, mamba_proj_bias=True,
                              num_hidden_layers=5),
    # top-1 of 3 experts on layers 0,3; attention at 2; d_state 5, d_conv 2, expand 1
    "top1-dstate5": dict(num_experts=3, num_experts_per_tok=1, expert_layer_period=3, expert_layer_offset=0,
                         attn_layer_period=4, attn_layer_offset=2, mamba_d_state=5, mamba_d_conv=2, mamba_expand=1,
                         num_hidden_layers=6),
    # the Jamba block: attention 1 in 8 at offset 4, MoE every second layer
    "jamba-block": dict(num_hidden_layers=8, attn_layer_period=8, attn_layer_offset=4, hidden_size=48,
                        num_attention_heads=6, num_key_value_heads=3, mamba_d_state=16, mamba_dt_rank=5),
    # pure Mamba (no attention layer at all) with all layers MoE
    "pure-mamba-all-moe": dict(attn_layer_period=5, attn_layer_offset=4, num_hidden_layers=4,
                               expert_layer_period=1, expert_layer_offset=0, mamba_conv_bias=True,
                               mamba_proj_bias=True),
}


def _tokens(vocab, b=2, l=23, seed=1):
    return torch.randint(0, vocab, (b, l), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(tmp_path, name):
    ref = make_hf_checkpoint(tmp_path, seed=3, **CONFIGS[name])
    ours = HybridLM.from_pretrained(tmp_path)
    assert ours.config.pattern != ""  # layout derived from Jamba's period fields
    x = _tokens(ref.config.vocab_size)
    with torch.no_grad():
        want = ref(x, use_cache=False).logits
        got = ours(x)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


def test_sharded_checkpoint(tmp_path):
    ref = make_hf_checkpoint(tmp_path, seed=4, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ours = HybridLM.from_pretrained(tmp_path)
    x = _tokens(ref.config.vocab_size)
    with torch.no_grad():
        assert (ours(x) - ref(x, use_cache=False).logits).abs().max().item() <= 1e-4


def test_bf16_checkpoint_loaded_as_fp32(tmp_path):
    from transformers import JambaForCausalLM
    make_hf_checkpoint(tmp_path, seed=5, dtype=torch.bfloat16)
    ref = JambaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = HybridLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert next(ours.parameters()).dtype == torch.float32
    x = _tokens(ref.config.vocab_size)
    with torch.no_grad():
        assert (ours(x) - ref(x, use_cache=False).logits).abs().max().item() <= 1e-4


def test_bf16_checkpoint_keeps_its_dtype(tmp_path):
    make_hf_checkpoint(tmp_path, seed=5, dtype=torch.bfloat16)
    ours = HybridLM.from_pretrained(tmp_path)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert torch.isfinite(ours(_tokens(97)).float()).all()


@pytest.mark.parametrize("shard", [None, 30_000])
def test_export_loads_in_transformers(tmp_path, shard):
    from transformers import JambaForCausalLM
    ref = make_hf_checkpoint(tmp_path / "src", seed=6, **CONFIGS["jamba-block"])
    ours = HybridLM.from_pretrained(tmp_path / "src")
    ours.save_pretrained(tmp_path / "out", max_shard_bytes=shard)
    back = JambaForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = _tokens(ref.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(back(x, use_cache=False).logits, ref(x, use_cache=False).logits)
        assert (back(x, use_cache=False).logits - ours(x)).abs().max().item() <= 1e-4
    # and back into hybridlm, bit-identical
    again = HybridLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))


def test_export_of_fresh_model_loads_in_transformers(tmp_path):
    """A model defined here (not loaded) exports to a checkpoint transformers reads."""
    from transformers import JambaForCausalLM
    from hybridlm import preset
    model = HybridLM(preset("tiny", vocab_size=300)).init_weights(seed=0).eval()
    model.save_pretrained(tmp_path)
    back = JambaForCausalLM.from_pretrained(tmp_path).eval()
    x = _tokens(300)
    with torch.no_grad():
        assert (back(x, use_cache=False).logits - model(x)).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["moe-gqa", "dense-offset0-mqa"])
def test_greedy_generate_matches_transformers(tmp_path, name):
    ref = make_hf_checkpoint(tmp_path, seed=7, **CONFIGS[name])
    ours = HybridLM.from_pretrained(tmp_path)
    x = _tokens(ref.config.vocab_size, b=1, l=9, seed=2)
    want = ref.generate(x, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None,
                        attention_mask=torch.ones_like(x))
    got = ours.generate(x, max_new_tokens=12, temperature=0.0)
    assert got.shape == (1, 21)
    assert torch.equal(got, want)


def test_router_does_not_renormalise_topk(tmp_path):
    """Jamba keeps the top-k softmax weights as they are; renormalising changes the logits."""
    make_hf_checkpoint(tmp_path, seed=8)
    a = HybridLM.from_pretrained(tmp_path)
    cfg = a.config.replace(router_renormalize=True)
    b = HybridLM(cfg)
    b.load_state_dict(a.state_dict())
    x = _tokens(97)
    with torch.no_grad():
        assert (a(x) - b.eval()(x)).abs().max().item() > 1e-3
