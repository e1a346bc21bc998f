"""Shared fixtures: tiny Jamba checkpoints made locally by transformers (seeded), never downloaded."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.3):
    """Perturb the parameters that default initialisation sets to constants (A_log, D, norms, biases):
    with their defaults, several bugs (a missing D skip, a wrong norm) would be invisible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "A_log" in name or name.endswith(".D") or "norm" in name or "bias" in name:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def make_hf_checkpoint(path, seed: int = 0, dtype=torch.float32, max_shard_size=None, **config):
    """Build transformers' JambaForCausalLM from ``config`` with seed ``seed``, randomise it, save it."""
    from transformers import JambaConfig, JambaForCausalLM
    torch.manual_seed(seed)
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
                attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8,
                mamba_d_conv=4, mamba_expand=2)
    cfg = JambaConfig(**{**base, **config})
    model = JambaForCausalLM(cfg).eval()
    randomize_(model, seed)
    model = model.to(dtype)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    return model


@pytest.fixture(scope="module")
def cpu_kernels():
    """Build the C++ kernels once (about a second; cached across sessions); they must build here."""
    from hybridlm.kernels import build
    try:
        build.load()
    except build.KernelUnavailable as e:
        pytest.fail(f"the C++ kernels must build here: {e}")


@pytest.fixture
def backend():
    """Set a kernel backend for one test and restore 'auto' after it."""
    from hybridlm import kernels
    yield kernels.set_backend
    kernels.set_backend("auto")


@pytest.fixture
def hf_checkpoint(tmp_path):
    def make(**kw):
        path = tmp_path / "hf"
        model = make_hf_checkpoint(path, **kw)
        return path, model
    return make
