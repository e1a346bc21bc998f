"""Issue 12's benchmark: the Jamba-Reasoning-3B shape (random weights) in bf16, int8 and int4, hybridlm
side by side with llama.cpp on the same weights, in one run.

    bash benchmarks/build_llama_cpp.sh          # once: llama.cpp (llama-bench, llama-quantize), outside the repo
    python benchmarks/quant_bench.py            # writes benchmarks/results/quant_bench.{md,json}

1. The checkpoint: ``write_random_checkpoint('jamba-reasoning-3b', seed 0, bf16)`` under
   ~/.cache/hybridlm/jamba-3b-bf16 (about 6 GB, written with bounded memory) with a synthetic 65,536-token
   tokenizer (llama.cpp's converter needs one); ``hybridlm quantize`` makes its int8 and int4 twins.
2. llama.cpp's own ``convert_hf_to_gguf.py`` turns it into a bf16 GGUF, and its ``llama-quantize`` into
   Q8_0, Q4_0 and Q4_K_M.
3. Each hybridlm type runs in a child process of its own (its peak RSS is its own): load time and RSS,
   prompt processing at each ``--pp`` length, decode tok/s after ``--decode-prompt`` tokens, and the
   effective bandwidth of decode (bytes of weights read per token / seconds per token). llama-bench
   measures the same prompt lengths and decode steps on the same type's GGUF right after.
4. The machine's limits measured in the same run: copy bandwidth (the decode bound) and torch's GEMM
   throughput at the model's shapes (the prompt-processing bound), each printed beside the model's figures;
   and ``hybridlm plan``'s memory figure against the measured peak RSS.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cpu_bench import CACHE, llama_cpp_paths, run_llama_bench, synthetic_tokenizer

REPO = Path(__file__).resolve().parent.parent
PRESET = "jamba-reasoning-3b"
TYPES = {"bf16": None, "int8": "int8", "int4": "int4:g32"}      # int4 in 32-column groups, as Q4_0
GGUF_TYPES = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0", "int4 (K)": "Q4_K_M"}


# ---- checkpoints ----------------------------------------------------------------------------------------
def make_checkpoint(path: Path) -> Path:
    from hybridlm.config import preset
    from hybridlm.random_checkpoint import write_random_checkpoint
    cfg = preset(PRESET)
    if not (path / "config.json").exists():
        t0 = time.perf_counter()
        write_random_checkpoint(PRESET, path, seed=0)
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if (path / "tokenizer.json").exists():
        return path
    synthetic_tokenizer(cfg.vocab_size).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "model_max_length": cfg.max_position_embeddings}, indent=2) + "\n")
    return path


def quantized(src: Path, spec: str) -> tuple[Path, dict]:
    """``hybridlm quantize`` into a sibling directory (once), timed with its peak RSS."""
    out = src.with_name(f"{src.name}-{spec.replace(':', '-')}")
    if (out / "config.json").exists():
        return out, {}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "hybridlm", "quantize", str(src), "--to", spec, "--out", str(out)],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"hybridlm quantize failed:\n{r.stderr[-3000:]}")
    return out, {"seconds": time.perf_counter() - t0, "output": r.stdout.strip()}


def gguf_files(ckpt: Path, paths: dict) -> dict[str, Path]:
    """bf16 GGUF by llama.cpp's converter, then its quantizer for the other types."""
    out = {}
    base = ckpt / "model-bf16.gguf"
    if not base.exists():
        r = subprocess.run([sys.executable, str(paths["convert"]), str(ckpt), "--outtype", "bf16", "--outfile",
                            str(base) + ".tmp"], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"GGUF conversion failed:\n{r.stderr[-3000:]}")
        os.replace(str(base) + ".tmp", base)
    for name, t in GGUF_TYPES.items():
        f = base if t == "BF16" else ckpt / f"model-{t}.gguf"
        if not f.exists():
            r = subprocess.run([str(paths["quantize"]), str(base), str(f) + ".tmp", t], capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"llama-quantize {t} failed:\n{r.stderr[-3000:]}")
            os.replace(str(f) + ".tmp", f)
        out[name] = f
    return out


# ---- one hybridlm type per child process ---------------------------------------------------------------
def child(spec: dict) -> dict:
    import torch

    from hybridlm import bench as B
    from hybridlm.kernels import decode_cpu
    from hybridlm.model import HybridLM
    t0 = time.perf_counter()
    model = HybridLM.from_pretrained(spec["checkpoint"], dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    rss_load = B.peak_rss_bytes()
    B.warmup(model, tokens=16, steps=2)
    rows = []
    for n in spec["pp"]:
        r = B.prompt_and_decode(model, n, 0, repeats=spec.get("pp_repeats", 1))
        rows.append({"metric": "prompt", "tokens": n, "tok_s": r["pp_tok_s"], "seconds": r["pp_seconds"]})
        _say(spec, f"prompt {n}", r["pp_tok_s"])
    r = B.prompt_and_decode(model, spec["decode_prompt"], spec["decode_tokens"])
    # bytes a decode step reads: every linear weight (with its scales) and the embedding row (negligible)
    linears = [m for n, m in model.named_modules() if hasattr(m, "weight_scale") or isinstance(m, torch.nn.Linear)]
    step_bytes = sum(t.numel() * t.element_size() for m in linears for t in decode_cpu.tensors_of(m))
    rows.append({"metric": "decode", "tokens": spec["decode_tokens"], "context": spec["decode_prompt"],
                 "tok_s": r["decode_tok_s"], "seconds": r["decode_seconds"], "step_bytes": step_bytes,
                 "gb_s": step_bytes * r["decode_tok_s"] / 1e9})
    _say(spec, "decode", r["decode_tok_s"])
    return {"rows": rows, "load_seconds": load_s, "rss_after_load": rss_load,
            "peak_rss": max(rss_load, B.peak_rss_bytes()),   # bench.PeakRSS resets the high-water mark
            "env": B.environment()}


def _say(spec: dict, what: str, rate: float):
    print(f"  [hybridlm {spec['type']}] {what}: {rate:,.2f} tok/s", file=sys.stderr, flush=True)


def run_child(spec: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec), "--threads", str(threads)],
                       stdout=subprocess.PIPE, text=True, env=env)
    if r.returncode:
        return {"error": f"exit code {r.returncode} (its stderr is above)"}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- the machine's limits --------------------------------------------------------------------------------
def gemm_roofline(threads: int, tokens: int) -> dict:
    """torch bf16 and fp32 GEMM throughput at the 3B shapes (x [tokens, k] @ W[o, k]^T), FLOP/s."""
    import torch
    from hybridlm.config import preset
    torch.set_num_threads(threads)
    c = preset(PRESET)
    d, di, f = c.hidden_size, c.d_inner, c.intermediate_size
    shapes = [(2 * di, d), (d, di), (f, d), (d, f)]
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        flops = secs = 0.0
        for o, k in shapes:
            x, w = torch.randn(tokens, k, dtype=dtype), torch.randn(o, k, dtype=dtype)
            torch.nn.functional.linear(x, w)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                torch.nn.functional.linear(x, w)
                best = min(best, time.perf_counter() - t0)
            flops += 2 * tokens * o * k
            secs += best
        out[str(dtype).removeprefix("torch.")] = flops / secs
    return out


def llama_bench_each(paths: dict, gguf: Path, a) -> dict:
    """llama-bench at every prompt length and the decode test in one run; when that run fails (a crash in
    one test loses them all), each test on its own, so the tests that work are still measured."""
    r = run_llama_bench(paths, gguf, a.threads, a.pp, a.decode_tokens, a.llama_reps)
    if "error" not in r:
        return r
    rows, errors, info = [], [], None
    for pp, tg in [(n, 0) for n in a.pp] + [(0, a.decode_tokens)]:
        one = run_llama_bench(paths, gguf, a.threads, [pp], tg, a.llama_reps)
        rows += one.get("rows", [])
        info = one.get("info", info)
        if "error" in one:
            errors.append({"metric": "prompt" if pp else "decode", "tokens": pp or tg,
                           "error": one["error"].splitlines()[0]})
    return {"rows": rows, "errors": errors, "info": info}


def _crashed(error: dict) -> bool:
    """Whether a llama_bench_each error is llama-bench dying of a segmentation fault (exit code -11)."""
    return "(-11)" in error["error"]


def plan_bytes(spec: str | None, context: int) -> int:
    from hybridlm.config import preset
    from hybridlm.summary import memory_plan
    return memory_plan(preset(PRESET), context, quantize=spec).total


# ---- the report ----------------------------------------------------------------------------------------
def write_report(res: dict, out: Path):
    from hybridlm.bench import environment_md
    from hybridlm.summary import fmt_bytes
    bw, roof = res["read_bandwidth"], res["gemm_flops"]
    best_gemm = max(roof.values())
    builds = list(res["llama_cpp"])
    lines = ["# Jamba-Reasoning-3B shape: bf16 / int8 / int4, hybridlm vs llama.cpp\n",
             f"`{res['command']}` ({res['wall_seconds'] / 60:.0f} min)\n",
             environment_md(res["env"])]
    for label in builds:
        info = res["llama_info"].get(label) or {}
        lines.append(f"- {label}: {res.get('llama_source', '?')} (build {info.get('build_commit', '?')}, "
                     f"{info.get('backends', '?')}) ({info.get('cpu_info', '?')}), {res['threads']} threads")
    lines += [f"- read bandwidth (a 1 GiB tensor summed, {res['threads']} threads): {bw / 1e9:.1f} GB/s; copy "
              f"(read + write): {res['copy_bandwidth'] / 1e9:.1f} GB/s",
              f"- torch GEMM at the model's shapes, {res['roofline_tokens']} rows: bf16 {roof['bfloat16'] / 1e9:.0f} "
              f"GFLOP/s, fp32 {roof['float32'] / 1e9:.0f} GFLOP/s\n"]
    head = ["type", "hybridlm", *builds, "ratio" if len(builds) < 2 else "ratio (vs the faster llama.cpp)"]

    def theirs(label, t, metric, tokens):
        got = res["llama_cpp"][label].get(t, {})
        row = next((r for r in got.get("rows", []) if r["metric"] == metric and r["tokens"] == tokens), None)
        err = next((e for e in got.get("errors", []) if e["metric"] == metric and e["tokens"] == tokens), None)
        return (row or {}).get("tok_s"), ("crashed" if _crashed(err) else "failed") if err else "–"

    for metric, tokens in [("prompt", n) for n in res["pp"]] + [("decode", res["decode_tokens"])]:
        what = f"prompt processing, {tokens:,} tokens (tok/s)" if metric == "prompt" else \
            f"decode after {res['decode_prompt']} tokens (tok/s)"
        lines += [f"\n## {what}\n", "| " + " | ".join(head + (["GB/s", "of read bw"] if metric == "decode" else
                                                                   ["GFLOP/s", "of best GEMM"])) + " |",
                  "|" + "---|" * (len(head) + 2)]
        for t in res["types"]:
            ours = next((r for r in res["hybridlm"].get(t, {}).get("rows", []) if r["metric"] == metric
                         and r["tokens"] == tokens), None)
            a = (ours or {}).get("tok_s")
            peers = [theirs(label, t, metric, tokens) for label in builds]
            b = max((v for v, _ in peers if v), default=None)
            ratio = f"{a / b:.2f}x" if a and b else "–"
            if metric == "decode" and ours:
                extra = [f"{ours['gb_s']:.1f}", f"{ours['gb_s'] * 1e9 / bw:.0%}"]
            elif ours:
                fl = 2 * res["params"] * a
                extra = [f"{fl / 1e9:.0f}", f"{fl / best_gemm:.0%}"]
            else:
                extra = ["–", "–"]
            cells = [f"{v:,.2f} ({GGUF_TYPES.get(t, '')})" if v else why for v, why in peers]
            lines.append(f"| {t} | {a or 0:,.2f} | " + " | ".join(cells + [ratio] + extra) + " |")
    lines += ["\n## Load and memory\n", "| type | load (s) | RSS after load | peak RSS | plan (weights + cache + runtime) |",
              "|---|---:|---:|---:|---:|"]
    for t in res["types"]:
        h = res["hybridlm"].get(t, {})
        if "load_seconds" in h and t in res["plan"]:
            lines.append(f"| {t} | {h['load_seconds']:.1f} | {fmt_bytes(h['rss_after_load'])} | "
                         f"{fmt_bytes(h['peak_rss'])} | {fmt_bytes(res['plan'][t])} "
                         f"({res['plan'][t] / h['peak_rss']:.0%} of peak) |")
    lines += ["\nPeak RSS is the whole process; the plan (`hybridlm plan`, summary.memory_plan) counts the weights, "
              "the cache and an estimate of the runtime: Python/torch (0.25 GiB) and one prefill chunk's "
              "working buffers."]
    if res.get("quantize_runs"):
        lines += ["\n## hybridlm quantize\n"] + [f"- {t}: {q.get('output', '').splitlines()[-1] if q else 'cached'}"
                                                 for t, q in res["quantize_runs"].items()]
    lines += ["\nThe decode bound is the read bandwidth: a decode step reads each weight (with its scales) once "
              "and writes almost nothing, so `of read bw` = bytes read per token x tok/s / read GB/s. "
              "Prompt-processing GFLOP/s count 2 x parameters per token (the Mamba scan and attention add "
              "a few percent more); `of best GEMM` is against the faster of torch's bf16 and fp32 GEMMs at the "
              "model's shapes (on CPUs without AVX512-BF16/AMX, fp32: hybridlm's prefill multiplies in fp32 there), "
              f"each GEMM the best of 3, hybridlm's prompt processing the best of {res.get('pp_repeats', 1)} "
              "(llama-bench: the mean of --llama-reps). llama-bench's decode (tg) starts from an empty context, ours after the prompt (2 attention layers "
              "over ~130 keys: negligible at this size). Each type's two systems ran back to back."]
    crashed = sorted({f"{label} {t}" for label in builds for t, r in res["llama_cpp"][label].items()
                      for e in r.get("errors", []) if _crashed(e)})
    if crashed:
        lines += [f"\n`crashed`: llama-bench died of a segmentation fault in that test ({', '.join(crashed)}); "
                  "that build's other tests ran each on its own. On Sapphire Rapids this is ggml's AMX matrix "
                  "product (gdb: ggml_backend_amx_mul_mat; reported upstream as ggml-org/llama.cpp#20824): "
                  "`NO_AMX=1 bash benchmarks/build_llama_cpp.sh DIR` builds llama.cpp without it."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=CACHE / "jamba-3b-bf16")
    ap.add_argument("--llama-cpp", type=Path, action="append",
                    help="a llama.cpp build (default ~/.cache/hybridlm/llama.cpp); repeat to measure several, e.g. "
                         "one built with NO_AMX=1 (benchmarks/build_llama_cpp.sh); the first converts the GGUFs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pp", type=lambda s: [int(x) for x in s.split(",")], default=[512, 4096])
    ap.add_argument("--decode-prompt", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--types", type=lambda s: s.split(","), default=list(TYPES))
    ap.add_argument("--llama-reps", type=int, default=2)
    ap.add_argument("--pp-repeats", type=int, default=3,
                    help="hybridlm prompt processing: best of this many runs (the GEMM roofline is best of 3)")
    ap.add_argument("--no-llama", action="store_true", help="hybridlm only")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quant_bench")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    from hybridlm.bench import environment
    from hybridlm.config import preset
    from hybridlm.kernels import build
    from quant_gemv import copy_bandwidth, read_bandwidth
    t0 = time.perf_counter()
    build.load()
    ckpt = make_checkpoint(a.checkpoint)
    res = {"command": " ".join(["python", "benchmarks/quant_bench.py", *sys.argv[1:]]), "threads": a.threads,
           "pp": a.pp, "pp_repeats": a.pp_repeats, "decode_prompt": a.decode_prompt, "decode_tokens": a.decode_tokens, "types": a.types,
           "env": environment(), "hybridlm": {}, "llama_cpp": {}, "llama_info": {}, "quantize_runs": {}, "plan": {}}
    from hybridlm.checkpoint import load_model
    res["params"] = load_model(PRESET, device="meta").num_params()
    res["copy_bandwidth"] = copy_bandwidth(a.threads)
    res["read_bandwidth"] = read_bandwidth(a.threads)
    res["roofline_tokens"] = 512
    res["gemm_flops"] = gemm_roofline(a.threads, 512)
    print(f"read {res['read_bandwidth'] / 1e9:.1f} GB/s, bf16 GEMM {res['gemm_flops']['bfloat16'] / 1e9:.0f} "
          f"GFLOP/s, fp32 {res['gemm_flops']['float32'] / 1e9:.0f}", file=sys.stderr)
    dirs = {}
    ggufs, builds = {}, {}
    if not a.no_llama:
        roots = a.llama_cpp or [Path(os.environ.get("HYBRIDLM_LLAMA_CPP", CACHE / "llama.cpp"))]
        builds = {root.name: llama_cpp_paths(root) for root in roots}      # the first converts and quantizes
        ggufs = gguf_files(ckpt, {**builds[roots[0].name], "quantize": roots[0] / "build" / "bin" / "llama-quantize"})
        src = roots[0] / "SOURCE"
        res["llama_source"] = src.read_text().strip() if src.exists() else None

    def llama(t: str):
        for label, p in builds.items():
            r = llama_bench_each(p, ggufs[t], a)
            res["llama_cpp"].setdefault(label, {})[t] = r
            res["llama_info"][label] = r.get("info", res["llama_info"].get(label))
            print(f"  [{label} {t}] {r.get('rows')} {r.get('errors') or ''}", file=sys.stderr, flush=True)

    # each type's two systems back to back: the host's speed drifts (up to 40% over 20 minutes here), so a
    # ratio compares runs minutes apart, not the two ends of the benchmark
    for t in a.types:
        if TYPES[t] is None:
            dirs[t] = ckpt
        else:
            dirs[t], res["quantize_runs"][t] = quantized(ckpt, TYPES[t])
        ctx = a.decode_prompt + a.decode_tokens + 2
        res["plan"][t] = plan_bytes(TYPES[t], max(ctx, max(a.pp)))
        res["hybridlm"][t] = run_child({"type": t, "checkpoint": str(dirs[t]), "pp": a.pp, "pp_repeats": a.pp_repeats,
                                        "decode_prompt": a.decode_prompt, "decode_tokens": a.decode_tokens},
                                       a.threads)
        if ggufs:
            llama(t)
    if ggufs and "int4" in a.types:
        llama("int4 (K)")
        res["types"] = [*a.types, "int4 (K)"]
        res["hybridlm"]["int4 (K)"] = res["hybridlm"]["int4"]
    res["wall_seconds"] = time.perf_counter() - t0
    res["preset"] = preset(PRESET).to_dict()
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")   # first: a report bug loses nothing
    write_report(res, a.out)
    print(a.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
