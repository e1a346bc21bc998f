"""Issue 4's side-by-side CPU benchmark on the bench-88m checkpoint, in one run:

1. hybridlm (fp32, bf16) vs transformers' JambaForCausalLM (fp32, bf16) vs llama.cpp (bf16 GGUF of the
   same weights): full-forward prefill, prompt processing, decode tok/s and peak memory;
2. the hybrid vs a pure transformer of equal parameter count built with hybridlm: prompt processing and
   decode tok/s at growing context, the context where the hybrid starts to win, and cache bytes.

    bash benchmarks/build_llama_cpp.sh          # once: llama.cpp, outside the repo
    python benchmarks/cpu_bench.py              # writes benchmarks/results/cpu_bench.{md,json,*.png}

The checkpoint is made by transformers with seed 0 under ~/.cache/hybridlm/bench-88m (with a synthetic
32000-token BPE tokenizer, which llama.cpp's converter needs), then converted to a bf16 GGUF there.
Nothing of it, and nothing of llama.cpp, lives in the repository.

Each Python system runs in a child process of its own (peak memory is that system's alone; one crash
loses one system), and the sequence of systems is repeated ``--rounds`` times, interleaved, keeping the
fastest run of each measurement: a burst of load from other processes then hurts every system alike
instead of whichever happened to run during it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")           # transformers is an oracle here; never fetch
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CACHE = Path(os.environ.get("HYBRIDLM_CACHE", Path.home() / ".cache" / "hybridlm"))
REPO = Path(__file__).resolve().parent.parent


# ---- the checkpoint, its tokenizer, its GGUF -------------------------------------------------------


def synthetic_tokenizer(vocab_size: int):
    """A Llama-style BPE (byte fallback, '▁' for spaces) of exactly ``vocab_size`` tokens, built without a
    corpus: <unk> <s> </s>, the 256 byte tokens, then every string over '▁' and a-z in length order, each
    token merged from its prefix and last letter. The benchmark checkpoint has random weights, so which
    strings the tokens are does not matter; llama.cpp's Jamba converter only needs a real vocabulary."""
    import string

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    alphabet = ["\u2581"] + list(string.ascii_lowercase)
    merges = []
    for c in alphabet:
        vocab[c] = len(vocab)
    level = alphabet
    while len(vocab) < vocab_size:
        longer = []
        for prefix in level:
            for c in alphabet:
                if len(vocab) == vocab_size:
                    break
                vocab[prefix + c] = len(vocab)
                merges.append((prefix, c))
                longer.append(prefix + c)
        level = longer
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    assert tok.get_vocab_size() == vocab_size
    return tok


def make_checkpoint(path: Path):
    """bench-88m as issue 4 defines it: transformers' JambaForCausalLM built from hybridlm's preset with
    torch.manual_seed(0), saved in fp32, plus the synthetic tokenizer."""
    import torch
    from transformers import JambaConfig, JambaForCausalLM

    from hybridlm.config import preset
    cfg = preset("bench-88m").to_dict()
    cfg.pop("architectures")
    cfg.pop("model_type")
    torch.manual_seed(0)
    model = JambaForCausalLM(JambaConfig(**cfg)).eval()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    synthetic_tokenizer(cfg["vocab_size"]).save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "model_max_length": cfg["max_position_embeddings"]}, indent=2) + "\n")
    os.replace(tmp, path)


def llama_cpp_paths(root: Path) -> dict:
    return {"root": root, "src": root / "src", "bench": root / "build" / "bin" / "llama-bench",
            "convert": root / "src" / "convert_hf_to_gguf.py"}


def make_gguf(ckpt: Path, paths: dict) -> Path:
    """The same checkpoint as a bf16 GGUF, converted by llama.cpp's own converter (its vendored gguf-py)."""
    out = ckpt / "bench-88m-bf16.gguf"
    if out.exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    r = subprocess.run([sys.executable, str(paths["convert"]), str(ckpt), "--outtype", "bf16", "--outfile", str(tmp)],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"GGUF conversion failed:\n{r.stderr[-3000:]}")
    os.replace(tmp, out)
    return out


# ---- children: one system, one dtype each ---------------------------------------------------------


def child_hybridlm(spec: dict) -> dict:
    import torch

    from hybridlm import bench as B
    from hybridlm.model import HybridLM
    dtype = getattr(torch, spec["dtype"])
    model = HybridLM.from_pretrained(spec["checkpoint"], dtype=dtype)
    t0 = time.perf_counter()
    B.warmup(model)
    rows = [{"warmup_seconds": time.perf_counter() - t0}]
    for n in spec["lengths"]:
        rows.append(B.full_forward(model, n, spec["logits_budget"]))
        _say(spec, f"full forward {n}", rows[-1]["tok_s"])
    for n in spec["pp_lengths"]:
        r = B.prompt_and_decode(model, n, 0)
        rows.append({"metric": "prompt", "tokens": n, "seconds": r["pp_seconds"], "tok_s": r["pp_tok_s"],
                     "peak_rss": r["peak_rss"]})
        _say(spec, f"prompt {n}", r["pp_tok_s"])
    r = B.prompt_and_decode(model, spec["decode_prompt"], spec["decode_steps"])
    rows.append({"metric": "decode", "tokens": spec["decode_steps"], "context": spec["decode_prompt"],
                 "seconds": r["decode_seconds"], "tok_s": r["decode_tok_s"], "peak_rss": r["peak_rss"]})
    _say(spec, "decode", r["decode_tok_s"])
    return {"rows": rows[1:], "warmup_seconds": rows[0]["warmup_seconds"], "env": B.environment()}


def child_transformers(spec: dict) -> dict:
    """transformers' JambaForCausalLM as shipped (no mamba_ssm/causal_conv1d on CPU: its PyTorch paths)."""
    import torch
    from transformers import JambaForCausalLM

    from hybridlm import bench as B
    dtype = getattr(torch, spec["dtype"])
    model = JambaForCausalLM.from_pretrained(spec["checkpoint"], dtype=dtype).eval()
    vocab = model.config.vocab_size

    def prefill(ids):                    # prompt processing: fill the cache, last logits only
        out = model(ids, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], out.past_key_values

    def decode(logits, cache, steps):
        for _ in range(steps):
            out = model(B.greedy(logits)[:, None], past_key_values=cache, use_cache=True)
            logits, cache = out.logits[:, -1], out.past_key_values
        return logits, cache

    rows = []
    with torch.no_grad():
        t0 = time.perf_counter()
        model(B.random_ids(vocab, 64, seed=1), use_cache=False)
        decode(*prefill(B.random_ids(vocab, 64, seed=1)), 4)
        warm = time.perf_counter() - t0
        for n in spec["lengths"]:
            ids = B.random_ids(vocab, n)
            with B.PeakRSS() as mem:
                if n <= B.WARM_SAME_SHAPE_UP_TO:         # as hybridlm.bench does for its own measurements
                    model(ids, use_cache=False)
                s = B.best_time(lambda ids=ids: model(ids, use_cache=False).logits, 1)
            rows.append({"metric": "full_forward", "tokens": n, "seconds": s, "tok_s": n / s, "peak_rss": mem.bytes,
                         "logits": "all"})
            _say(spec, f"full forward {n}", n / s)
        for n in spec["pp_lengths"]:
            ids = B.random_ids(vocab, n)
            with B.PeakRSS() as mem:
                if n <= B.WARM_SAME_SHAPE_UP_TO:
                    prefill(ids)
                s = B.best_time(lambda ids=ids: prefill(ids), 1)
            rows.append({"metric": "prompt", "tokens": n, "seconds": s, "tok_s": n / s, "peak_rss": mem.bytes})
            _say(spec, f"prompt {n}", n / s)
        steps = spec["decode_steps"]
        with B.PeakRSS() as mem:
            logits, cache = decode(*prefill(B.random_ids(vocab, spec["decode_prompt"])), 2)
            t0 = time.perf_counter()
            decode(logits, cache, steps)
            s = time.perf_counter() - t0
        rows.append({"metric": "decode", "tokens": steps, "context": spec["decode_prompt"], "seconds": s,
                     "tok_s": steps / s, "peak_rss": mem.bytes})
        _say(spec, "decode", steps / s)
    return {"rows": rows, "warmup_seconds": warm, "env": B.environment()}


def equal_params_transformer(cfg):
    """A pure transformer with the hybrid's width, depth and MoE layout (every mixer attention, RoPE since
    no Mamba layer carries position) whose intermediate size is chosen so that the total parameter count
    matches the hybrid's; rounded to a multiple of 64 for matmul-friendly shapes."""
    from hybridlm.summary import param_counts, transformer_twin
    twin = transformer_twin(cfg).replace(rope_theta=10000.0)
    want = param_counts(cfg)["total"]
    a = param_counts(twin)["total"]
    per_unit = param_counts(twin.replace(intermediate_size=twin.intermediate_size + 1))["total"] - a
    size = twin.intermediate_size + round((want - a) / per_unit / 64) * 64
    twin = twin.replace(intermediate_size=size)
    got = param_counts(twin)["total"]
    assert abs(got - want) / want < 0.02, (got, want)
    return twin


def child_context(spec: dict) -> dict:
    """Hybrid vs equal-parameter pure transformer: for each context N, prefill N tokens (timed: prompt
    processing), then decode steps at context N (timed). The two models alternate per context."""
    import torch

    from hybridlm import bench as B
    from hybridlm.config import preset
    from hybridlm.model import HybridLM
    from hybridlm.summary import param_counts
    dtype = getattr(torch, spec["dtype"])
    cfgs = {"hybrid": preset("bench-88m"), "transformer": equal_params_transformer(preset("bench-88m"))}
    models = {k: HybridLM(c).init_weights(0).to(dtype).eval() for k, c in cfgs.items()}
    for m in models.values():
        B.warmup(m)
    rows = []
    for i, n in enumerate(spec["contexts"]):
        for name in (("hybrid", "transformer") if i % 2 == 0 else ("transformer", "hybrid")):
            r = B.prompt_and_decode(models[name], n, spec["steps"])
            rows.append({"model": name, "context": n, **r})
            _say(spec, f"{name} ctx {n}: prompt {r['pp_tok_s']:.1f} tok/s, decode", r["decode_tok_s"])
    info = {k: {"layout": c.pattern, "intermediate_size": c.intermediate_size, "rope_theta": c.rope_theta,
                **param_counts(c)} for k, c in cfgs.items()}
    return {"rows": rows, "models": info, "env": B.environment()}


CHILDREN = {"hybridlm": child_hybridlm, "transformers": child_transformers, "context": child_context}


def _say(spec: dict, what: str, rate: float):
    print(f"  [{spec['system']} {spec.get('dtype', '')}] {what}: {rate:,.1f} tok/s", file=sys.stderr, flush=True)


def run_child(spec: dict, threads: int) -> dict:
    """Run one system in a fresh interpreter with ``threads`` torch threads; its result is the last line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    before = _loadavg()
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--threads", str(threads)],
                       stdout=subprocess.PIPE, text=True, env=env)
    if r.returncode:
        return {"error": f"exit code {r.returncode} (its stderr is above)", "spec": spec}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out.update(spec=spec, wall_seconds=time.perf_counter() - t0, load_before=before, load_after=_loadavg())
    return out


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


# ---- llama.cpp ---------------------------------------------------------------------------------------


def run_llama_bench(paths: dict, gguf: Path, threads: int, pp: list[int], tg: int, reps: int) -> dict:
    """llama-bench's own measurement (mean of ``reps`` repetitions after its warm-up run), parsed from JSON."""
    cmd = [str(paths["bench"]), "-m", str(gguf), "-t", str(threads), "-p", ",".join(map(str, pp)),
           "-n", str(tg), "-r", str(reps), "-o", "json"]
    before = _loadavg()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return {"error": f"llama-bench failed ({r.returncode}): {r.stderr[-2000:]}", "command": cmd}
    tests = json.loads(r.stdout)
    rows = []
    for t in tests:
        if t["n_prompt"] and not t["n_gen"]:
            rows.append({"metric": "prompt", "tokens": t["n_prompt"], "tok_s": t["avg_ts"], "stddev": t["stddev_ts"]})
        elif t["n_gen"] and not t["n_prompt"]:
            rows.append({"metric": "decode", "tokens": t["n_gen"], "context": 0, "tok_s": t["avg_ts"],
                         "stddev": t["stddev_ts"]})
    first = tests[0] if tests else {}
    info = {k: first.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "model_type", "type_k",
                                      "n_batch", "n_ubatch", "flash_attn", "n_threads")}
    return {"rows": rows, "info": info, "command": " ".join(cmd), "load_before": before, "load_after": _loadavg()}


# ---- merging rounds, reporting ----------------------------------------------------------------------


def merge_best(runs: list[dict]) -> dict:
    """(system, dtype) -> {(metric, tokens): the fastest row over all rounds, with every round's rate}."""
    best: dict = {}
    for run in runs:
        if "error" in run:
            continue
        key = (run["spec"]["system"], run["spec"].get("dtype", "bfloat16"))
        for row in run["rows"]:
            k = (row["metric"], row["tokens"])
            slot = best.setdefault(key, {})
            rates = slot.get(k, {}).get("rounds", []) + [row["tok_s"]]
            if k not in slot or row["tok_s"] > slot[k]["tok_s"]:
                slot[k] = dict(row)
            slot[k]["rounds"] = rates
    return best


def crossover(ctx_rows: list[dict], field: str) -> dict:
    """The context from which the hybrid is faster than the transformer at every larger measured context,
    and a log-linear interpolation of where the speed ratio crosses 1 between the two points around it."""
    import math
    by = {}
    for r in ctx_rows:
        by.setdefault(r["context"], {})[r["model"]] = r[field]
    ns = sorted(by)
    ratio = [by[n]["hybrid"] / by[n]["transformer"] for n in ns]
    first = None
    for i in range(len(ns)):
        if all(x > 1 for x in ratio[i:]):
            first = i
            break
    out = {"contexts": ns, "ratio": ratio, "wins_from": ns[first] if first is not None else None, "estimate": None}
    if first is not None and first > 0:
        a, b = math.log(ns[first - 1]), math.log(ns[first])
        ra, rb = math.log(ratio[first - 1]), math.log(ratio[first])
        out["estimate"] = round(math.exp(a + (b - a) * (0 - ra) / (rb - ra)))
    return out


def busy_note(res: dict) -> str:
    """Whether other processes shared the cores during the run, from the load averages recorded."""
    loads = [x for j in res["jobs"] if j.get("load") for x in j["load"]]
    cores = res["env"]["cores"] or 1
    if not loads:
        return "unknown (no load average on this system)"
    worst = max(loads)
    if worst <= cores * 1.25:
        return f"no: 1-min load average at most {worst:.1f} on {cores} cores during the jobs"
    return (f"YES: 1-min load average up to {worst:.1f} on {cores} cores during the jobs (this run's own "
            f"{res['args']['threads']} threads included). Other processes shared the cores, so every tok/s here "
            f"is depressed, multi-threaded ones most (a thread descheduled at a barrier stalls the other); "
            f"rerun on a quiet machine before quoting absolute numbers. Rounds are interleaved to keep ratios fair.")


def fmt_rate(x):
    return f"{x:,.1f}" if x is not None else "-"


def write_report(res: dict, out: Path):
    from hybridlm.bench import environment_md
    from hybridlm.summary import fmt_bytes
    best = res["best"]
    systems = [("hybridlm", "float32"), ("hybridlm", "bfloat16"), ("transformers", "float32"),
               ("transformers", "bfloat16"), ("llama.cpp", "bfloat16")]
    systems = [s for s in systems if s in best]
    keys = [("full_forward", n) for n in res["args"]["lengths"]] + \
           [("prompt", n) for n in res["args"]["pp_lengths"]] + [("decode", res["args"]["decode_steps"])]
    names = {"full_forward": "full forward", "prompt": "prompt processing", "decode": "decode"}

    def label(k):
        if k[0] == "decode":
            return f"decode {k[1]} tokens"
        return f"{names[k[0]]} {k[1]:,}"

    def best_of(system, k):
        vals = [(best[(s, d)][k]["tok_s"], d) for s, d in systems if s == system and k in best[(s, d)]]
        return max(vals) if vals else (None, None)

    L = ["# CPU benchmark: hybridlm vs transformers vs llama.cpp on bench-88m", "",
         "Random weights made by transformers with seed 0 (issue 4's definition); same checkpoint for every system. "
         f"Each Python system ran in its own process, {res['args']['rounds']} interleaved round(s); the table keeps "
         "each measurement's fastest round (all rounds are in the .json). Warm-up excluded everywhere.", "",
         f"Command: `{res['command']}`", "", environment_md(res["env"]).rstrip(),
         f"- dtypes: hybridlm float32 and bfloat16 weights (SSM state fp32); transformers float32"
         f"{' and bfloat16' if ('transformers', 'bfloat16') in best else ''}; llama.cpp bf16 GGUF",
         f"- kernels that ran in the hybridlm children: {res['hybrid_kernels']}",
         f"- busy machine? {busy_note(res)}",
         "- load average (1 min) around each job: " + ", ".join(
             f"{j['name']} {j['load'][0]:.1f}->{j['load'][1]:.1f}" for j in res["jobs"] if j.get("load")), ""]
    if res.get("llama"):
        info = res["llama"].get("info", {})
        L += [f"- llama.cpp: {res['llama_source']} (build {info.get('build_commit')}), "
              f"backends {info.get('backends')}, `{res['llama'].get('command', '')}`", ""]
    for note in res["notes"]:
        L.append(f"- {note}")
    L += ["", "## Tokens per second", "",
          "| measurement | " + " | ".join(f"{s} {d}" for s, d in systems) + " | hybridlm best / transformers best "
          "| hybridlm best / llama.cpp |", "|---|" + "---:|" * (len(systems) + 2)]
    for k in keys:
        cells = []
        for s in systems:
            row = best[s].get(k)
            cell = fmt_rate(row["tok_s"]) if row else "-"
            if row and row.get("logits", "all") != "all":
                cell += "*"
            cells.append(cell)
        h, _ = best_of("hybridlm", k)
        t, _ = best_of("transformers", k)
        lc, _ = best_of("llama.cpp", k)
        r_t = f"{h / t:.2f}x" if h and t else "-"
        r_l = f"{h / lc:.2f}x" if h and lc else "-"
        L.append(f"| {label(k)} | " + " | ".join(cells) + f" | {r_t} | {r_l} |")
    L += ["", "Full forward = all logits (`model(ids)`); prompt processing = the cache filled, last logits only "
          "(hybridlm: `generate.prefill`; transformers: `use_cache=True, logits_to_keep=1`; llama.cpp: llama-bench "
          f"pp); decode = one token per step after a {res['args']['decode_prompt']}-token prompt (llama.cpp: tg, "
          "from an empty context). * = hidden states of every position with the head on the last one "
          "(the full logits would exceed the logits budget).", ""]
    L += ["## Targets (issue 4; best dtype of each system)", "", "| target | measured | met |", "|---|---:|:---:|"]
    dec = ("decode", res["args"]["decode_steps"])
    targets = [("full-forward prefill 2K >= 10x transformers", ("full_forward", 2048), "transformers", 10),
               ("decode >= 4x transformers", dec, "transformers", 4),
               ("prompt processing 512 >= llama.cpp", ("prompt", 512), "llama.cpp", 1),
               ("prompt processing 2K >= llama.cpp", ("prompt", 2048), "llama.cpp", 1),
               ("decode >= llama.cpp", dec, "llama.cpp", 1)]
    for name, k, peer, goal in targets:
        h, hd = best_of("hybridlm", k)
        p, pd = best_of(peer, k)
        if h and p:
            L.append(f"| {name} | {h / p:.2f}x (hybridlm {hd} {h:,.0f} vs {peer} {pd} {p:,.0f} tok/s) | "
                     f"{'yes' if h / p >= goal else 'no'} |")
        else:
            L.append(f"| {name} | not measured | - |")
    L += ["", "## Peak memory (resident set of the system's process during the measurement)", "",
          "| measurement | " + " | ".join(f"{s} {d}" for s, d in systems if s != "llama.cpp") + " |",
          "|---|" + "---:|" * len([s for s in systems if s[0] != "llama.cpp"])]
    for k in keys:
        cells = [fmt_bytes(best[s][k]["peak_rss"]) if k in best[s] else "-" for s in systems if s[0] != "llama.cpp"]
        L.append(f"| {label(k)} | " + " | ".join(cells) + " |")
    if res.get("context"):
        c = res["context"]
        info = c["models"]
        L += ["", f"## Hybrid vs pure transformer of equal parameter count ({res['args']['context_dtype']})", "",
              "| model | layout | intermediate size | RoPE | total params | active params |",
              "|---|---|---:|---|---:|---:|"]
        for k, v in info.items():
            L.append(f"| {k} | `{v['layout']}` | {v['intermediate_size']} | {v['rope_theta'] or 'none'} | "
                     f"{v['total'] / 1e6:.2f}M | {v['active'] / 1e6:.2f}M |")
        L += ["", f"Prompt processing: N tokens through the engine's chunked prefill (chunks of {c['rows'][0]['chunk']}"
              f"); decode: {c['rows'][0]['decode_steps']} steps at context N right after it.", "",
              "| context | hybrid prompt tok/s | transformer prompt tok/s | ratio | hybrid decode tok/s | "
              "transformer decode tok/s | ratio | hybrid cache | transformer cache |", "|---:|" + "---:|" * 8]
        by = {}
        for r in c["rows"]:
            by.setdefault(r["context"], {})[r["model"]] = r
        for n in sorted(by):
            h, t = by[n]["hybrid"], by[n]["transformer"]
            L.append(f"| {n:,} | {fmt_rate(h['pp_tok_s'])} | {fmt_rate(t['pp_tok_s'])} | "
                     f"{h['pp_tok_s'] / t['pp_tok_s']:.2f}x | {fmt_rate(h['decode_tok_s'])} | "
                     f"{fmt_rate(t['decode_tok_s'])} | {h['decode_tok_s'] / t['decode_tok_s']:.2f}x | "
                     f"{fmt_bytes(h['cache_bytes']['total'])} | {fmt_bytes(t['cache_bytes']['total'])} |")
        L.append("")
        for what, x in (("prompt processing", c["pp_crossover"]), ("decode", c["decode_crossover"])):
            if x["wins_from"] is None:
                L.append(f"- {what}: the hybrid is not faster at every context from some point on within the measured "
                         f"range (ratios {', '.join(f'{r:.2f}' for r in x['ratio'])}).")
            elif x["estimate"] is None:
                L.append(f"- {what}: the hybrid is faster at every measured context, from {x['wins_from']:,} on.")
            else:
                L.append(f"- {what}: the hybrid is faster from {x['wins_from']:,} tokens on (measured); the speed "
                         f"ratio crosses 1 near {x['estimate']:,} tokens (log-linear interpolation).")
        L += ["", "The cache columns above are `Cache.nbytes()` of the caches measured (N + decode steps positions). "
              "Cache bytes per context from the memory plan:", "",
              "| context | hybrid | pure transformer | transformer / hybrid |", "|---:|---:|---:|---:|"]
        for row in res["cache_plan"]:
            L.append(f"| {row['context']:,} | {fmt_bytes(row['hybrid'])} | {fmt_bytes(row['transformer'])} | "
                     f"{row['transformer'] / row['hybrid']:.1f}x |")
    L += ["", "Plots: " + ", ".join(f"`{p}`" for p in res["plots"]), ""]
    out.with_suffix(".md").write_text("\n".join(L) + "\n")


def _tokens_fmt():
    from matplotlib.ticker import FuncFormatter
    return FuncFormatter(lambda x, _: f"{x / 1024:g}K" if x >= 1024 else f"{x:g}")


def _context_axes(ax, xlabel: str, ylabel: str, title: str):
    """Log-log axes over a context length in tokens (1K, 2K, ...)."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(_tokens_fmt())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)


def _save(fig, out: Path, suffix: str) -> str:
    """Write the figure beside the report as <name><suffix>.png; returns the file name."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    p = out.with_name(out.name + suffix + ".png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p.name


def plot(res: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    files = []
    best = res["best"]
    # 1. the systems side by side
    keys = [("full_forward", 2048), ("prompt", 512), ("prompt", 2048), ("decode", res["args"]["decode_steps"])]
    keys = [k for k in keys if any(k in v for v in best.values())]
    systems = [s for s in [("hybridlm", "float32"), ("hybridlm", "bfloat16"), ("transformers", "float32"),
                           ("transformers", "bfloat16"), ("llama.cpp", "bfloat16")] if s in best]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    w = 0.8 / max(1, len(systems))
    for i, s in enumerate(systems):
        vals = [best[s][k]["tok_s"] if k in best[s] else 0 for k in keys]
        bars = ax.bar([j + i * w for j in range(len(keys))], vals, w, label=f"{s[0]} {s[1]}")
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "" for v in vals], fontsize=7, rotation=90, padding=2)
    ax.set_xticks([j + w * (len(systems) - 1) / 2 for j in range(len(keys))])
    ax.set_xticklabels(["full forward 2K" if k[0] == "full_forward" else
                        (f"prompt {k[1]}" if k[0] == "prompt" else "decode") for k in keys])
    ax.set_yscale("log")
    ax.set_ylabel("tokens / s (log)")
    ax.set_title(f"bench-88m on {res['env']['cpu']}, {res['env']['threads']} threads")
    ax.legend(fontsize=8)
    ax.margins(y=0.25)
    files.append(_save(fig, out, "_systems"))
    if res.get("context"):
        rows = res["context"]["rows"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, field, title in ((axes[0], "pp_tok_s", "prompt processing (prefill N tokens)"),
                                 (axes[1], "decode_tok_s", "decode at context N")):
            for name, style in (("hybrid", "o-"), ("transformer", "s--")):
                pts = sorted((r["context"], r[field]) for r in rows if r["model"] == name)
                ax.plot([x for x, _ in pts], [y for _, y in pts], style,
                        label="hybrid bench-88m" if name == "hybrid" else "pure transformer, equal params")
            _context_axes(ax, "context N (tokens)", "tokens / s (log)", title)
            ax.grid(alpha=0.3)
        fig.suptitle(f"hybrid vs pure transformer, {res['args']['context_dtype']}, {res['env']['threads']} threads")
        files.append(_save(fig, out, "_context"))
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        plan = res["cache_plan"]
        for name, style in (("hybrid", "o-"), ("transformer", "s--")):
            ax.plot([r["context"] for r in plan], [r[name] / 2**20 for r in plan], style,
                    label="hybrid bench-88m" if name == "hybrid" else "pure transformer, equal params")
        _context_axes(ax, "context (tokens)", f"inference cache (MiB, {res['args']['context_dtype']})",
                      "cache bytes vs context (KV + conv + SSM state)")
        ax.grid(alpha=0.3, which="both")
        files.append(_save(fig, out, "_cache"))
    return files


# ---- the run -------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Run from the repository root. Time: about 15-30 minutes on 2 cores with "
                                        "the defaults, most of it the pure transformer's long-context prefill.")
    ap.add_argument("--checkpoint", type=Path, default=CACHE / "bench-88m",
                    help="bench-88m checkpoint directory; made (transformers, seed 0) when missing")
    ap.add_argument("--llama-cpp", type=Path, default=Path(os.environ.get("HYBRIDLM_LLAMA_CPP", CACHE / "llama.cpp")),
                    help="llama.cpp build directory of benchmarks/build_llama_cpp.sh")
    ap.add_argument("--build-llama-cpp", action="store_true", help="build llama.cpp first if it is missing")
    ap.add_argument("--no-llama-cpp", action="store_true", help="run without llama.cpp (reported as not run)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of the system comparison")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768], help="hybridlm full-forward lengths")
    ap.add_argument("--hf-lengths", type=int, nargs="*", default=[2048, 8192],
                    help="transformers full-forward lengths (its slow scan materialises [d_in, l, n] tensors)")
    ap.add_argument("--no-hf-bf16", action="store_true", help="skip transformers in bfloat16")
    ap.add_argument("--pp-lengths", type=int, nargs="+", default=[512, 2048], help="prompt-processing lengths")
    ap.add_argument("--decode-prompt", type=int, default=16)
    ap.add_argument("--decode-steps", type=int, default=128)
    ap.add_argument("--logits-budget", default="4GiB", help="largest full-logits tensor hybridlm materialises")
    ap.add_argument("--contexts", type=int, nargs="*", default=[1024, 4096, 16384, 32768, 65536],
                    help="hybrid vs pure transformer context lengths (none: skip that part)")
    ap.add_argument("--context-steps", type=int, default=32, help="decode steps timed at each context")
    ap.add_argument("--context-dtype", default="bfloat16")
    ap.add_argument("--llama-reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cpu_bench")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:
        import torch
        torch.set_num_threads(a.threads)
        spec = json.loads(a.child)
        print(json.dumps(CHILDREN[spec["system"]](spec)))
        return

    import torch
    torch.set_num_threads(a.threads)
    from hybridlm.bench import environment, parse_bytes
    from hybridlm.config import preset
    from hybridlm.summary import memory_plan

    paths = llama_cpp_paths(a.llama_cpp)
    if not a.no_llama_cpp and not paths["bench"].exists():
        if a.build_llama_cpp:
            subprocess.run(["bash", str(REPO / "benchmarks" / "build_llama_cpp.sh"), str(a.llama_cpp)], check=True)
        else:
            sys.exit(f"llama.cpp is not built at {a.llama_cpp} (no {paths['bench']}).\n"
                     f"Build it (CPU, Release, from the llama-cpp-python sdist's vendor/llama.cpp; ~15 min on 2 "
                     f"cores):\n"
                     f"    bash benchmarks/build_llama_cpp.sh {a.llama_cpp}\n"
                     f"or rerun with --build-llama-cpp, or with --no-llama-cpp to leave llama.cpp out of the results.")
    if not a.checkpoint.exists():
        print(f"making the bench-88m checkpoint in {a.checkpoint} (transformers, seed 0)", file=sys.stderr)
        make_checkpoint(a.checkpoint)
    gguf = None if a.no_llama_cpp else make_gguf(a.checkpoint, paths)

    env = environment()
    notes = []
    budget = parse_bytes(a.logits_budget)
    base = {"checkpoint": str(a.checkpoint), "pp_lengths": a.pp_lengths, "decode_prompt": a.decode_prompt,
            "decode_steps": a.decode_steps}
    specs = [{**base, "system": "hybridlm", "dtype": d, "lengths": a.lengths, "logits_budget": budget}
             for d in ("float32", "bfloat16")]
    hf_dtypes = ["float32"] + ([] if a.no_hf_bf16 else ["bfloat16"])
    specs += [{**base, "system": "transformers", "dtype": d, "lengths": a.hf_lengths} for d in hf_dtypes]
    skipped = [n for n in a.lengths if n not in a.hf_lengths]
    if skipped:
        notes.append(f"transformers full forward skipped at {', '.join(f'{n:,}' for n in skipped)} tokens: its "
                     f"PyTorch selective scan materialises several [d_in, l, d_state] fp32 tensors (2 GiB each at 32K) "
                     f"besides the 4 GiB of logits, and loops over tokens in Python (pass --hf-lengths to try).")
    if a.no_hf_bf16:
        notes.append("transformers bfloat16 not run (--no-hf-bf16).")
    if a.no_llama_cpp:
        notes.append("llama.cpp not run (--no-llama-cpp).")
    fp32_logits = max(a.lengths) * preset("bench-88m").vocab_size * 4
    if fp32_logits > budget:
        notes.append(f"hybridlm full forward above {budget // (preset('bench-88m').vocab_size * 4):,} fp32 tokens: "
                     f"full logits exceed --logits-budget {a.logits_budget}, so the hidden states of every position "
                     f"and the head on the last one were timed (marked *).")

    runs, jobs = [], []
    llama = None
    for rnd in range(a.rounds):
        for spec in specs:
            print(f"round {rnd + 1}/{a.rounds}: {spec['system']} {spec['dtype']}", file=sys.stderr, flush=True)
            r = run_child(spec, a.threads)
            if "error" in r:
                notes.append(f"{spec['system']} {spec['dtype']} failed in round {rnd + 1}: {r['error']}")
            runs.append(r)
            load = [r["load_before"][0], r["load_after"][0]] if "load_before" in r else None
            jobs.append({"name": f"{spec['system']} {spec['dtype']} r{rnd + 1}", "load": load})
        if gguf is not None:
            print(f"round {rnd + 1}/{a.rounds}: llama.cpp", file=sys.stderr, flush=True)
            lr = run_llama_bench(paths, gguf, a.threads, a.pp_lengths, a.decode_steps, a.llama_reps)
            if "error" in lr:
                notes.append(f"llama.cpp failed in round {rnd + 1}: {lr['error']}")
            else:
                llama = llama or lr
                runs.append({**lr, "spec": {"system": "llama.cpp", "dtype": "bfloat16"}})
                jobs.append({"name": f"llama.cpp r{rnd + 1}", "load": [lr["load_before"][0], lr["load_after"][0]]})
    best = merge_best(runs)

    context = None
    cache_plan = []
    if a.contexts:
        print("hybrid vs pure transformer at growing context", file=sys.stderr, flush=True)
        spec = {"system": "context", "dtype": a.context_dtype, "contexts": a.contexts, "steps": a.context_steps}
        context = run_child(spec, a.threads)
        if "error" in context:
            notes.append(f"context sweep failed: {context['error']}")
            context = None
        else:
            context["pp_crossover"] = crossover(context["rows"], "pp_tok_s")
            context["decode_crossover"] = crossover(context["rows"], "decode_tok_s")
            jobs.append({"name": "context sweep", "load": [context["load_before"][0], context["load_after"][0]]})
    hybrid_kernels = next((r["env"]["kernels"] for r in runs if r.get("spec", {}).get("system") == "hybridlm"
                           and "env" in r), env["kernels"])
    if a.contexts:
        hyb, tw = preset("bench-88m"), equal_params_transformer(preset("bench-88m"))
        for n in sorted(set(a.contexts) | {2 ** k for k in range(10, 19)}):
            cache_plan.append({"context": n, **{name: (lambda p: p.kv + p.conv + p.ssm)(
                memory_plan(c, n, cache_dtype=a.context_dtype, weight_dtype=a.context_dtype))
                for name, c in (("hybrid", hyb), ("transformer", tw))}})

    res = {"command": "python " + " ".join([os.path.relpath(__file__, REPO)] + sys.argv[1:]), "env": env,
           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items() if k != "child"},
           "notes": notes, "runs": runs, "jobs": jobs, "llama": llama, "context": context, "cache_plan": cache_plan,
           "hybrid_kernels": ", ".join(f"{k}: {v}" for k, v in hybrid_kernels.items() if k != "backend"),
           "llama_source": (a.llama_cpp / "SOURCE").read_text().strip() if (a.llama_cpp / "SOURCE").exists() else "",
           "end_load_average": _loadavg()}
    res["best"] = best
    a.out.parent.mkdir(parents=True, exist_ok=True)
    res["plots"] = plot(res, a.out)
    write_report(res, a.out)
    res["best"] = {f"{s} {d}": {f"{m} {n}": row for (m, n), row in v.items()} for (s, d), v in best.items()}
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    print(a.out.with_suffix(".md").read_text())
    print(f"wrote {a.out.with_suffix('.md')}, .json and {', '.join(res['plots'])}", file=sys.stderr)


if __name__ == "__main__":
    main()
