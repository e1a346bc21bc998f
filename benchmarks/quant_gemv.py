"""The decode kernel's matrix-vector product per weight format, against the memory-bandwidth bound.

For each format (bf16, int8 per channel, int4 groups of 32/64/128) the product of one token with the
Jamba-3B shapes' largest matrices (in_proj 10240 x 2560, the MLP's 8192 x 2560, out_proj 2560 x 5120),
through the same C++ call the decode step makes, many distinct matrices in turn so nothing is served
from cache. Prints effective GB/s (bytes of weights and scales read per second) next to the machine's
measured read bandwidth (a large tensor summed: bytes read per second, the decode bound) and the fraction
of it, and the copy bandwidth (read + write bytes per second).

    python benchmarks/quant_gemv.py [--threads 2] [--repeats 5] [--formats int8,int4:g32] [--rows 1,2,4,8]

With --rows above 1 (a speculative verify chunk, a batch), GB/s still counts each weight byte once; bf16 is
measured on AMX tiles and again on the AVX-512 row dots where the CPU has AMX.
"""
from __future__ import annotations

import argparse
import time

import torch

from hybridlm.bench import environment
from hybridlm.kernels import build, decode_cpu
from hybridlm.quant import QuantLinear, QuantScheme

SHAPES = [(10240, 2560), (8192, 2560), (2560, 5120)]
FORMATS = ["bf16", "int8", "int4:g32", "int4:g64", "int4:g128"]


def copy_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes moved per second (read + write) by torch copying ``nbytes`` between two buffers."""
    torch.set_num_threads(threads)
    a = torch.ones(nbytes // 4)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def read_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes read per second by torch summing an ``nbytes`` tensor (a stream of reads, as decode is)."""
    torch.set_num_threads(threads)
    a = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def layers(fmt: str, total_bytes: int) -> list:
    """Distinct weights of the SHAPES, cycling, until they hold ``total_bytes`` (well past the caches)."""
    g = torch.Generator().manual_seed(0)
    out, size, i = [], 0, 0
    while size < total_bytes:
        o, k = SHAPES[i % len(SHAPES)]
        lin = torch.nn.Linear(k, o, bias=False, dtype=torch.bfloat16).requires_grad_(False)
        lin.weight.normal_(0, 0.02, generator=g)
        layer = lin if fmt == "bf16" else QuantLinear.from_linear(lin, QuantScheme.parse(fmt))
        out.append(layer)
        size += sum(t.numel() * t.element_size() for t in decode_cpu.tensors_of(layer))
        i += 1
    return out


def measure(fmt: str, threads: int, repeats: int, rows: int = 1) -> dict:
    torch.set_num_threads(threads)
    ls = layers(fmt, 1 << 30)
    nbytes = sum(t.numel() * t.element_size() for layer in ls for t in decode_cpu.tensors_of(layer))
    xs = {k: torch.randn(rows, k) for _, k in SHAPES}
    best = float("inf")
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        for layer in ls:
            decode_cpu.linear_step(xs[layer.in_features], layer)
        dt = time.perf_counter() - t0
        if r:                                  # the first pass warms up
            best = min(best, dt)
    return {"format": fmt, "rows": rows, "bytes": nbytes, "seconds": best, "gb_s": nbytes / best / 1e9}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--formats", type=lambda s: s.split(","), default=FORMATS, help=f"default {','.join(FORMATS)}")
    ap.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1],
                    help="rows of x per product (comma-separated; default 1: a decode step)")
    args = ap.parse_args()
    lib = build.load()
    amx = bool(lib.hybridlm_amx_tiles(-1))
    env = environment()
    print(f"CPU {env['cpu']} ({' '.join(env['cpu_flags'])}); kernels built for {build.info['isa']}; "
          f"{args.threads} threads")
    bw = read_bandwidth(args.threads) / 1e9
    print(f"copy bandwidth (read + write): {copy_bandwidth(args.threads) / 1e9:.1f} GB/s; read bandwidth: {bw:.1f} GB/s")
    print(f"{'format':10s} {'rows':>4s} {'path':>10s} {'weights':>10s} {'ms/pass':>9s} {'GB/s':>7s} {'of read bw':>11s}")
    for fmt in args.formats:
        for rows in args.rows:
            paths = ["AMX tiles", "row dots"] if fmt == "bf16" and rows > 1 and amx else ["-"]
            for path in paths:
                lib.hybridlm_amx_tiles(int(path == "row dots"))
                r = measure(fmt, args.threads, args.repeats, rows)
                print(f"{fmt:10s} {rows:4d} {path:>10s} {r['bytes'] / 2**20:8.0f} MiB {r['seconds'] * 1e3:9.1f} "
                      f"{r['gb_s']:7.1f} {r['gb_s'] / bw:10.0%}", flush=True)
    lib.hybridlm_amx_tiles(0)


if __name__ == "__main__":
    main()
