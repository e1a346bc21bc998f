"""The Jamba 3B / 1.5-Mini presets, and seeded random-weight checkpoints written a block at a time."""
import json

import pytest
import torch

from hybridlm import HybridLM, preset
from hybridlm.checkpoint import load_model
from hybridlm.random_checkpoint import write_random_checkpoint

# odd widths, so blocks of 48 values split rows unevenly and leave tails under 16 values (d_inner 100 = 48 + 48
# + 4) that random_checkpoint._row_blocks must fold into the block before them
ODD = dict(vocab_size=97, hidden_size=50, intermediate_size=56, num_attention_heads=2, num_key_value_heads=1,
           mamba_dt_rank=3)


def _tensors(path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read by the reference safetensors library."""
    from safetensors.torch import load_file
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_reasoning_3b_preset():
    cfg = preset("jamba-reasoning-3b")
    assert [i for i in range(28) if cfg.mixer(i) == "attention"] == [7, 21]
    assert not any(cfg.is_moe(i) for i in range(28))
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size) == (2560, 20, 1, 128)
    assert (cfg.d_inner, cfg.mamba_dt_rank, cfg.intermediate_size, cfg.vocab_size) == (5120, 160, 8192, 65536)
    assert cfg.rope_theta is None and not cfg.tie_word_embeddings
    model = load_model("jamba-reasoning-3b", device="meta")
    assert 3.0e9 <= model.num_params() <= 3.4e9
    assert model.num_params() == model.num_params(active=True)


def test_reasoning_3b_has_transformers_names_and_shapes():
    from transformers import JambaConfig, JambaForCausalLM
    d = preset("jamba-reasoning-3b").to_dict()
    with torch.device("meta"):
        ref = JambaForCausalLM(JambaConfig(**{k: v for k, v in d.items() if k not in ("architectures", "model_type")}))
    ours = load_model("jamba-reasoning-3b", device="meta")
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_jamba_15_mini_preset():
    cfg = preset("jamba-1.5-mini")
    assert [i for i in range(32) if cfg.mixer(i) == "attention"] == [4, 12, 20, 28]
    assert [i for i in range(32) if cfg.is_moe(i)] == list(range(1, 32, 2))
    model = load_model("jamba-1.5-mini", device="meta")
    assert 51e9 <= model.num_params() <= 53e9
    assert 11.5e9 <= model.num_params(active=True) <= 12.5e9


@pytest.mark.parametrize("tied", [False, True])
def test_random_checkpoint_is_init_weights(tmp_path, tied):
    cfg = preset("tiny", **ODD, tie_word_embeddings=tied)
    write_random_checkpoint(cfg, tmp_path, seed=3, dtype=torch.float32, max_shard_bytes=50_000, block=48)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "float32"
    want = HybridLM(cfg).init_weights(3).state_dict()
    if tied:
        want.pop("lm_head.weight")
    stored = _tensors(tmp_path)
    assert stored.keys() == want.keys() == index["weight_map"].keys()
    assert all(torch.equal(stored[k], want[k]) for k in want)
    loaded = HybridLM.from_pretrained(tmp_path).state_dict()
    assert all(torch.equal(loaded[k], want[k]) for k in want)
    if tied:
        assert torch.equal(loaded["lm_head.weight"], want["model.embed_tokens.weight"])


def test_random_checkpoint_in_bf16_is_init_weights_cast(tmp_path):
    cfg = preset("tiny", **ODD)
    write_random_checkpoint(cfg, tmp_path, seed=1, max_shard_bytes=None, block=48)
    assert [f.name for f in tmp_path.glob("*.safetensors")] == ["model.safetensors"]
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    want = HybridLM(cfg).init_weights(1).to(torch.bfloat16).state_dict()
    loaded = HybridLM.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert all(torch.equal(loaded.state_dict()[k], want[k]) for k in want)


def test_seed_decides_the_files(tmp_path):
    cfg = preset("tiny", **ODD)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_random_checkpoint(cfg, tmp_path / name, seed=seed, max_shard_bytes=50_000)
    files = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert files == sorted(f.name for f in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    a, c = _tensors(tmp_path / "a"), _tensors(tmp_path / "c")
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert not torch.equal(a["model.layers.0.mamba.dt_proj.bias"], c["model.layers.0.mamba.dt_proj.bias"])
    assert torch.equal(a["model.layers.0.mamba.A_log"], c["model.layers.0.mamba.A_log"])


def test_initialisation_statistics(tmp_path):
    cfg = preset("tiny")
    write_random_checkpoint(cfg, tmp_path, seed=0, dtype=torch.float32, block=1 << 12)
    sd = _tensors(tmp_path)
    n = cfg.mamba_d_state
    for k, t in sd.items():
        if k.endswith("A_log"):
            assert torch.allclose(t, torch.log(torch.arange(1.0, n + 1)).expand(cfg.d_inner, n))
        elif k.endswith(".D") or "layernorm" in k:
            assert torch.equal(t, torch.ones_like(t)), k
        elif k.endswith("dt_proj.bias"):
            dt = torch.nn.functional.softplus(t)
            assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001, k
            assert dt.log().std() > 1.0  # spread over two decades, not one constant
        elif k.endswith("bias"):
            assert torch.equal(t, torch.zeros_like(t)), k
        else:  # normal(0, initializer_range): mean and std within 5 standard errors
            std, se = cfg.initializer_range, 5 / t.numel() ** 0.5
            assert abs(t.mean().item()) < std * se and abs(t.std().item() / std - 1) < se / 2 ** 0.5, k


@pytest.mark.parametrize("ffn", [dict(num_experts=1), dict(num_experts=4, num_experts_per_tok=2)],
                         ids=["dense", "moe"])
def test_transformers_reads_random_checkpoint(tmp_path, ffn):
    from transformers import JambaForCausalLM
    # a larger initializer_range than the default 0.02 gives logits of order 1, so 1e-4 means something;
    # not ODD: transformers' grouped expert matmul needs rows of a multiple of 16 bytes
    cfg = preset("tiny", **ffn, initializer_range=0.1)
    write_random_checkpoint(cfg, tmp_path, seed=2, dtype=torch.float32, max_shard_bytes=100_000)
    ref = JambaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = HybridLM.from_pretrained(tmp_path)
    x = torch.randint(0, cfg.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x, use_cache=False).logits
        got = ours(x)
    assert want.std() > 0.1
    assert (got - want).abs().max().item() <= 1e-4


FAMILY_CONFIGS = {
    # Granite 4.0-H: fused gate|up, experts stacked [e, ...], renamed norms: drawn out of order
    "granitemoehybrid": dict(layout="SSAS", num_experts=4, num_experts_per_tok=2, router_renormalize=True,
                             shared_expert_intermediate_size=24, logits_scaling=1.5, embedding_multiplier=2.0),
    # Bamba: our own tensor names, its config.json
    "bamba": dict(layout="sass", num_experts=1, num_experts_per_tok=1, rope_theta=1e4,
                  partial_rotary_factor=0.5),
}


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_random_checkpoint_of_a_family_is_written_in_its_format(tmp_path, family):
    """A family config's random checkpoint holds that family's names (what save_pretrained writes) and the
    values of init_weights; transformers loads it with our logits."""
    import transformers
    cfg = preset("tiny", vocab_size=97, hidden_size=32, intermediate_size=16, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, mamba2_n_heads=4, mamba2_head_dim=16,
                 mamba2_n_groups=2, mamba2_d_state=8, mamba2_chunk_size=4, initializer_range=0.1, family=family,
                 **FAMILY_CONFIGS[family])
    write_random_checkpoint(cfg, tmp_path / "rand", seed=4, dtype=torch.float32, max_shard_bytes=20_000, block=32)
    want = HybridLM(cfg).init_weights(4)
    want.save_pretrained(tmp_path / "saved")
    assert set(_tensors(tmp_path / "rand")) == set(_tensors(tmp_path / "saved"))
    assert json.loads((tmp_path / "rand" / "config.json").read_text())["model_type"] == family
    loaded = HybridLM.from_pretrained(tmp_path / "rand")
    assert all(torch.equal(loaded.state_dict()[k], t) for k, t in want.state_dict().items())
    arch = json.loads((tmp_path / "rand" / "config.json").read_text())["architectures"][0]
    ref = getattr(transformers, arch).from_pretrained(tmp_path / "rand", dtype=torch.float32).eval()
    x = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ref(x, use_cache=False).logits - want(x)).abs().max().item() <= 1e-4
