"""Speculative decoding (issue 14, part 2): the machinery on random weights, and the speed-up on a trained model.

Trained model (``--target DIR``; writes ``--out``.md and .json), decode tok/s plain vs speculative, greedy:
  (a) prompt lookup on a copy task: a prompt holds the first ``--copy-tokens`` tokens of a stdlib source file,
      then a blank line and the file's first ``--cue-lines`` lines again, so the continuation re-emits the
      file (no instruction: the model only has to continue); k swept over ``--ks``;
  (b) a draft model (``--draft DIR``, the target's tokenizer, checked) on plain continuation of
      ``--context-tokens`` tokens of held-out stdlib source, k swept over ``--draft-k``; and one sampled run at
      temperature 0.8 (the accept/reject rule: the output is distributed as the target's, not equal to
      plain sampling's), for its acceptance rate.
Files are picked deterministically: stdlib documents in the validation split of every run that held out
at least 2% (``data.split_score(key) < 0.02``: ``hybridlm train --data stdlib`` held them out), sorted by
name, long enough for the prompt; (a) takes the even ones, (b) the odd ones. Decode tok/s counts the
tokens after the first over the time after the first (prompt processing, and the draft model's own
prefill, excluded; reported as ``prefill s``); the fastest of ``--repeats`` runs. Greedy speculative output
must equal plain greedy token for token: the script says so, and exits 1 (after writing) if not.

    python benchmarks/speculative.py --target /root/runs/quality-25m --draft /root/runs/quickstart --threads 2
    python benchmarks/speculative.py --target /root/runs/quickstart --draft /root/runs/quickstart --quick

Machinery (no ``--target``): speculative decoding's rollback strategies, side by side in one process.
1. One partial acceptance, timed alone: after a verify chunk of k+1 tokens, keep m of them
   - copy  (strategy 2): ``Cache.rollback(ck, m)`` copies the recorded SSM state and rebuilds the conv
     window (the chunk itself paid for recording the per-position states: timed too, as the extra cost of
     a recording verify forward over a plain one);
   - rerun (strategy 1): ``Cache.rollback(ck)`` restores the checkpoint, then a forward of the m kept tokens.
2. Whole generations, plain greedy and speculative (prompt lookup) with each strategy, on a copy task
   (the prompt repeats a random phrase, so lookup drafts are often right): tok/s, acceptance, tokens per
   target forward. A random-weights model agrees with its own context only by accident, so read the
   speeds as the cost of the machinery, not as the speed-up a trained model gets.

    python benchmarks/speculative.py --preset bench-88m --k 4 --threads 2
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import hybridlm  # noqa: F401  (before torch: it sets OpenMP's wait policy, which torch's first import fixes)
import torch

REPO = Path(__file__).resolve().parent.parent
HELD_OUT = 0.02                       # split_score below this: validation for every run with val_fraction >= 2%
TARGETS = {"lookup": 2.0, "draft": 1.5}   # issue 14: decode speed-up on a trained model


def best_ms(fn, rounds: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


# ---- the machinery, random weights -----------------------------------------------------------------------
def machinery(args):
    from hybridlm import HybridLM, preset
    from hybridlm.generate import Generation, prefill, stream
    from hybridlm.speculative import Speculative

    dtype = getattr(torch, args.dtype)
    m = HybridLM(preset(args.preset)).init_weights(0).to(dtype).eval()
    v = m.config.vocab_size
    g = torch.Generator().manual_seed(0)
    phrase = torch.randint(0, v, (37,), generator=g).tolist()
    prompt = torch.tensor([(phrase * (args.prompt // 37 + 1))[:args.prompt]])
    chunk = torch.randint(0, v, (1, args.k + 1), generator=g)
    print(f"{args.preset} {args.dtype}, {torch.get_num_threads()} threads, prompt {args.prompt}, k {args.k}")

    # 1. one rollback, each way
    cache = m.new_cache(1, args.prompt + 4 * args.k + 8)
    with torch.no_grad():
        prefill(m, cache, prompt)

        def verify(trail):
            ck = cache.checkpoint(args.k + 1, trail=trail)
            m(chunk, cache)
            return ck

        def undo(ck):
            cache.rollback(ck)

        print(f"verify forward of {args.k + 1} tokens, then keep m of them (each then undone: the same in both):")
        for keep in range(1, args.k + 1):
            def copy():
                ck = verify(True)
                cache.rollback(ck, keep)
                undo(ck)

            def rerun():
                ck = verify(False)
                cache.rollback(ck)
                m(chunk[:, :keep], cache, last_only=True)
                undo(ck)
            print(f"  m = {keep}: copy {best_ms(copy):.2f} ms, rerun {best_ms(rerun):.2f} ms")

    # 2. whole generations
    runs = {"plain": None, "lookup copy": Speculative("lookup", k=args.k, rollback="copy"),
            "lookup rerun": Speculative("lookup", k=args.k, rollback="rerun")}
    ref = None
    for name, spec in runs.items():
        gen = Generation(args.new, speculative=spec)
        t0 = time.perf_counter()
        out = torch.stack(list(stream(m, prompt, gen)), 1)
        dt = time.perf_counter() - t0
        ref = out if ref is None else ref
        same = "" if torch.equal(out, ref) else "  OUTPUT DIFFERS FROM PLAIN"
        extra = f"; {spec.stats.summary()}" if spec is not None else ""
        print(f"{name:13s} {args.new / dt:7.1f} tok/s (prefill included){extra}{same}")


# ---- a trained model ------------------------------------------------------------------------------------
def same_tokenizer(target: str, draft: str):
    """Exit unless the two checkpoints' tokenizers are the same definition with the same special tokens."""
    from hybridlm.tokenizer import load_tokenizer
    a, b = load_tokenizer(target), load_tokenizer(draft)
    diffs = []
    if a.backend is None or b.backend is None:
        diffs.append("one is not a tokenizer.json (cannot compare definitions)")
    elif a.fingerprint() != b.fingerprint():
        diffs.append(f"tokenizer.json differs (vocabularies of {a.vocab_size} and {b.vocab_size} ids)")
    for name in ("bos_id", "eos_id", "pad_id"):
        if getattr(a, name) != getattr(b, name):
            diffs.append(f"{name} {getattr(a, name)} vs {getattr(b, name)}")
    if diffs:
        sys.exit(f"the draft model's tokenizer ({draft}) is not the target's ({target}): {'; '.join(diffs)}. "
                 f"A draft model must share the target's tokenizer.")
    return a


def step_costs(target, draft, ids: list[int], spans=(2, 3, 5, 7)) -> dict:
    """What one speculative step is made of, in ms (fastest of 5 x 20 calls, after a prefill of ``ids``):
    a plain decode step of the target; a verify forward of L tokens (a checkpoint with trails, the forward,
    a rollback keeping one token: a plain step's worth of progress, so the cache grows as decoding does);
    a draft model's decode step."""
    from hybridlm.generate import decode_step, prefill

    def per_call(fn, n=20):
        return best_ms(lambda: [fn() for _ in range(n)]) / n

    out = {}
    tok = torch.tensor([ids[-1]])
    with torch.no_grad():
        cache = target.new_cache(1, len(ids) + 2048)
        prefill(target, cache, torch.tensor([ids]))
        out["plain_ms"] = per_call(lambda: decode_step(target, cache, tok))
        for span in spans:
            chunk = torch.tensor([ids[-span:]])

            def verify():
                ck = cache.checkpoint(span, trail=True)
                target(chunk, cache)
                cache.rollback(ck, 1)
            out[f"verify_{span}_ms"] = per_call(verify)
        if draft is not None:
            dcache = draft.new_cache(1, len(ids) + 2048)
            prefill(draft, dcache, torch.tensor([ids]))
            out["draft_ms"] = per_call(lambda: decode_step(draft, dcache, tok))
    return out


def draft_training(path: str) -> str:
    """How the draft was trained, from its metrics.jsonl when ``hybridlm train`` wrote one: the last
    validation loss, and with --distill-from its agreement with the teacher."""
    from hybridlm.train import read_metrics
    f = Path(path) / "metrics.jsonl"
    rows = [r for r in read_metrics(f) if "val_loss" in r] if f.exists() else []
    if not rows:
        return ""
    r = rows[-1]
    agree = f", top-1 agreement with its teacher {r['val_agree']:.1%}" if "val_agree" in r else ""
    return f"trained {r['step']} steps, validation loss {r['val_loss']:.3f}{agree} (its metrics.jsonl)"


def held_out_sources(tok, need: int) -> list[tuple[str, list[int]]]:
    """(key, token ids) of the held-out stdlib documents with at least ``need`` tokens, sorted by key."""
    from hybridlm.data import Corpus, split_score
    docs = sorted((d for d in Corpus("stdlib").documents() if split_score(d.key) < HELD_OUT), key=lambda d: d.key)
    out = []
    for d in docs:
        ids = tok.encode(d.text)
        if len(ids) >= need:
            out.append((d.key, ids))
    return out


def head(tok, ids: list[int], n: int) -> str:
    """The text of the first ``n`` tokens, cut back to the last whole line."""
    text = tok.decode(ids[:n])
    return text[:text.rfind("\n") + 1] if "\n" in text else text


def copy_prompt(tok, ids: list[int], copy_tokens: int, cue_lines: int) -> str:
    """A file's head, a blank line, then its first lines again: the continuation copies the file."""
    chunk = head(tok, ids, copy_tokens)
    cue = "".join(chunk.splitlines(keepends=True)[:cue_lines])
    return chunk.rstrip("\n") + "\n\n\n" + cue


def timed(model, ids: torch.Tensor, gen) -> dict:
    """One generation: its tokens, the time to its first token and the decode time after it."""
    from hybridlm.generate import stream
    out = []
    t0 = time.perf_counter()
    t_first = None
    for t in stream(model, ids, gen):
        if t_first is None:
            t_first = time.perf_counter()
        out.append(int(t[0]))
    end = time.perf_counter()
    return {"tokens": out, "prefill_s": t_first - t0, "decode_s": end - t_first}


def measure(model, ids: torch.Tensor, new: int, repeats: int, spec=None, temperature: float = 0.0) -> dict:
    """The fastest decode of ``repeats`` identical runs (seeded: the same tokens every time)."""
    from hybridlm.generate import Generation, Sampling
    best = None
    for _ in range(max(1, repeats)):
        r = timed(model, ids, Generation(new, Sampling(temperature=temperature, seed=0), speculative=spec))
        if best is not None and r["tokens"] != best["tokens"]:
            sys.exit("two runs of the same seeded generation differ: the benchmark is not deterministic")
        if best is None or r["decode_s"] < best["decode_s"]:
            best = r
    n = len(best["tokens"])
    best["tok_s"] = (n - 1) / best["decode_s"] if n > 1 and best["decode_s"] > 0 else 0.0
    if spec is not None:
        st = spec.stats
        best["stats"] = {"forwards": st.forwards, "rollbacks": st.rollbacks, "reruns": st.reruns,
                         "tokens": st.tokens, "drafted": st.drafted, "accepted": st.accepted}
    return best


def case_row(task: str, method: str, k: int, key: str, prompt_tokens: int, temperature: float, plain: dict,
             spec: dict) -> dict:
    st = spec["stats"]
    same = plain["tokens"] == spec["tokens"]
    return {"task": task, "method": method, "k": k, "file": key, "prompt_tokens": prompt_tokens,
            "temperature": temperature, "new_tokens": len(spec["tokens"]),
            "plain_tok_s": plain["tok_s"], "spec_tok_s": spec["tok_s"],
            "speedup": spec["tok_s"] / plain["tok_s"] if plain["tok_s"] else 0.0,
            "plain_decode_s": plain["decode_s"], "spec_decode_s": spec["decode_s"],
            "plain_tokens": len(plain["tokens"]) - 1, "spec_tokens": len(spec["tokens"]) - 1,
            "plain_prefill_s": plain["prefill_s"], "spec_prefill_s": spec["prefill_s"],
            "acceptance": st["accepted"] / st["drafted"] if st["drafted"] else 0.0,
            "tokens_per_forward": st["tokens"] / st["forwards"] if st["forwards"] else 0.0,
            "stats": st, "identical": same if temperature == 0 else None}


def divergence(model, ids: torch.Tensor, r: dict, plain: dict, spec: dict) -> dict:
    """Where a greedy speculative run left plain greedy decoding, explain it: the two tokens' logits in the
    target's full forward over the prompt and the plain tokens before that point. A gap within one step of
    the logits' dtype at that magnitude (bf16: 8 significant bits) is a tie that the two paths' fp32 sums,
    taken in different orders, rounded apart (``tie``); anything wider is a real difference (exit 1)."""
    if r["identical"] is not False:
        return r
    a, b = plain["tokens"], spec["tokens"]
    i = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    if i >= min(len(a), len(b)):
        r["divergence"] = {"index": i, "tie": False, "why": "lengths differ"}
        return r
    with torch.no_grad():
        logits = model(torch.cat([ids, torch.tensor([a[:i]], dtype=ids.dtype)], 1))[0, -1]
    la, lb = float(logits[a[i]]), float(logits[b[i]])
    bits = -int(math.log2(torch.finfo(logits.dtype).eps))    # stored mantissa bits: bf16 7, fp32 23
    step = 2.0 ** (math.floor(math.log2(max(abs(la), abs(lb), 1e-30))) - bits)
    r["divergence"] = {"index": i, "plain_token": a[i], "spec_token": b[i], "plain_logit": la, "spec_logit": lb,
                       "resolution": step, "dtype": str(logits.dtype).replace("torch.", ""),
                       "tie": abs(la - lb) <= step}
    return r


def same_label(r: dict) -> str:
    if r["identical"] is None:
        return "sampled"
    if r["identical"]:
        return "identical"
    d = r.get("divergence", {})
    return f"tie in {d['dtype']} logits at token {d['index']}" if d.get("tie") else "DIFFERENT FROM PLAIN"


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (task, method, k, temperature): decode tok/s over all prompts (total tokens / total
    seconds), so each prompt weighs by its decode time."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["method"], r["k"], r["temperature"]), []).append(r)
    out = []
    for (task, method, k, temp), rs in groups.items():
        plain = sum(r["plain_tokens"] for r in rs) / sum(r["plain_decode_s"] for r in rs)
        spec = sum(r["spec_tokens"] for r in rs) / sum(r["spec_decode_s"] for r in rs)
        drafted = sum(r["stats"]["drafted"] for r in rs)
        forwards = sum(r["stats"]["forwards"] for r in rs)
        ties = sum(bool(r.get("divergence", {}).get("tie")) for r in rs)
        different = sum(r["identical"] is False for r in rs) - ties
        out.append({"task": task, "method": method, "k": k, "temperature": temp, "prompts": len(rs),
                    "plain_tok_s": plain, "spec_tok_s": spec, "speedup": spec / plain,
                    "acceptance": sum(r["stats"]["accepted"] for r in rs) / drafted if drafted else 0.0,
                    "tokens_per_forward": sum(r["stats"]["tokens"] for r in rs) / forwards if forwards else 0.0,
                    "identical": None if temp else all(r["identical"] for r in rs), "ties": ties,
                    "label": "sampled" if temp else "DIFFERENT" if different else
                             f"identical but {ties} tie(s)" if ties else "identical"})
    return out


def verdicts(summary: list[dict]) -> list[dict]:
    """The issue's targets against the best greedy k of each method."""
    out = []
    for method, target in TARGETS.items():
        rs = [s for s in summary if s["method"] == method and s["temperature"] == 0]
        if not rs:
            continue
        best = max(rs, key=lambda s: s["speedup"])
        out.append({"method": method, "task": best["task"], "k": best["k"], "speedup": best["speedup"],
                    "target": target, "met": best["speedup"] >= target})
    return out


def fmt_k(r: dict) -> str:
    return f"{r['method']}, k={r['k']}" + (f", T={r['temperature']}" if r["temperature"] else "")


def costs_only(args):
    """The cost table alone, for a target of any size: what speculation could give there, at a measured
    acceptance rate (its weights, random or trained, do not change what a step costs)."""
    from hybridlm import HybridLM, preset
    from hybridlm.bench import environment, environment_md
    from hybridlm.checkpoint import load_model, parse_dtype
    t0 = time.perf_counter()
    target = load_model(args.target, dtype=parse_dtype(args.dtype), quantize=args.quantize or None).eval()
    v = target.config.vocab_size
    draft = HybridLM(preset(args.draft_preset, vocab_size=v)).init_weights(0).to(parse_dtype(args.dtype)).eval()
    ids = torch.randint(0, v, (args.context_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    print(f"target {args.target} ({target.num_params() / 1e6:.0f}M parameters{', ' + args.quantize if args.quantize else ''}), "
          f"draft: {args.draft_preset} with {v} ids ({draft.num_params() / 1e6:.1f}M), {args.dtype}, "
          f"{torch.get_num_threads()} threads", flush=True)
    c = step_costs(target, draft, ids)
    env = environment()
    res = {"command": " ".join(["python", "benchmarks/speculative.py", *sys.argv[1:]]), "env": env,
           "target": {"path": args.target, "params": target.num_params(), "quantize": args.quantize or None},
           "draft": {"preset": args.draft_preset, "params": draft.num_params()}, "costs": c,
           "wall_seconds": time.perf_counter() - t0}
    out = Path(args.out or REPO / "benchmarks" / "results" / "speculative_costs")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    text = (f"# What a speculative step costs: {args.target}\n\n`{res['command']}` "
            f"({res['wall_seconds'] / 60:.1f} min)\n\n{environment_md(env).rstrip()}\n"
            f"- target: `{args.target}` ({target.num_params() / 1e6:.0f}M parameters"
            f"{', ' + args.quantize if args.quantize else ''}, {args.dtype}); draft: preset `{args.draft_preset}` with "
            f"the target's {v} ids ({draft.num_params() / 1e6:.1f}M parameters), random weights (a step costs the "
            f"same whatever the weights)\n\n" + costs_md(c, args.context_tokens))
    out.with_suffix(".md").write_text(text)
    print(costs_md(c, args.context_tokens))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


def trained(args):
    from hybridlm.bench import environment, environment_md, load_average
    from hybridlm.checkpoint import load_model, parse_dtype
    from hybridlm.speculative import Speculative

    t_start = time.perf_counter()
    for d in (args.target, args.draft):
        if d and not (Path(d) / "config.json").exists():
            sys.exit(f"{d}: no config.json there (not a saved checkpoint; did its training finish?)")
    tok = same_tokenizer(args.target, args.draft) if args.draft else None
    if tok is None:
        from hybridlm.tokenizer import load_tokenizer
        tok = load_tokenizer(args.target)
    dtype = parse_dtype(args.dtype)
    target = load_model(args.target, dtype=dtype).eval()
    draft = load_model(args.draft, dtype=dtype, quantize=args.draft_quantize or None).eval() if args.draft else None
    if draft is not None:
        Speculative("draft", draft=draft).check(target)
    env = environment()
    print(f"target {args.target}: {target.num_params() / 1e6:.1f}M parameters; draft "
          f"{args.draft or '-'}: {draft.num_params() / 1e6 if draft is not None else 0:.1f}M; {args.dtype}, "
          f"{torch.get_num_threads()} threads; tokenizers equal" + (" (checked)" if draft is not None else ""),
          flush=True)

    need = max(args.copy_tokens, args.context_tokens + args.new)
    sources = held_out_sources(tok, need)
    copy_src, cont_src = sources[0::2][:args.prompts], sources[1::2][:args.prompts]
    if not copy_src or (draft is not None and not cont_src):
        sys.exit(f"only {len(sources)} held-out stdlib files have {need} tokens; lower --copy-tokens/--context-tokens")
    cap = target.config.max_position_embeddings
    if args.copy_tokens + 64 + args.new > cap or args.context_tokens + args.new > cap:
        sys.exit(f"prompts + {args.new} new tokens exceed the target's context of {cap} tokens")

    # warm-up: kernels, allocator, oneDNN primitives of every path measured below
    w = torch.tensor([sources[0][1][:64]])
    measure(target, w, 8, 1)
    measure(target, w, 8, 1, Speculative("lookup", k=max(args.ks)))
    if draft is not None:
        measure(target, w, 8, 1, Speculative("draft", k=max(args.draft_k), draft=draft))

    cost_ids = (cont_src or copy_src)[0][1][:args.context_tokens]
    costs = step_costs(target, draft, cost_ids)
    print("costs: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()), flush=True)
    rows = []

    def report(r, x, plain, spec):
        r = divergence(target, x, r, plain, spec)
        rows.append(r)
        same = same_label(r)
        print(f"  {r['task']:12s} {fmt_k(r):22s} {r['file']:34s} plain {r['plain_tok_s']:7.1f} tok/s, "
              f"speculative {r['spec_tok_s']:7.1f} tok/s ({r['speedup']:.2f}x), acceptance {r['acceptance']:.0%}, "
              f"{r['tokens_per_forward']:.2f} tok/forward, {same}", flush=True)

    print(f"(a) copy task, prompt lookup, k in {args.ks}:")
    for key, ids in copy_src:
        prompt = tok.encode(copy_prompt(tok, ids, args.copy_tokens, args.cue_lines))
        x = torch.tensor([prompt])
        plain = measure(target, x, args.new, args.repeats)
        for k in args.ks:
            spec = measure(target, x, args.new, args.repeats, Speculative("lookup", k=k))
            report(case_row("copy", "lookup", k, key, len(prompt), 0.0, plain, spec), x, plain, spec)
    if draft is not None:
        print(f"(b) continuation of held-out source, draft model, k in {args.draft_k}:")
        for key, ids in cont_src:
            prompt = tok.encode(head(tok, ids, args.context_tokens))
            x = torch.tensor([prompt])
            plain = measure(target, x, args.new, args.repeats)
            for k in args.draft_k:
                spec = measure(target, x, args.new, args.repeats,
                               Speculative("draft", k=k, draft=draft, adaptive=not args.fixed_k))
                report(case_row("continuation", "draft", k, key, len(prompt), 0.0, plain, spec), x, plain, spec)
        if args.sampled:
            key, ids = cont_src[0]
            prompt = tok.encode(head(tok, ids, args.context_tokens))
            x = torch.tensor([prompt])
            plain = measure(target, x, args.new, args.repeats, temperature=args.temperature)
            k = args.draft_k[0]
            spec = measure(target, x, args.new, args.repeats,
                           Speculative("draft", k=k, draft=draft, adaptive=not args.fixed_k),
                           temperature=args.temperature)
            report(case_row("continuation", "draft", k, key, len(prompt), args.temperature, plain, spec), x, plain, spec)

    summary = summarise(rows)
    goals = verdicts(summary)
    mismatches = [r for r in rows if r["identical"] is False and not r["divergence"]["tie"]]
    ties = [r for r in rows if r["identical"] is False and r["divergence"]["tie"]]
    greedy = sum(r["identical"] is not None for r in rows)
    dtype = ties[0]["divergence"]["dtype"] if ties else ""
    tie_note = ("" if not ties else
                f" except {len(ties)} that left it at a tie in the logits' {dtype} "
                f"(the two tokens' logits within one {dtype} step in the full forward: "
                + ", ".join(f"{r['file']} ({fmt_k(r)}) at token {r['divergence']['index']}" for r in ties)
                + "); the verify chunk's and the plain step's fp32 sums, taken in different orders, rounded apart")
    same_line = (f"greedy speculative output identical to plain greedy, token for token, in "
                 f"{sum(r['identical'] is True for r in rows)} of {greedy} greedy cases{tie_note}" if not mismatches else
                 f"GREEDY OUTPUT DIFFERS from plain greedy in {len(mismatches)} case(s): " +
                 ", ".join(f"{r['file']} ({fmt_k(r)})" for r in mismatches))
    res = {"command": " ".join(["python", "benchmarks/speculative.py", *sys.argv[1:]]), "env": env,
           "load_average_end": load_average(), "wall_seconds": time.perf_counter() - t_start,
           "target": {"path": args.target, "params": target.num_params(),
                      "max_position_embeddings": cap},
           "draft": {"path": args.draft, "params": draft.num_params(), "quantize": args.draft_quantize or None,
                     "training": draft_training(args.draft)} if draft is not None else None,
           "dtype": args.dtype, "settings": {k: v for k, v in vars(args).items() if k not in ("preset", "prompt", "k")},
           "tokenizer": {"vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint() if tok.backend else None,
                         "draft_equal": draft is not None},
           "costs": costs, "rows": rows, "summary": summary, "targets": goals, "identical": not mismatches, "identical_line": same_line}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")      # first: a report bug loses nothing
    text = report_md(res, environment_md(env))
    out.with_suffix(".md").write_text(text)
    print()
    print(summary_table(summary))
    print(same_line)
    for g in goals:
        print(target_line(g))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    if mismatches:
        sys.exit(1)


def target_line(g: dict) -> str:
    return (f"target: {g['method']} >= {g['target']:.1f}x on {g['task']}: {g['speedup']:.2f}x (best k = {g['k']}) "
            f"-> {'met' if g['met'] else 'NOT met'}")


def summary_table(summary: list[dict]) -> str:
    head = (f"{'task':13s}{'method':8s}{'k':>3s}{'T':>5s}{'prompts':>8s}{'plain tok/s':>13s}{'spec tok/s':>12s}"
            f"{'speed-up':>10s}{'accept':>8s}{'tok/fwd':>9s}  greedy output")
    lines = [head, "-" * len(head)]
    for s in summary:
        same = s["label"]
        lines.append(f"{s['task']:13s}{s['method']:8s}{s['k']:3d}{s['temperature']:5.1f}{s['prompts']:8d}"
                     f"{s['plain_tok_s']:13.1f}{s['spec_tok_s']:12.1f}{s['speedup']:9.2f}x{s['acceptance']:8.0%}"
                     f"{s['tokens_per_forward']:9.2f}  {same}")
    return "\n".join(lines)


def report_md(res: dict, env_md: str) -> str:
    s = res["settings"]
    t, d = res["target"], res["draft"]
    load = res["load_average_end"]
    lines = ["# Speculative decoding on a trained hybrid: prompt lookup and a draft model\n",
             f"`{res['command']}` ({res['wall_seconds'] / 60:.1f} min)\n", env_md.rstrip()]
    if load:
        lines.append(f"- load average at end (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}")
    lines += [f"- target: `{t['path']}` ({t['params'] / 1e6:.1f}M parameters), draft: " +
              (f"`{d['path']}` ({d['params'] / 1e6:.1f}M parameters{', ' + d['quantize'] if d.get('quantize') else ''}"
               f"{'; ' + d['training'] if d.get('training') else ''})" if d else "none") +
              f"; {res['dtype']}; tokenizer: {res['tokenizer']['vocab_size']} ids" +
              (", the draft's checked equal to the target's" if res["tokenizer"]["draft_equal"] else ""),
              f"- {s['new']} new tokens per run; fastest of {s['repeats']} run(s); decode tok/s = tokens after the "
              f"first / time after the first (prompt processing, and the draft model's prefill, excluded)",
              f"- (a) copy task: a held-out stdlib file's first {s['copy_tokens']} tokens (cut to whole lines), a "
              f"blank line, then its first {s['cue_lines']} lines again; greedy; prompt lookup with n-grams 3, 2, 1",
              f"- (b) continuation: a held-out stdlib file's first {s['context_tokens']} tokens (whole lines); greedy, "
              f"and one run sampled at temperature {s['temperature']} (seed 0); the draft model's k "
              + ("fixed (--fixed-k)" if s.get("fixed_k") else "the most per step: adaptive (speculative.SpecRun.k_now)")
              + "\n",
              "## Summary (all prompts of a case pooled: total tokens / total decode seconds)\n",
              "| task | method | k | temperature | prompts | plain tok/s | speculative tok/s | speed-up | acceptance "
              "| tokens per target forward | greedy output |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["summary"]:
        same = r.get("label") or same_label(r)
        lines.append(f"| {r['task']} | {r['method']} | {r['k']} | {r['temperature']:g} | {r['prompts']} | "
                     f"{r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | {r['speedup']:.2f}x | {r['acceptance']:.0%} | "
                     f"{r['tokens_per_forward']:.2f} | {same} |")
    lines += ["", "## Targets (issue 14)\n", f"- {res['identical_line']}"]
    lines += [f"- {target_line(g)}" for g in res["targets"]]
    lines += ["", "## Every case\n",
              "| task | method | k | T | file | prompt tokens | plain tok/s | speculative tok/s | speed-up "
              "| acceptance | tokens/forward | verify forwards | rolled back | greedy output |",
              "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        same = same_label(r)
        lines.append(f"| {r['task']} | {r['method']} | {r['k']} | {r['temperature']:g} | `{r['file']}` | "
                     f"{r['prompt_tokens']} | {r['plain_tok_s']:.1f} | {r['spec_tok_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['acceptance']:.0%} | {r['tokens_per_forward']:.2f} | {r['stats']['forwards']} | "
                     f"{r['stats']['rollbacks']} | {same} |")
    lines += ["", costs_md(res.get("costs"), s["context_tokens"]), paragraph(res)]
    return "\n".join(lines) + "\n"


def costs_md(c: dict | None, context: int) -> str:
    """The measured parts of a speculative step, and the most a draft model could give with every draft
    accepted: k + 1 tokens for a verify of k + 1 plus k draft steps, against k + 1 plain steps."""
    if not c:
        return ""
    p = c["plain_ms"]
    lines = [f"## What a speculative step costs (after a {context}-token prompt; fastest of 5 x 20 calls)\n",
             "| part | ms | plain steps |", "|---|---:|---:|", f"| plain decode step (target) | {p:.2f} | 1.00 |"]
    spans = sorted(int(k.split("_")[1]) for k in c if k.startswith("verify_"))
    for n in spans:
        lines.append(f"| verify forward of {n} tokens (checkpoint, trails, rollback) | {c[f'verify_{n}_ms']:.2f} | "
                     f"{c[f'verify_{n}_ms'] / p:.2f} |")
    if "draft_ms" in c:
        d = c["draft_ms"]
        lines.append(f"| draft model decode step | {d:.2f} | {d / p:.2f} |")
        bound = ", ".join(f"k = {n - 1}: {n * p / (c[f'verify_{n}_ms'] + (n - 1) * d):.2f}x" for n in spans)
        lines += ["", f"With every draft accepted, a step of k drafts gives k + 1 tokens for a verify of k + 1 and "
                      f"k draft steps, so a draft model can give at most: {bound}."]
    return "\n".join(lines) + "\n"


def paragraph(res: dict) -> str:
    """What the numbers say, in words generated from them (no claim the run does not support)."""
    parts = []
    for g in res["targets"]:
        best = next(s for s in res["summary"] if s["method"] == g["method"] and s["k"] == g["k"]
                    and s["temperature"] == 0)
        parts.append(f"{'Prompt lookup' if g['method'] == 'lookup' else 'The draft model'} on the {g['task']} task "
                     f"is {g['speedup']:.2f}x plain decoding at its best k ({g['k']}): {best['acceptance']:.0%} of "
                     f"drafted tokens accepted, {best['tokens_per_forward']:.2f} tokens per target forward; the "
                     f"issue's {g['target']:.1f}x target is {'met' if g['met'] else 'not met'}.")
    sampled = [s for s in res["summary"] if s["temperature"]]
    for s in sampled:
        parts.append(f"Sampled at temperature {s['temperature']:g}, the draft model's tokens are accepted "
                     f"{s['acceptance']:.0%} of the time ({s['speedup']:.2f}x plain sampling).")
    parts.append("The speed-up is bounded by tokens per target forward divided by the cost of one verify step "
                 "(a forward of k+1 tokens, the lookup or the k draft-model steps, and the state rollback) relative "
                 "to one plain decode step; " + res["identical_line"] + ".")
    return " ".join(parts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    ap.add_argument("--dtype", default="float32")
    # the machinery (random weights)
    ap.add_argument("--preset", default="bench-88m", help="machinery mode: the random-weights model")
    ap.add_argument("--k", type=int, default=4, help="machinery mode: tokens drafted per verify")
    ap.add_argument("--prompt", type=int, default=512, help="machinery mode: prompt tokens")
    # a trained model
    ap.add_argument("--target", default="", help="a trained checkpoint: measure the speed-up on it")
    ap.add_argument("--draft", default="", help="a draft checkpoint with the target's tokenizer (empty: lookup only)")
    ap.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 6],
                    help="prompt lookup's k, swept")
    ap.add_argument("--draft-k", type=lambda s: [int(x) for x in s.split(",")], default=[4],
                    help="the draft model's k, swept (comma-separated; the sampled run takes the first)")
    ap.add_argument("--fixed-k", action="store_true",
                    help="the draft model drafts k every step (default: adaptive, speculative.SpecRun.k_now)")
    ap.add_argument("--draft-quantize", default="", help="load the draft model quantized (int8, int4, int4:g64, ...)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per task")
    ap.add_argument("--copy-tokens", type=int, default=768, help="copy task: tokens of the file in the prompt")
    ap.add_argument("--cue-lines", type=int, default=3, help="copy task: the file's first lines, repeated")
    ap.add_argument("--context-tokens", type=int, default=384, help="continuation: prompt tokens")
    ap.add_argument("--new", type=int, default=None, help="tokens generated per run (default 256; machinery 64)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per measurement; the fastest is kept")
    ap.add_argument("--temperature", type=float, default=0.8, help="the sampled draft run's temperature")
    ap.add_argument("--no-sampled", dest="sampled", action="store_false", help="skip the sampled draft run")
    ap.add_argument("--costs-only", action="store_true",
                    help="only the cost table of a speculative step, for any --target (a checkpoint, .gguf or "
                         "preset; weights do not change the costs), with --draft-preset's shape as the draft")
    ap.add_argument("--draft-preset", default="tiny",
                    help="--costs-only: the draft model's preset (random weights, the target's vocabulary)")
    ap.add_argument("--quantize", default="", help="--costs-only: load the target quantized (int8, int4, ...)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test (under a minute)")
    ap.add_argument("--out", default="", help="results file stem (default: benchmarks/results/speculative; "
                    "with --quick, a temporary directory, so a smoke test never overwrites the results)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.target:
        args.new = args.new or 64
        if args.quick:
            args.preset, args.prompt, args.new = "tiny", 64, 16
        machinery(args)
        return
    if args.costs_only:
        costs_only(args)
        return
    args.new = args.new or 256
    if args.quick:
        args.prompts, args.copy_tokens, args.context_tokens, args.new, args.repeats = 1, 160, 96, 24, 1
    if not args.out:
        args.out = str(Path(tempfile.gettempdir()) / "hybridlm-quick" / "speculative") if args.quick else \
            str(REPO / "benchmarks" / "results" / "speculative")
    trained(args)


if __name__ == "__main__":
    main()
