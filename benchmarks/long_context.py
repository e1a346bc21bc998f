"""Long prompts through generate(): prompt length -> time and peak RSS, bench-88m in bf16.

Each length runs in a fresh process so peak RSS is that run's alone. The prompt is processed by the
engine's chunked prefill (bounded memory), then a few tokens are decoded.

    python benchmarks/long_context.py --lengths 4096 16384 65536 262144 --out benchmarks/results/long_context
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def one(length: int, new_tokens: int, chunk: int) -> dict:
    import torch

    from hybridlm.bench import peak_rss_bytes
    from hybridlm.checkpoint import load_model
    from hybridlm.generate import generate
    model = load_model("bench-88m", dtype=torch.bfloat16)
    base = peak_rss_bytes()
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens=new_tokens, prefill_chunk=chunk)
    dt = time.perf_counter() - t0
    assert out.shape == (1, length + new_tokens)
    return {"length": length, "seconds": dt, "tok_per_s": length / dt, "peak_rss": peak_rss_bytes(),
            "rss_after_load": base}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072, 262144])
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--out", default="benchmarks/results/long_context")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.child, a.new_tokens, a.chunk)))
        return
    from hybridlm.bench import environment, environment_md
    env = environment()
    rows = []
    for n in a.lengths:
        r = subprocess.run([sys.executable, __file__, "--child", str(n), "--new-tokens", str(a.new_tokens),
                            "--chunk", str(a.chunk)], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"length {n} failed:\n{r.stderr}")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{n:>7} tokens: {row['seconds']:8.1f} s  {row['tok_per_s']:7.0f} tok/s  "
              f"peak RSS {row['peak_rss'] / 2**30:.2f} GiB", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    lines = ["# Long prompts through generate(): bench-88m, bf16, random weights", "",
             f"Command: `python benchmarks/long_context.py --lengths {' '.join(map(str, a.lengths))} "
             f"--new-tokens {a.new_tokens} --chunk {a.chunk}`", "", environment_md(env),
             "| prompt tokens | seconds | prompt tok/s | s per 1K tokens | peak RSS |", "|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['length']:,} | {r['seconds']:.1f} | {r['tok_per_s']:.0f} | "
                     f"{1000 * r['seconds'] / r['length']:.2f} | {r['peak_rss'] / 2**30:.2f} GiB |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
