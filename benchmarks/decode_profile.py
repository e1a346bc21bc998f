"""Where a decode step's time goes: bench-88m, one token per step after a short prompt.

Three views, all measured in one process (compare them with each other, not with other runs):

1. the step itself, and the same model at tiny widths (hidden 64, vocabulary 256): the same Python code
   and the same number of torch ops with almost no arithmetic, so its time is the dispatch + Python
   overhead of a step;
2. each component called alone in a loop (lm_head, a Mamba mixer step, the attention step, a dense MLP,
   an MoE layer); alone, their weights stay in cache, so these are lower bounds;
3. torch.profiler's self time per op over a run of steps, grouped: matmul, attention, elementwise/other
   (the fused C++ decode kernels are not torch ops: their time is in the step but not in this view).

    python benchmarks/decode_profile.py --dtype bfloat16 --threads 2 --context 2048
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch


def per_call_ms(fn, n: int, rounds: int = 5) -> float:
    """Fastest of ``rounds`` loops of ``n`` calls, per call, in ms."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e3


def stepper(cfg, dtype, context: int):
    """A decode-step closure on a fresh model of ``cfg`` whose cache already holds ``context`` tokens."""
    from hybridlm.bench import greedy
    from hybridlm.generate import decode_step, prefill
    from hybridlm.model import HybridLM
    model = HybridLM(cfg).init_weights(0).to(dtype).eval()
    cache = model.new_cache(1, context + 4096)
    state = {"logits": prefill(model, cache, torch.randint(0, cfg.vocab_size, (1, context)))}

    def step():
        state["logits"] = decode_step(model, cache, greedy(state["logits"]))
    return model, cache, step


GROUPS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
          "attention (SDPA)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                               "aten::_scaled_dot_product_attention_math"),
          "exp/softplus/silu": ("aten::exp", "aten::softplus", "aten::silu", "aten::sigmoid")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--context", type=int, default=128, help="tokens in the cache before the timed steps")
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from hybridlm.bench import environment, environment_md
    from hybridlm.config import preset
    from hybridlm.model import StepContext
    dtype = getattr(torch, a.dtype)
    print(environment_md(environment()))

    with torch.no_grad():
        cfg = preset("bench-88m")
        model, cache, step = stepper(cfg, dtype, a.context)
        full = per_call_ms(step, a.steps)
        _, _, tiny_step = stepper(cfg.replace(hidden_size=64, intermediate_size=64, vocab_size=256), dtype, a.context)
        tiny = per_call_ms(tiny_step, a.steps)
        print(f"bench-88m {a.dtype}, {a.threads} threads, context {a.context}:")
        print(f"  decode step                              {full:8.2f} ms  ({1e3 / full:.1f} tok/s)")
        print(f"  same ops at tiny widths (overhead)       {tiny:8.2f} ms  ({100 * tiny / full:.0f}% of the step)")

        layers = model.model.layers
        x = torch.randn(1, 1, cfg.hidden_size, dtype=dtype)
        mamba_i = next(i for i, layer in enumerate(layers) if layer.kind == "mamba")
        attn_i = next(i for i, layer in enumerate(layers) if layer.kind != "mamba")
        mlp_i = next(i for i, layer in enumerate(layers) if not cfg.is_moe(i))
        moe_i = next(i for i, layer in enumerate(layers) if cfg.is_moe(i))
        n_mamba = sum(layer.kind == "mamba" for layer in layers)
        n_moe = sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers))
        scratch = model.new_cache(1, a.context + 4096)   # component calls must not advance the real cache
        scratch.pos = cache.pos
        scratch.valid.copy_(cache.valid)
        ctx = StepContext(scratch.pos, torch.tensor([[scratch.pos]]), None, scratch.valid[:, :scratch.pos + 1])
        from hybridlm.kernels import linear
        parts = [("lm_head", 1, lambda: linear(x, model.lm_head.weight)),     # as HybridLM.forward calls it
                 ("Mamba mixer step", n_mamba, lambda: layers[mamba_i].mamba(x, scratch.layers[mamba_i], None)),
                 ("attention step", cfg.num_hidden_layers - n_mamba,
                  lambda: layers[attn_i].self_attn(x, scratch.layers[attn_i], ctx)),
                 ("dense MLP", cfg.num_hidden_layers - n_moe, lambda: layers[mlp_i].feed_forward(x)),
                 ("MoE layer (top-2 of 4)", n_moe, lambda: layers[moe_i].feed_forward(x)),
                 ("RMSNorm", 2 * cfg.num_hidden_layers + 1, lambda: layers[0].input_layernorm(x))]
        print("  components alone (weights stay in cache: lower bounds):")
        total = 0.0
        for name, count, fn in parts:
            ms = per_call_ms(fn, 50)
            total += ms * count
            print(f"    {name:26s} {ms:7.3f} ms x {count} = {ms * count:7.2f} ms")
        print(f"    {'sum':26s} {total:27.2f} ms")

        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(a.steps):
                step()
    events = prof.key_averages()
    by_group: dict[str, float] = defaultdict(float)
    ops = 0
    for e in events:
        if not e.key.startswith("aten::"):
            continue
        ops += e.count
        group = next((g for g, names in GROUPS.items() if e.key in names), "other ops")
        by_group[group] += e.self_cpu_time_total / 1e3 / a.steps
    prof_total = sum(by_group.values())
    print(f"  torch.profiler, per step ({ops / a.steps:.0f} aten op calls, nested ones included):")
    for g, ms in sorted(by_group.items(), key=lambda kv: -kv[1]):
        print(f"    {g:26s} {ms:7.2f} ms  ({100 * ms / prof_total:.0f}% of profiled op time)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
