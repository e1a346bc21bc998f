"""Prefill attention alone: the C++ flash kernel against torch's SDPA as the engine calls it.

One chunk of queries (bench-88m's attention: 8 heads, 2 kv heads, d_h 64, bf16) against growing key
counts, as chunked prefill sees them: the chunk's queries sit at the end of the keys. SDPA runs the way
Attention._sdpa runs it without the kernel: ``is_causal`` when the chunk is all the keys, else query
blocks with an explicit [q, s] mask (padding validity included). Both in the same process, alternating.

    python benchmarks/attention_prefill.py
    python benchmarks/attention_prefill.py --keys 2048 8192 32768 131072 --chunk 2048 --threads 2
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def sdpa_as_the_engine(q, k, v, valid, start):
    """Attention._sdpa's torch path for full attention with keys at slots 0 .. s-1."""
    l, s = q.shape[2], k.shape[2]
    if start == 0 and valid is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    block = max(1, (1 << 25) // s)              # attention._Q_BLOCK_ELEMS // s, as the engine bounds mask memory
    k_slots = torch.arange(s)
    outs = []
    for i in range(0, l, block):
        q_slots = torch.arange(start + i, start + min(l, i + block))
        mask = (k_slots[None, :] <= q_slots[:, None])[None, None] & valid[:, None, None, :]
        outs.append(F.scaled_dot_product_attention(q[:, :, i:i + block], k, v, attn_mask=mask, enable_gqa=True))
    return torch.cat(outs, dim=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keys", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from hybridlm.bench import environment, environment_md
    from hybridlm.kernels import flash_attn_available, flash_attn_cpu
    print(environment_md(environment()))
    if not flash_attn_available():
        raise SystemExit("this CPU or build has no flash kernel (it needs AVX512-BF16); nothing to compare")
    h, h_kv, dh = 8, 2, 64
    print(f"| keys | flash ms | flash GFLOP/s | SDPA ms | SDPA GFLOP/s | SDPA / flash |\n|---:|---:|---:|---:|---:|---:|")
    for s in a.keys:
        l = min(a.chunk, s)
        start = s - l
        g = torch.Generator().manual_seed(0)
        q = torch.randn(1, l, h, dh, generator=g).to(torch.bfloat16).transpose(1, 2)   # as q_proj's view
        k = torch.randn(1, h_kv, s, dh, generator=g).to(torch.bfloat16)
        v = torch.randn(1, h_kv, s, dh, generator=g).to(torch.bfloat16)
        valid = None if start == 0 else torch.ones(1, s, dtype=torch.bool)      # the cache's validity
        flop = 4 * l * (start + l / 2) * dh * h                                   # causal: half the chunk
        tf = best_seconds(lambda: flash_attn_cpu(q, k, v, valid, start), a.repeats)
        ts = best_seconds(lambda: sdpa_as_the_engine(q, k, v, valid, start), a.repeats)
        print(f"| {s:,} | {tf * 1e3:,.0f} | {flop / tf / 1e9:,.0f} | {ts * 1e3:,.0f} | {flop / ts / 1e9:,.0f} | "
              f"{ts / tf:.2f}x |")


if __name__ == "__main__":
    main()
