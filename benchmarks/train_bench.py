"""Training throughput on bench-88m: hybridlm's training step beside transformers' JambaForCausalLM, in one run.

A hybridlm step is what ``hybridlm train`` does per optimizer step (hybridlm/train.py ``train_step``):
forward under bf16 autocast with fp32 master weights, cross-entropy + MoE load-balancing loss,
backward, global gradient clipping, AdamW over the parameter groups, scheduler step. transformers runs
the same weights (written by ``save_pretrained``, read by ``JambaForCausalLM.from_pretrained``) the way
the issue measured it: fp32, forward + backward, plus the same AdamW step. Its Mamba layers run a
per-token Python loop on CPU (no mamba_ssm), so it gets a shorter sequence (``--hf-seq-len``); tokens/s
of that loop do not improve with length, so the comparison favours transformers if anything.

    python benchmarks/train_bench.py                 # writes benchmarks/results/train_bench.{json,md}
    python benchmarks/train_bench.py --skip-hf       # hybridlm only
    python benchmarks/train_bench.py --threads 1 --name train_bench_1thread

Timings are the fastest of the timed steps after one warm-up step (the least disturbed on a shared
machine); the median is recorded too, with the load average at the start.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")           # transformers is only an oracle here; never fetch
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # after the environment above

REPO = Path(__file__).resolve().parent.parent


def timed_steps(step, n: int) -> list[float]:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        print(f"  step {i + 1}/{n}: {times[-1]:.2f} s", file=sys.stderr, flush=True)
    return times


def hybridlm_step(model, seq_len: int, seed: int = 0):
    """One optimizer step exactly as hybridlm/train.py takes it (batch of one sequence)."""
    from hybridlm.optim import build_optimizer, build_scheduler
    opt = build_optimizer(model, 3e-4, 0.1)
    sched = build_scheduler(opt, 0, 100, 0.1)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len + 1), generator=torch.Generator().manual_seed(seed))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.loss(ids[:, :-1], ids[:, 1:])
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    return step


def transformers_step(model, seq_len: int, seed: int = 0):
    """fp32 forward + backward + AdamW of JambaForCausalLM (its loss includes the router aux loss)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ids = torch.randint(0, model.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(seed))

    def step():
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def summary(times: list[float], tokens: int) -> dict:
    best = min(times)
    return {"tokens_per_step": tokens, "step_s": times, "best_s": best, "median_s": statistics.median(times),
            "tok_per_s": tokens / best, "tok_per_s_median": tokens / statistics.median(times)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="bench-88m")
    ap.add_argument("--seq-len", type=int, default=1024, help="hybridlm tokens per step")
    ap.add_argument("--hf-seq-len", type=int, default=128, help="transformers tokens per step")
    ap.add_argument("--steps", type=int, default=3, help="timed hybridlm steps (after one warm-up)")
    ap.add_argument("--hf-steps", type=int, default=1, help="timed transformers steps (after a short warm-up)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-hf", action="store_true", help="measure hybridlm only")
    ap.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--name", default="train_bench", help="result file name, without .json / .md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from hybridlm import HybridLM, preset
    from hybridlm.bench import environment, environment_md

    env = environment()
    model = HybridLM(preset(args.preset)).init_weights(0).train()
    print(f"hybridlm {args.preset}: {model.num_params():,} parameters, seq {args.seq_len}, bf16 autocast, "
          f"{args.threads} threads; kernels {env['kernels']}", file=sys.stderr)
    step = hybridlm_step(model, args.seq_len)
    step()                                                          # warm-up (allocator, kernel build)
    ours = summary(timed_steps(step, args.steps), args.seq_len)
    ours.update(seq_len=args.seq_len, dtype="bf16 autocast, fp32 master weights", what="forward+backward+clip+AdamW")
    results = {"preset": args.preset, "env": env, "hybridlm": ours}

    if not args.skip_hf:
        from transformers import JambaForCausalLM
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            hf = JambaForCausalLM.from_pretrained(tmp, dtype=torch.float32).train()
        del model
        print(f"transformers JambaForCausalLM: seq {args.hf_seq_len}, fp32", file=sys.stderr)
        transformers_step(hf, 16)()                                 # warm-up on a short sequence
        theirs = summary(timed_steps(transformers_step(hf, args.hf_seq_len), args.hf_steps), args.hf_seq_len)
        theirs.update(seq_len=args.hf_seq_len, dtype="fp32", what="forward+backward+clip+AdamW")
        results["transformers"] = theirs
        results["speedup"] = ours["tok_per_s"] / theirs["tok_per_s"]

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [f"# Training throughput, {args.preset}", "", environment_md(env),
          "| system | sequence | dtype | step (best / median) | tokens/s (best) |", "|---|---|---|---|---|"]
    rows = [("hybridlm", ours)] + ([("transformers JambaForCausalLM", results["transformers"])]
                                   if "transformers" in results else [])
    for name, r in rows:
        md.append(f"| {name} | {r['seq_len']} | {r['dtype']} | {r['best_s']:.2f} s / {r['median_s']:.2f} s | "
                  f"{r['tok_per_s']:.1f} |")
    if "speedup" in results:
        md += ["", (f"hybridlm trains {results['speedup']:.0f}x as many tokens per second as transformers "
                    f"(transformers at {args.hf_seq_len} tokens per step, hybridlm at {args.seq_len}).")]
    flags = " ".join(argv if argv is not None else sys.argv[1:])
    md += ["", f"Command: `python benchmarks/train_bench.py {flags}`"]
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
