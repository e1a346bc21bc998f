"""Write a seeded random-weight checkpoint of a preset (hub layout, bf16 by default) with bounded memory.

The model is never built: each tensor is drawn a block at a time and streamed into its shard
(hybridlm/random_checkpoint.py), so peak memory stays far below the model's size. Prints the bytes
written, the wall time and the peak RSS.

    python benchmarks/make_checkpoint.py jamba-reasoning-3b --out /root/ckpt/jamba-3b-bf16
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from hybridlm.bench import peak_rss_bytes
from hybridlm.checkpoint import DTYPES, load_model
from hybridlm.config import PRESETS
from hybridlm.random_checkpoint import write_random_checkpoint
from hybridlm.summary import fmt_bytes, parse_bytes


def progress_bar(total: int, label: str):
    """A byte counter: tqdm's bar when tqdm is installed, else a line every 10%."""
    try:
        from tqdm import tqdm
        return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label).update
    except ImportError:
        done = tenths = 0

        def update(n):
            nonlocal done, tenths
            done += n
            if done * 10 // total > tenths:
                tenths = done * 10 // total
                print(f"{label}: {tenths * 10}% ({fmt_bytes(done)})", flush=True)
        return update


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", choices=list(PRESETS))
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    ap.add_argument("--max-shard", default="2GiB", help="largest shard, such as 2GiB or 500MB")
    args = ap.parse_args()

    dtype = DTYPES[args.dtype]
    total = load_model(args.preset, device="meta").num_params() * dtype.itemsize
    t0 = time.perf_counter()
    out = write_random_checkpoint(args.preset, args.out, seed=args.seed, dtype=dtype,
                                  max_shard_bytes=parse_bytes(args.max_shard),
                                  progress=progress_bar(total, args.preset))
    seconds = time.perf_counter() - t0
    written = sum(f.stat().st_size for f in Path(out).iterdir())
    print(f"wrote {out}: {written:,} bytes ({fmt_bytes(written)}) in {seconds:.1f} s "
          f"({fmt_bytes(written / seconds)}/s); peak RSS {fmt_bytes(peak_rss_bytes())}")


if __name__ == "__main__":
    main()
