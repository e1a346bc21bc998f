"""NVIDIA Nemotron-H: layers of one sublayer each (the layout's ``s_``, ``a_``, ``f``), the relu^2 MLP, the cache
without state for feed-forward-only layers, and parity with transformers' NemotronHForCausalLM through the real
loader and exporter."""
import json
import re

import pytest
import torch

from hybridlm import HybridLM, preset
from hybridlm.cache import KVState, Mamba2State, Snapshot
from hybridlm.config import HybridConfig
from hybridlm.generate import Generation, left_pad, prefill, stream

from .conftest import randomize_
from .test_generate import assert_chunked_prefill_matches, assert_decode_matches_forward


def ids(b, l, seed=0, vocab=97):
    return torch.randint(0, vocab, (b, l), generator=torch.Generator().manual_seed(seed))


# ---- parity with transformers -----------------------------------------------------------------------------
def _hf(pattern, seed=3, **kw):
    from transformers import NemotronHConfig, NemotronHForCausalLM
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=8, chunk_size=4,
                conv_kernel=4, pad_token_id=0)
    torch.manual_seed(seed)
    ref = NemotronHForCausalLM(NemotronHConfig(hybrid_override_pattern=pattern, **{**base, **kw})).eval()
    randomize_(ref, seed)            # A_log, D, dt_bias, every norm (the gated one too), biases
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():            # the routers' load-balancing bias (a buffer): the choice then differs from the weights
        for name, b in ref.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    return ref


PARITY = {
    # Nemotron-H-8B's rhythm: M- pairs with attention among them; 2 groups of B/C, d_state 8 != head_dim 16
    "8b-like": ("M-M-M*-M-", dict()),
    # an MLP first, consecutive mixers (MM, M*), 5 odd-sized heads of 12 in 5 groups of 1, d_conv 3, biases on
    # the Mamba projections, no conv bias, 5 query heads on 1 key/value head
    "mlp-first-groups5": ("-MM*M--", dict(mamba_num_heads=5, mamba_head_dim=12, n_groups=5, ssm_state_size=6,
                                         conv_kernel=3, use_bias=True, use_conv_bias=False, num_attention_heads=5,
                                         num_key_value_heads=1, head_dim=6, chunk_size=8)),
    # attention first and last, 3 heads of 24 in 3 groups, a dt floor that bites (time_step_min: 1e-3 in logits);
    # tie_word_embeddings, which transformers' NemotronH does not honour (no tied keys): the stored lm_head is used
    "attention-ends-tied": ("*M-M*", dict(mamba_num_heads=3, mamba_head_dim=24, n_groups=3, ssm_state_size=10,
                                          tie_word_embeddings=True, time_step_min=0.3, layer_norm_epsilon=1e-6)),
    # no attention at all: Mamba-2 and MLPs
    "pure-ssd": ("M-MM-", dict(n_groups=1, mamba_num_heads=8, mamba_head_dim=8, chunk_size=16)),
    # MoE (Nemotron-3-Nano's kind): 8 relu^2 experts of 16 in 4 groups, top 3 within the best 2 groups, a
    # correction bias, weights renormalised and scaled by 2.5, a shared expert of 24; MoE after MoE and an MLP
    "moe-grouped": ("ME*E-EM", dict(n_routed_experts=8, moe_intermediate_size=16, num_experts_per_tok=3,
                                    moe_shared_expert_intermediate_size=24, n_group=4, topk_group=2,
                                    routed_scaling_factor=2.5)),
    # MoE: top 2 of 6 in one group, weights not renormalised, MoE first
    "moe-plain": ("E*M-", dict(n_routed_experts=6, moe_intermediate_size=20, moe_shared_expert_intermediate_size=12,
                               num_experts_per_tok=2, norm_topk_prob=False)),
}


def _make(name, path, seed=3):
    pattern, kw = PARITY[name]
    ref = _hf(pattern, seed, **kw)
    ref.save_pretrained(path)
    return ref


def _greedy(ref, p, n):
    """transformers' greedy generation (by hand without the cache where its generate cannot run: 5.24 needs an
    attention layer for get_seq_length)."""
    ref.generation_config.eos_token_id = None
    if "full_attention" in ref.config.layers_block_type:
        return ref.generate(p, max_new_tokens=n, do_sample=False, pad_token_id=0)
    out = p
    for _ in range(n):
        out = torch.cat([out, ref(out, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    return out


@pytest.mark.parametrize("name", list(PARITY))
def test_logits_and_greedy_generation_match_transformers(tmp_path, name):
    ref = _make(name, tmp_path)
    ours = HybridLM.from_pretrained(tmp_path)
    pattern = PARITY[name][0]
    want = {"M": "s_", "*": "a_", "-": "f", "E": "F"}
    assert ours.config.family == "nemotron_h" and ours.config.layer_symbols == tuple(want[c] for c in pattern)
    x = ids(2, 23)
    with torch.no_grad():
        theirs = ref(x, use_cache=False).logits
        got = ours(x)
    assert got.shape == theirs.shape and theirs.std() > 0.1
    assert (got - theirs).abs().max().item() <= 1e-4
    p = x[:1, :9]
    hf = _greedy(ref, p, 10)
    assert hf.shape[1] == 19
    assert ours.generate(p, max_new_tokens=10)[0].tolist() == hf[0].tolist()


@pytest.mark.parametrize("name", ["8b-like", "mlp-first-groups5", "attention-ends-tied", "moe-grouped"])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, name):
    ref = _make(name, tmp_path / "in")
    ours = HybridLM.from_pretrained(tmp_path / "in")
    ours.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h" and cfg["hybrid_override_pattern"] == PARITY[name][0]
    back = type(ref).from_pretrained(tmp_path / "out").eval()
    x = ids(2, 15)
    with torch.no_grad():
        assert (back(x).logits - ref(x).logits).abs().max().item() <= 1e-5
    assert set(back.state_dict()) == set(ref.state_dict())
    from safetensors import safe_open
    with safe_open(tmp_path / "in" / "model.safetensors", "pt") as a, \
            safe_open(tmp_path / "out" / "model.safetensors", "pt") as b:
        assert set(a.keys()) == set(b.keys())                # NVIDIA's "backbone." names, as transformers writes
    assert HybridLM.from_pretrained(tmp_path / "out").config == ours.config


def test_legacy_config_spellings_and_in_memory_names(tmp_path):
    """hybrid_override_pattern and the mamba_* names of NVIDIA's published configs, and "model."-prefixed
    tensors (transformers' in-memory names) read as the current ones do."""
    ref = _make("8b-like", tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    legacy = {k: v for k, v in d.items() if k not in ("layers_block_type", "n_groups", "conv_kernel", "chunk_size")}
    legacy.update(hybrid_override_pattern="M-M-M*-M-", mamba_n_groups=2, mamba_d_conv=4, mamba_chunk_size=4)
    assert HybridConfig.from_dict(legacy) == HybridConfig.from_dict(d)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "model.safetensors")
    ours = HybridLM.from_pretrained(tmp_path)
    x = ids(1, 11)
    with torch.no_grad():
        assert (ours(x) - ref(x, use_cache=False).logits).abs().max().item() <= 1e-4


def test_moe_and_other_unsupported_configs_are_refused_clearly():
    base = {"model_type": "nemotron_h", "hidden_size": 32, "num_attention_heads": 4, "vocab_size": 50}
    with pytest.raises(ValueError, match="unsupported moe_latent_size in a nemotron_h config"):
        HybridConfig.from_dict({**base, "hybrid_override_pattern": "M-ME*", "moe_latent_size": 16})
    with pytest.raises(ValueError, match="unsupported mlp_hidden_act 'gelu'"):
        HybridConfig.from_dict({**base, "hybrid_override_pattern": "M-", "mlp_hidden_act": "gelu"})
    with pytest.raises(ValueError, match="hybrid_override_pattern must be a string of M"):
        HybridConfig.from_dict({**base, "hybrid_override_pattern": "M-X"})
    with pytest.raises(ValueError, match="'s_' .Mamba-2., 'a_' .attention., 'f' .MLP.; this layout has \\['a'\\]"):
        preset("tiny", layout="s_ f a", num_hidden_layers=3, mlp_hidden_act="relu2", family="nemotron_h")
    with pytest.raises(ValueError, match="nemotron_h checkpoint has mlp_hidden_act 'relu2'"):
        preset("tiny", layout="s_ f a_", num_hidden_layers=3, family="nemotron_h")


# ---- the layout and the engine on single-sublayer layers ---------------------------------------------------
def tiny(layout="s_ f s_ a_ f s_ f", seed=0, **kw):
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                mamba2_n_heads=4, mamba2_head_dim=8, mamba2_n_groups=2, mamba2_d_state=6, mamba2_chunk_size=4,
                mlp_hidden_act="relu2", layout=layout)
    kw = {**base, **kw}
    n = len(re.findall(r"[msaw]_|[^_\s]", kw["layout"]))
    m = HybridLM(preset("tiny", num_hidden_layers=n, **kw)).init_weights(seed).eval()
    randomize_(m, seed)
    return m


LAYOUTS = {
    "nemotron": dict(),
    # Mamba-1 alone, a MoE alone, a SwiGLU layer with both sublayers, local attention alone
    "mixed": dict(layout="m_ F s f w_ A", num_experts=3, num_experts_per_tok=2, mlp_hidden_act="silu",
                  sliding_window=5),
}


def test_layout_notation_and_messages():
    cfg = preset("tiny", layout="(s_ f)*2 + a_ F", num_hidden_layers=6, mlp_hidden_act="relu2")
    assert cfg.pattern == "s_fs_fa_F" and cfg.layer_symbols == ("s_", "f", "s_", "f", "a_", "F")
    assert [cfg.mixer(i) for i in range(6)] == ["mamba2", None, "mamba2", None, "attention", None]
    assert [cfg.has_feed_forward(i) for i in range(6)] == [False, True, False, True, False, True]
    assert [cfg.is_moe(i) for i in range(6)] == [False] * 5 + [True]
    assert cfg.periodic_fields() is None and HybridConfig.from_dict(cfg.to_dict()) == cfg
    for bad, words in [("S_ f", "write 's_' .a layer without a feed-forward has no MoE."),
                       ("s_ f_", "'_' follows a lower-case mixer symbol"),
                       ("f f", "nothing mixes the tokens; add a Mamba or attention layer"),
                       ("s_ g", "f/F a feed-forward alone")]:
        with pytest.raises(ValueError, match=words):
            preset("tiny", layout=bad, num_hidden_layers=2)
    with pytest.raises(ValueError, match="layout has 3 layers but num_hidden_layers is 4"):
        preset("tiny", layout="s_ f a_", num_hidden_layers=4)
    with pytest.raises(ValueError, match="mlp_hidden_act must be one of"):
        preset("tiny", mlp_hidden_act="gelu")


def test_relu2_mlp_has_no_gate_and_the_parameter_count_agrees():
    m = tiny()
    layer = m.model.layers[1]
    assert layer.feed_forward.gate_proj is None and layer.input_layernorm is None and not hasattr(layer, "mamba")
    assert m.model.layers[0].feed_forward is None and m.model.layers[0].pre_ff_layernorm is None
    x = torch.randn(2, 3, 32)
    ff = layer.feed_forward
    assert torch.equal(ff(x), ff.down_proj(torch.relu(ff.up_proj(x)) ** 2))
    for name in LAYOUTS:
        m = tiny(**LAYOUTS[name])
        assert m.num_params() == m.config.num_params()


def test_cache_holds_no_state_for_feed_forward_only_layers():
    m = tiny(**LAYOUTS["mixed"])
    cache = m.new_cache(2, 12)
    kinds = [type(s) for s in cache.layers]
    assert kinds[0].__name__ == "MambaState" and kinds[1] is type(None) and kinds[2] is Mamba2State
    assert kinds[3] is type(None) and kinds[4] is KVState and kinds[5] is KVState
    assert not any(k.startswith(("layers.1.", "layers.3.")) for k in cache.tensors())
    from hybridlm.summary import memory_plan
    plan, got = memory_plan(m.config, 12, batch=2, cache_dtype="float32"), cache.nbytes()
    assert (plan.kv, plan.conv, plan.ssm) == (got["kv"], got["conv"], got["ssm"])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_cached_decode_and_chunked_prefill_reproduce_the_full_forward(name):
    m = tiny(**LAYOUTS[name])
    x = ids(3, 17)
    assert_decode_matches_forward(m, x)
    assert_chunked_prefill_matches(m, x, chunk=5, room=3)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_padded_batch_snapshot_fork_and_rollback(tmp_path, name):
    m = tiny(**LAYOUTS[name])
    prompts = [ids(1, n, seed=n)[0].tolist() for n in (3, 9, 6)]
    x, mask = left_pad(prompts)
    batch = m.generate(x, max_new_tokens=6, attention_mask=mask)
    for i, p in enumerate(prompts):
        assert batch[i, -6:].tolist() == m.generate(torch.tensor([p]), max_new_tokens=6)[0, -6:].tolist()
    x = ids(1, 10)
    gen = Generation(max_new_tokens=6)
    want = torch.stack(list(stream(m, x, gen)), 1)
    cache = m.new_cache(1, 24)
    logits = prefill(m, cache, x)
    snap = cache.snapshot(logits, model=m)
    snap.save(tmp_path / "s.safetensors")
    loaded = Snapshot.load(tmp_path / "s.safetensors", model=m)
    got = torch.stack(list(stream(m, x[:, :0], gen, cache=loaded.to_cache(m, 24), logits=loaded.logits)), 1)
    assert torch.equal(got, want)
    # speculative decoding's checkpoint/rollback passes over the stateless layers
    ck = cache.checkpoint(4)
    with torch.no_grad():
        m(ids(1, 4, seed=5), cache)
    assert cache.rollback(ck, keep=0) == 0 and cache.pos == 10
    again = torch.stack(list(stream(m, x[:, :0], gen, cache=cache, logits=logits)), 1)
    assert torch.equal(again, want)


def test_inspect_plan_and_the_decode_plan_report_single_sublayer_layers(capsys):
    from hybridlm import kernels
    from hybridlm.kernels import decode_cpu
    from hybridlm.summary import layout_diagram, transformer_twin
    m = tiny()
    d = layout_diagram(m.config)
    assert "f/F feed-forward alone" in d and "  1  f   -         | MLP relu2" in d and "  0  s_  Mamba-2   | -" in d
    assert transformer_twin(m.config).pattern == "a_fa_a_fa_f"
    cfg = preset("tiny", layout="m_ f a_ f", num_hidden_layers=4)            # no Mamba-2: the new kinds decline
    assert decode_cpu.jamba_layers(cfg) == "layers with a mixer alone or a feed-forward alone"
    assert decode_cpu.jamba_layers(preset("tiny", mlp_hidden_act="relu2")) == "relu2 MLPs"
    assert kernels.report(cfg)["whole-step decode (this model)"].startswith(
        "declined: layers with a mixer alone or a feed-forward alone")
    cache = HybridLM(cfg).init_weights(0).eval().new_cache(1, 4)
    with torch.no_grad():
        assert not decode_cpu.plan_applies(HybridLM(cfg).eval(), cache, ids(1, 1), None)


def test_inspect_and_plan_commands_on_a_nemotron_checkpoint(tmp_path, capsys):
    from hybridlm.cli import main
    _make("8b-like", tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "9 layers (1 attention, 4 Mamba; 4 feed-forward only, 5 without a feed-forward; 0 MoE)" in out
    assert "  5  a_  ATTENTION | -" in out
    assert main(["plan", str(tmp_path), "--context", "1024"]) == 0
    assert "pure transformer" in capsys.readouterr().out


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_random_checkpoint_in_nemotron_format_loads_in_transformers(tmp_path, moe):
    from transformers import NemotronHForCausalLM

    from hybridlm.random_checkpoint import write_random_checkpoint
    kw = dict(layout="s_ F a_ f F", num_experts=4, num_experts_per_tok=2, router_scoring="sigmoid", n_group=2,
              topk_group=1, moe_intermediate_size=16, shared_expert_intermediate_size=8) if moe else {}
    cfg = tiny(family="nemotron_h", initializer_range=0.2, **kw).config
    write_random_checkpoint(cfg, tmp_path, seed=1, dtype=torch.float32, max_shard_bytes=30_000)
    ref = NemotronHForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    want = HybridLM(cfg).init_weights(1).eval()
    x = ids(2, 9)
    with torch.no_grad():
        assert (ref(x, use_cache=False).logits - want(x)).abs().max().item() <= 1e-4


def test_nemotron_h_8b_preset_is_the_published_config_read_by_the_loader():
    """The preset equals what from_pretrained makes of Nemotron-H-8B-Base-8K's config.json as NVIDIA's
    Megatron-Bridge tests quote it (remote-code spellings: attention_head_dim, hybrid_override_pattern)."""
    published = {
        "architectures": ["NemotronHForCausalLM"], "attention_bias": False, "attention_head_dim": 128,
        "bos_token_id": 1, "chunk_size": 128, "conv_kernel": 4, "eos_token_id": 2, "expand": 2, "hidden_act": "relu2",
        "hidden_size": 4096, "hybrid_override_pattern": "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        "initializer_range": 0.02, "intermediate_size": 21504, "layer_norm_epsilon": 1e-05, "mamba_head_dim": 64,
        "mamba_hidden_act": "silu", "mamba_num_heads": 128, "mamba_proj_bias": False, "max_position_embeddings": 8192,
        "mlp_bias": False, "mlp_hidden_act": "relu2", "model_type": "nemotron_h", "n_groups": 8,
        "num_attention_heads": 32, "num_hidden_layers": 52, "num_key_value_heads": 8, "pad_token_id": 0,
        "residual_in_fp32": False, "rms_norm_eps": 1e-05, "ssm_state_size": 128, "tie_word_embeddings": False,
        "use_bias": False, "use_conv_bias": True, "vocab_size": 131072}
    cfg = preset("nemotron-h-8b")
    assert HybridConfig.from_dict(published) == cfg
    assert cfg.to_dict()["hybrid_override_pattern"] == published["hybrid_override_pattern"]
    assert 8.0e9 < cfg.num_params() < 8.2e9                    # "8B"
    assert sum(cfg.mixer(i) == "attention" for i in range(52)) == 4 and cfg.layer_symbols.count("f") == 24


def test_sigmoid_router_chooses_within_the_best_groups_and_weights_by_bare_scores():
    m = tiny(layout="s_ F", num_experts=8, num_experts_per_tok=2, router_scoring="sigmoid", n_group=4, topk_group=1,
             routed_scaling_factor=3.0, router_renormalize=False, moe_intermediate_size=8,
             shared_expert_intermediate_size=4)
    moe = m.model.layers[1].feed_forward
    assert moe.experts[0].up_proj.out_features == 8 and m.model.layers[1].shared_mlp.up_proj.out_features == 4
    assert m.num_params() == m.config.num_params()
    moe.e_score_correction_bias.copy_(torch.tensor([0, 0, 0, 0, 5.0, 5.0, 0, 0]))     # group 2 wins every token
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    logits, w, idx = moe.route(x)
    assert sorted(idx[0].tolist()) == [4, 5] and all(sorted(r) == [4, 5] for r in idx.tolist())
    assert torch.allclose(w, torch.sigmoid(logits).gather(1, idx) * 3.0)
    with pytest.raises(ValueError, match="group-limited routing .n_group 3, topk_group 1. needs"):
        preset("tiny", num_experts=4, router_scoring="sigmoid", n_group=3)
    with pytest.raises(ValueError, match="router_scoring must be 'softmax'"):
        preset("tiny", router_scoring="relu")
