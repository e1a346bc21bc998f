"""Speculative decoding through the server's engine: requests decoded together in one batch, with and
without prompt lookup, on a trained model and the copy task of benchmarks/speculative.py.

Each case submits ``n`` greedy requests at once to ``engine.Engine`` (the server's model thread, without
HTTP), each a different held-out file to copy, and times from submission to the last request's end:
tokens generated per second over all requests. With ``--spec`` every request asks for lookup with k; the
replies must equal the plain ones token for token (checked).

    python benchmarks/engine_speculative.py --model /root/runs/quality-25m --batches 1,4 --k 6
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import hybridlm  # noqa: F401  (before torch: it sets OpenMP's wait policy)
import torch

sys.path.insert(0, str(Path(__file__).parent))
from speculative import copy_prompt, held_out_sources  # noqa: E402


def run(model, tok, prompts: list[list[int]], new: int, spec) -> tuple[float, list[list[int]], int]:
    """Submit every prompt at once; (seconds to the last end, each reply's tokens, engine steps)."""
    from hybridlm.engine import Engine, Job, Limits
    from hybridlm.generate import Sampling
    engine = Engine(model, tok, Limits(context=model.config.max_position_embeddings, max_new_tokens=new,
                                       max_batch=len(prompts)), None)
    done = threading.Semaphore(0)
    jobs = [Job(list(p), new, Sampling(), lambda ev: ev[0] in ("end", "error") and done.release(), index=i,
                speculative=spec) for i, p in enumerate(prompts)]
    engine.start()
    try:
        t0 = time.perf_counter()
        engine.submit(jobs)
        for _ in jobs:
            done.acquire()
        seconds = time.perf_counter() - t0
    finally:
        engine.stop()
    return seconds, [list(j.generated) for j in jobs], engine.steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    ap.add_argument("--k", type=int, default=6)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--copy-tokens", type=int, default=384)
    ap.add_argument("--cue-lines", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="float32, bfloat16, or auto (the checkpoint's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from hybridlm.bench import environment, environment_md
    from hybridlm.checkpoint import load_model, parse_dtype
    from hybridlm.speculative import Speculative
    from hybridlm.tokenizer import load_tokenizer
    tok = load_tokenizer(args.model)
    model = load_model(args.model, dtype=parse_dtype(args.dtype)).eval()
    sources = held_out_sources(tok, args.copy_tokens)
    prompts = [tok.encode(copy_prompt(tok, ids, args.copy_tokens, args.cue_lines)) for _, ids in sources]
    print(environment_md(environment()), flush=True)
    print(f"{args.model}: {model.num_params() / 1e6:.1f}M parameters, {args.threads} threads, {args.dtype}; copy task, "
          f"{args.new} new tokens per request, greedy, prompt lookup k = {args.k}", flush=True)
    run(model, tok, prompts[:1], 8, None)                                      # warm-up
    run(model, tok, prompts[:1], 8, Speculative("lookup", args.k))
    print("| requests at once | plain tok/s | lookup tok/s | speed-up | engine steps (plain / lookup) | same replies |")
    print("|---|---|---|---|---|---|")
    for n in args.batches:
        batch = prompts[:n]
        if len(batch) < n:
            sys.exit(f"only {len(prompts)} held-out files have {args.copy_tokens} tokens")
        t_plain, plain, s_plain = run(model, tok, batch, args.new, None)
        t_spec, spec, s_spec = run(model, tok, batch, args.new, Speculative("lookup", args.k))
        tokens = sum(len(r) for r in plain)
        print(f"| {n} | {tokens / t_plain:.1f} | {sum(len(r) for r in spec) / t_spec:.1f} | "
              f"{t_plain / t_spec:.2f}x | {s_plain} / {s_spec} | {spec == plain} |", flush=True)


if __name__ == "__main__":
    main()
