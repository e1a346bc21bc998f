"""The hybrid Transformer-Mamba language model (Jamba: Lieber et al. 2024).

A stack of decoder layers, each: x + mixer(norm(x)), then x + ffn(norm(x)); the mixer is Mamba, Mamba-2
(mamba2.py) or attention and the feed-forward a SwiGLU (or relu^2) MLP or a mixture of experts, per
``cfg.pattern``; a layer may hold the mixer alone or the feed-forward alone (Nemotron-H: ``s_``, ``a_``,
``f``, ``F``; the other half and its norm are then absent)
(Granite 4.0-H adds a shared expert and muP-style multipliers: ``cfg.*_multiplier``, ``cfg.logits_scaling``). Module and
parameter names are transformers' hub names, so a Jamba checkpoint loads key for key.

Glossary: b batch, l tokens in this call, d hidden size, v vocabulary.

One ``forward(input_ids, cache=None)`` serves training (no cache), prefill (a cache, many tokens,
possibly in chunks) and decode (a cache, one token).
"""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .cache import Cache
from .config import HybridConfig, preset
from .kernels import Linear, decode_plan
from .mamba import MambaMixer
from .mamba2 import Mamba2Mixer
from .moe import MLP, MoE, load_balancing_loss
from .norm import RMSNorm


@dataclass
class StepContext:
    """What every layer needs to know about the tokens of this call."""
    start: int                          # cache slot of the first token (0 without a cache)
    positions: torch.Tensor             # [b, l] token positions (RoPE)
    mask: torch.Tensor | None           # [b, l] bool, False at padding; None: no padding
    valid: torch.Tensor | None          # [b, s_max] bool validity of every cache slot; None without a cache


class DecoderLayer(nn.Module):
    def __init__(self, cfg: HybridConfig, i: int):
        super().__init__()
        self.kind = cfg.mixer(i)                       # None: a feed-forward-only layer ('f'/'F')
        if self.kind == "mamba":
            self.mamba = MambaMixer(cfg)
        elif self.kind == "mamba2":
            self.mamba = Mamba2Mixer(cfg)
        elif self.kind is not None:
            self.self_attn = Attention(cfg, window=cfg.sliding_window if self.kind == "local" else None)
        ffn = cfg.has_feed_forward(i)                  # False: a mixer-only layer ('s_', 'a_', ...)
        act = cfg.mlp_hidden_act
        self.feed_forward = (MoE(cfg) if cfg.is_moe(i) else MLP(cfg.hidden_size, cfg.intermediate_size, act)) \
            if ffn else None
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if self.kind is not None else None
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if ffn else None
        # Granite 4.0, Nemotron-H: a dense expert every token takes, added to the MoE's output
        self.shared_mlp = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, act) \
            if cfg.shared_expert_intermediate_size and ffn and cfg.is_moe(i) else None
        self.residual_multiplier = cfg.residual_multiplier

    def forward(self, x, state, ctx: StepContext):
        if self.kind is not None:
            h = self.input_layernorm(x)
            if self.kind in ("mamba", "mamba2"):
                h = self.mamba(h, state, ctx.mask)
            else:
                h = self.self_attn(h, state, ctx)
            x = x + (h * self.residual_multiplier if self.residual_multiplier != 1 else h)
        if self.feed_forward is None:
            return x, None
        h = self.pre_ff_layernorm(x)
        router_logits = None
        if isinstance(self.feed_forward, MoE):
            f, router_logits = self.feed_forward(h)
        else:
            f = self.feed_forward(h)
        if self.shared_mlp is not None:
            f = f + self.shared_mlp(h)
        return x + (f * self.residual_multiplier if self.residual_multiplier != 1 else f), router_logits


class Backbone(nn.Module):
    """Upstream's ``model.*``: embeddings, layers, final norm."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


def init_value(name: str, shape: tuple[int, ...], std: float, g: torch.Generator | None = None) -> torch.Tensor:
    """The fresh fp32 value of parameter ``name`` (``HybridLM.init_weights``; random values drawn from
    ``g``). Every rule is row by row, so ``shape`` may also be that of a block of leading rows
    (random_checkpoint.py makes big tensors a block at a time)."""
    if name.endswith("A_log") and len(shape) == 1:     # Mamba-2: one rate per head, 1..h (transformers' init)
        return torch.log(torch.arange(1, shape[0] + 1, dtype=torch.float32))
    if name.endswith("A_log"):
        return torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32)).expand(shape)
    if name.endswith(".D") or "layernorm" in name or name.endswith("mamba.norm.weight"):
        return torch.ones(shape)
    if name.endswith(("dt_proj.bias", "dt_bias")):
        # dt ~ log-uniform in [1e-3, 1e-1], bias = softplus^-1(dt)
        dt = torch.exp(torch.rand(shape, generator=g) * (torch.log(torch.tensor(0.1)) -
                       torch.log(torch.tensor(1e-3))) + torch.log(torch.tensor(1e-3)))
        return dt + torch.log(-torch.expm1(-dt))
    if name.endswith("bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=g) * std


def _count(module: nn.Module) -> int:
    """Parameters of ``module``, plus the values of weights stored packed in buffers (a module's
    ``packed_numel``: quant.QuantLinear's int8/int4 weight)."""
    return sum(p.numel() for p in module.parameters()) + sum(getattr(m, "packed_numel", 0) for m in module.modules())


class HybridLM(nn.Module):
    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.checkpointing = False   # activation checkpointing per layer (training)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "HybridLM":
        return cls(preset(name, **overrides))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None, device="cpu",
                        allow_pickle: bool = False, quantize=None) -> "HybridLM":
        """Load a HuggingFace-format Jamba, Granite 4.0-H (``granitemoehybrid``), Bamba or Nemotron-H
        (``nemotron_h``) checkpoint directory (config.json + safetensors; families.py maps the last three), or a llama.cpp
        ``jamba`` GGUF file (see gguf.py); ``quantize`` ("int8", "int4", ... see quant.py) quantizes the
        linear layers while loading. The parameters require grad, as transformers' from_pretrained gives
        them (fine-tune it as it is; run inference under ``torch.no_grad()``, as ``generate`` does); a
        quantized model's stay frozen."""
        from .checkpoint import load_pretrained
        return load_pretrained(path, dtype=dtype, device=device, allow_pickle=allow_pickle, quantize=quantize)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int | None = None):
        """Write config.json + safetensors in the hub layout (transformers and vLLM read it); a model loaded
        from a Granite 4.0-H or Bamba checkpoint is written back in that format (``config.family``)."""
        from .checkpoint import save_pretrained
        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)

    def init_weights(self, seed: int | None = None):
        """Fresh initialisation (normal(0, initializer_range) for matrices, Mamba's S4D-real A and
        dt bias as in Gu & Dao 2023 sec. 3.6)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(init_value(name, p.shape, self.config.initializer_range, g))
        return self

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> Cache:
        """Preallocate the per-layer inference state for ``batch`` rows of up to ``max_len`` tokens."""
        p = next(self.parameters())
        cache = Cache.allocate(self.config, batch, max_len, dtype or p.dtype, p.device, self.fingerprint())
        cache.owner = weakref.ref(self)
        return cache

    def fingerprint(self) -> str:
        """A quick identity of config + weights + dtype (~64 sampled values per tensor), computed once; a
        snapshot checked against a model also needs ``cache.weights_fingerprint``, a hash of every weight."""
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha256(repr(sorted(self.config.to_dict().items())).encode())
            for name, p in self.state_dict().items():
                flat = p.detach().flatten()
                h.update(name.encode())
                h.update(str(p.dtype).encode())
                h.update(repr(flat[:: max(1, flat.numel() // 64)].float().tolist()).encode())
            self._fingerprint = h.hexdigest()[:32]
        return self._fingerprint

    # ---- forward ------------------------------------------------------------------------------
    def hidden(self, input_ids: torch.Tensor, cache: Cache | None = None,
               mask: torch.Tensor | None = None,
               layer_outputs: list | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """input_ids: [b, l]; mask: [b, l] bool (False at left padding); ``layer_outputs``, when given,
        receives every layer's output [b, l, d] (the activation loss reads them).
        Returns (final-norm hidden states [b, l, d], router logits of each MoE layer)."""
        b, l = input_ids.shape
        if cache is not None:
            start = cache.pos
            positions = cache.advance(l, mask)
            ctx = StepContext(start, positions, mask, cache.valid)
        else:
            positions = (mask.long().cumsum(1) - 1).clamp_min(0) if mask is not None else \
                torch.arange(l, device=input_ids.device).expand(b, l)
            ctx = StepContext(0, positions, mask, None)
        x = self.model.embed_tokens(input_ids)                                   # [b, l, d]
        if self.config.embedding_multiplier != 1:
            x = x * self.config.embedding_multiplier
        router_logits = []
        for i, layer in enumerate(self.model.layers):
            state = cache.layers[i] if cache is not None else None
            if self.checkpointing and self.training:
                x, r = torch.utils.checkpoint.checkpoint(layer, x, state, ctx, use_reentrant=False)
            else:
                x, r = layer(x, state, ctx)
            if r is not None:
                router_logits.append(r)
            if layer_outputs is not None:
                layer_outputs.append(x)
        return self.model.final_layernorm(x), router_logits

    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None, mask: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [b, l, v] (or [b, 1, v] with ``last_only``, which prefill uses to skip l*v work)."""
        if cache is not None:
            logits = decode_plan(self, cache, input_ids, mask)   # one token per row: one C++ call (kernels)
            if logits is not None:
                return logits
        h, _ = self.hidden(input_ids, cache, mask)
        if last_only:
            h = h[:, -1:]
        return self.logits(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final hidden states [b, l, d] -> logits [b, l, v] (divided by ``logits_scaling``, Granite)."""
        out = self.lm_head(h)
        return out / self.config.logits_scaling if self.config.logits_scaling != 1 else out

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             activation_loss_coef: float = 0.0, teacher_logits: torch.Tensor | None = None,
             distill: float = 1.0) -> dict:
        """Training objective: next-token cross-entropy + router_aux_loss_coef * load-balancing loss
        (+ activation_loss_coef * activation loss). input_ids, targets: [b, l].
        Returns {'loss', 'ce', 'aux', 'act', 'kd', 'agree'}.

        The activation loss follows the Jamba-1.5 report ("Activation loss"): some activations grew
        to ~4e9 in pre-training, so a term proportional to their mean square is added. Here: mean(x^2)
        of every layer's output, averaged over layers. 'act' is 0 when the coefficient is 0.

        ``teacher_logits`` [b, l, v] (another model's logits on the same input: knowledge distillation, e.g.
        to train a speculative draft model, train.py ``--distill-from``): the objective's cross-entropy
        becomes (1 - distill) * ce + distill * kd, kd the KL divergence KL(teacher || this model) per token
        (the positions ``targets`` ignores excluded); 'agree' is the share of positions where both models'
        most likely token is the same (what a greedy draft's acceptance rate follows). Both are 0 without."""
        outs = [] if activation_loss_coef else None
        h, router_logits = self.hidden(input_ids, layer_outputs=outs)
        logits = self.logits(h)
        flat = logits.float().view(-1, logits.shape[-1])
        ce = F.cross_entropy(flat, targets.reshape(-1), ignore_index=ignore_index)
        aux = load_balancing_loss(router_logits, self.config.num_experts_per_tok) if router_logits \
            else ce.new_zeros(())
        act = torch.stack([o.float().pow(2).mean() for o in outs]).mean() if outs else ce.new_zeros(())
        kd = agree = ce.new_zeros(())
        objective = ce
        if teacher_logits is not None:
            if teacher_logits.shape != logits.shape:
                raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the model's "
                                 f"{tuple(logits.shape)} (the teacher must share the vocabulary)")
            keep = targets.reshape(-1) != ignore_index
            t = teacher_logits.detach().float().view(-1, flat.shape[-1])[keep]
            s = flat[keep]
            kd = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean")
            agree = (s.detach().argmax(-1) == t.argmax(-1)).float().mean()
            objective = (1 - distill) * ce + distill * kd
        loss = objective + self.config.router_aux_loss_coef * aux
        if activation_loss_coef:
            loss = loss + activation_loss_coef * act
        return {"loss": loss, "ce": ce, "aux": aux, "act": act, "kd": kd, "agree": agree}

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 64, temperature: float = 0.0,
                 **kwargs) -> torch.Tensor:
        """[b, l] -> [b, l + new]; greedy at temperature 0. See ``hybridlm.generate.generate`` for the
        other sampling options (top_k, top_p, stop tokens, seed, ...)."""
        from .generate import generate
        return generate(self, input_ids, max_new_tokens=max_new_tokens, temperature=temperature, **kwargs)

    # ---- accounting ---------------------------------------------------------------------------
    def num_params(self, active: bool = False) -> int:
        """All parameters, or those a single token uses (top-k of each MoE layer's experts); a weight stored
        packed (quantized layers, quant.py) counts as the values it stands for."""
        total = _count(self)
        if not active:
            return total
        cfg = self.config
        unused = 0
        for layer in self.model.layers:
            if isinstance(layer.feed_forward, MoE):
                per_expert = _count(layer.feed_forward.experts[0])
                unused += per_expert * (cfg.num_experts - cfg.num_experts_per_tok)
        return total - unused
