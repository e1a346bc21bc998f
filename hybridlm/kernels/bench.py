"""Per-layer timings of the fast kernels against the references, at bench-88m's Mamba width.

    python -m hybridlm.kernels.bench                       # d_in=1024, n=16, b=1, l=1024 and 8192
    python -m hybridlm.kernels.bench --lengths 256 --ref-max-len 256 --dtype bf16

Milliseconds, the best of ``--repeat`` runs after one warm-up (the run least disturbed by other
processes). ``--clock cpu`` counts the process's CPU time instead of wall time: with one thread
(``OMP_NUM_THREADS=1``) it is the figure that holds on a machine shared with other jobs. The
references are per-token Python loops, so they run only up to ``--ref-max-len`` tokens.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from . import build, report
from .conv_cpu import causal_conv1d_cpu, causal_conv1d_step
from .ref import causal_conv1d_ref, selective_scan_ref
from .scan_cpu import selective_scan_cpu, selective_scan_step


def best_ms(fn, repeat: int, clock=time.perf_counter) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times) * 1e3


def forward_backward(op, *args):
    """A function running op forward, then backward from a random output gradient."""
    leaves = [a.detach().clone().requires_grad_() for a in args]

    def run():
        out = op(*leaves)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(torch.ones_like(out))
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--d-in", type=int, default=1024)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of u, B, C and the conv input")
    p.add_argument("--ref-max-len", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    clock = {"wall": time.perf_counter, "cpu": time.process_time}[args.clock]
    t0 = time.perf_counter()
    build.load()
    print(f"kernels: {report()}  (load/build {time.perf_counter() - t0:.2f} s); torch threads "
          f"{torch.get_num_threads()}; b={args.batch} d_in={args.d_in} n={args.n} k={args.k} {args.dtype}; "
          f"{args.clock} clock\n")
    print("| op | l | fast fwd ms | fast fwd+bwd ms | ref fwd ms | ref fwd+bwd ms | fwd speedup |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    b, d_in, n, k = args.batch, args.d_in, args.n, args.k
    for l in [1, *args.lengths]:
        u = torch.randn(b, l, d_in, generator=g).to(dtype)
        delta = F.softplus(torch.randn(b, l, d_in, generator=g) - 1)
        A = -(torch.rand(d_in, n, generator=g) * 4 + 0.1)
        B, C = torch.randn(b, l, n, generator=g).to(dtype), torch.randn(b, l, n, generator=g).to(dtype)
        D, h0 = torch.randn(d_in, generator=g), torch.randn(b, d_in, n, generator=g)
        w, bias, state = torch.randn(d_in, k, generator=g), torch.randn(d_in, generator=g), torch.zeros(b, d_in, k - 1)
        scan_fast = selective_scan_step if l == 1 else selective_scan_cpu
        conv_fast = causal_conv1d_step if l == 1 else causal_conv1d_cpu
        # inference continues from a state; training (fwd+bwd) starts from zeros, as in the model
        rows = [("selective_scan", scan_fast, selective_scan_ref, (u, delta, A, B, C, D, h0), (u, delta, A, B, C, D)),
                ("causal_conv1d", conv_fast, causal_conv1d_ref, (u, w, bias, state), (u, w, bias))]
        for name, fast, ref, infer_args, train_args in rows:
            with torch.no_grad():
                fast_fwd = best_ms(lambda: fast(*infer_args), args.repeat, clock)
                ref_fwd = best_ms(lambda: ref(*infer_args), max(1, args.repeat // 2), clock) if l <= args.ref_max_len \
                    else None
            train = l > 1   # a decode step is never trained
            fast_fb = best_ms(forward_backward(fast, *train_args), args.repeat, clock) if train else None
            ref_fb = best_ms(forward_backward(ref, *train_args), 1, clock) if train and ref_fwd is not None else None
            cells = [fast_fwd, fast_fb, ref_fwd, ref_fb]
            speedup = f"{ref_fwd / fast_fwd:.1f}x" if ref_fwd is not None else "-"
            print(f"| {name}{' (decode)' if l == 1 else ''} | {l} | "
                  + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + f" | {speedup} |")


if __name__ == "__main__":
    main()
