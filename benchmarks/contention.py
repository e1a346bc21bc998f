"""Speed on a shared machine (issue 16, part 1): training, prefill and decode with 1 and 2 threads, on a quiet
machine and beside a neighbour, under libgomp's default (spinning) wait policy, hybridlm's default (a short spin, then sleep) and a passive one.

Neighbours (each started before the measurement, killed after):
    quiet     nothing else running
    spin      a process busy-looping on one core (a browser tab, a compiler)
    torch2    another PyTorch process multiplying matrices with 2 threads (another model, a notebook)

    python benchmarks/contention.py                    # ~8 minutes on 2 cores; prints a markdown table
    python benchmarks/contention.py --seconds 3 --workloads decode

Each cell is a fresh child process that runs its workload for ``--seconds`` after a warm-up and reports
tokens/s; the table gives each cell as a fraction of the quiet figure with the same thread count. Run it on
an otherwise idle machine: the quiet rows are the reference.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

NEIGHBOURS = {
    "quiet": None,
    "spin": [sys.executable, "-c", "while True: pass"],
    "torch2": [sys.executable, "-c", "import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\n"
                                     "while True: a @ a"],
}


def child(workload: str, seconds: float) -> float:
    """Tokens per second of one workload in this process (threads set by the parent's environment)."""
    import torch

    from hybridlm.kernels import openmp_waits
    print(f"openmp waits: {openmp_waits()}", file=sys.stderr)

    from hybridlm.config import preset
    from hybridlm.model import HybridLM
    torch.manual_seed(0)
    if workload == "train":          # the tiny preset's training step: forward, backward, AdamW
        model = HybridLM(preset("tiny")).init_weights(0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x = torch.randint(0, 4096, (8, 257))

        def step():
            loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return 8 * 256
    else:
        model = HybridLM(preset("bench-88m")).init_weights(0).eval()
        if workload == "prefill":    # prompt processing, 512 tokens, fp32 (bf16 GEMMs upcast on AVX2 CPUs anyway)
            x = torch.randint(0, 32000, (1, 512))

            def step():
                with torch.no_grad():
                    model(x)
                return 512
        else:                        # decode: 32 new tokens after an 8-token prompt, batch 1
            x = torch.randint(0, 32000, (1, 8))

            def step():
                model.generate(x, max_new_tokens=32)
                return 32
    step()                           # warm-up: kernels compiled and loaded, caches allocated
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += step()
    return n / (time.perf_counter() - t0)


def measure(workload: str, threads: int, neighbour: str, policy: str, seconds: float) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        env.pop(k, None)
    if policy == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    elif policy == "libgomp":                # libgomp's own default, as a process that loaded torch first gets
        env["GOMP_SPINCOUNT"] = "300000"
    elif policy.startswith("spin"):          # spinN: libgomp spins N times at a barrier, then sleeps
        env["GOMP_SPINCOUNT"] = policy[4:]
    elif policy != "hybridlm":               # hybridlm's default (hybridlm/__init__.py), imported before torch
        raise SystemExit(f"unknown wait policy {policy!r}: hybridlm, libgomp, passive or spinN")
    noise = subprocess.Popen(NEIGHBOURS[neighbour], stdout=subprocess.DEVNULL) if NEIGHBOURS[neighbour] else None
    try:
        if noise:
            time.sleep(1.0)          # let it get going
        r = subprocess.run([sys.executable, __file__, "--child", workload, "--seconds", str(seconds)], env=env,
                           capture_output=True, text=True, check=True)
        return float(r.stdout.strip().splitlines()[-1])
    finally:
        if noise:
            noise.kill()
            noise.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", default="")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--workloads", default="train,prefill,decode")
    ap.add_argument("--neighbours", default="quiet,spin,torch2")
    ap.add_argument("--policies", default="libgomp,hybridlm,passive",
                    help="OpenMP waits: libgomp (its default: spin ~300k times), hybridlm (what importing hybridlm "
                         "first sets), passive, spinN (GOMP_SPINCOUNT=N)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args()
    if args.child:
        import hybridlm  # noqa: F401  (first, as a user's program does: it sets the OpenMP wait policy)
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(child(args.child, args.seconds))
        return
    from hybridlm.bench import environment
    env = environment()
    print(f"CPU {env['cpu']} | {env['cores']} cores | flags {env['cpu_flags']} | torch {env['torch']} | "
          f"{args.seconds:.0f} s per cell")
    rows = []
    for workload in args.workloads.split(","):
        for policy in args.policies.split(","):
            for threads in map(int, args.threads.split(",")):
                cells = {}
                for neighbour in args.neighbours.split(","):
                    cells[neighbour] = measure(workload, threads, neighbour, policy, args.seconds)
                    print(f"  {workload:8s} {policy:8s} {threads} thread(s) {neighbour:7s} {cells[neighbour]:9.1f} tok/s",
                          flush=True)
                rows.append({"workload": workload, "policy": policy, "threads": threads, **cells})
    names = args.neighbours.split(",")
    print("\n| workload | wait policy | threads | " + " | ".join(f"{n} tok/s" for n in names) + " | "
          + " | ".join(f"{n} / quiet" for n in names[1:]) + " |")
    print("|" + "---|" * (3 + 2 * len(names) - 1))
    for r in rows:
        q = r.get("quiet")
        ratios = [f"{r[n] / q:.2f}" if q else "" for n in names[1:]]
        print(f"| {r['workload']} | {r['policy']} | {r['threads']} | " + " | ".join(f"{r[n]:.0f}" for n in names)
              + " | " + " | ".join(ratios) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
