"""Speed and memory measurements: the ``hybridlm bench`` command and the helpers ``benchmarks/`` scripts
share (the machine description every result carries, peak memory, the timed loops).

What is measured, split as gpt-fast splits generation; warm-up is always excluded:

    full forward       ``model(ids)``: logits at every position, the work of scoring or training
    prompt processing  the engine's chunked ``prefill`` into a cache; logits of the last token only
    decode             the engine's ``decode_step`` loop, one greedy token at a time, after a prompt

plus the peak resident memory of each measurement and the inference cache's bytes at each context.
"""
from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import torch

# ---- the machine -------------------------------------------------------------------------------


def git_commit() -> str:
    """Short commit of the working tree, with '+dirty' when it has uncommitted changes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


_ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
              "amx_bf16", "amx_int8", "asimd", "sve", "bf16", "i8mm")


def cpu_flags() -> list[str]:
    """The vector-ISA flags of this CPU that the kernels (and llama.cpp's) dispatch on."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next(line for line in f if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return []
    have = set(line.split(":", 1)[1].split())
    return [f for f in _ISA_FLAGS if f in have]


def load_average() -> tuple[float, float, float] | None:
    """1/5/15-minute load: recorded beside timings so a busy machine shows in the results."""
    try:
        return os.getloadavg()
    except OSError:
        return None


def environment() -> dict:
    """Machine, torch version, threads, commit and kernel paths: printed with every result."""
    from . import kernels
    return {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": sys.version.split()[0], "commit": git_commit(), "kernels": kernels.report(),
            "load_average": load_average()}


def environment_md(env: dict) -> str:
    k = env["kernels"]
    kern = ", ".join(f"{op}: {how}" for op, how in k.items() if op != "backend")
    load = env.get("load_average")
    busy = f"- load average at start (1/5/15 min): {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}\n" if load else ""
    return (f"- machine: {env['cpu']} ({' '.join(env.get('cpu_flags', [])) or 'flags unknown'}), {env['cores']} cores, "
            f"{env['threads']} torch threads\n"
            f"- torch {env['torch']}, Python {env['python']}, hybridlm commit {env['commit']}\n"
            f"- kernels: {kern}\n" + busy)


# ---- memory ------------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far. Linux's VmHWM belongs to the address space, so a
    child started by a large parent does not inherit the parent's peak (getrusage's ru_maxrss survives
    exec and would)."""
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident memory of the process during a block.

    Linux resets the high-water mark (VmHWM) to the current RSS when "5" is written to
    /proc/self/clear_refs, so each measurement gets its own peak, and ``bytes - start`` is the block's
    growth. Where that is not possible the lifetime peak is reported and ``exact`` is False.
    """

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            start = _status_kib("VmHWM")
            self.exact = start is not None
        except OSError:
            self.exact, start = False, None
        self.bytes, self.start = 0, (start or 0) * 1024
        return self

    def __exit__(self, *exc):
        hwm = _status_kib("VmHWM") if self.exact else None
        self.bytes = hwm * 1024 if hwm is not None else peak_rss_bytes()
        return False


# ---- timed loops -------------------------------------------------------------------------------


def random_ids(vocab: int, n: int, seed: int = 0) -> torch.Tensor:
    """[1, n] token ids; speed does not depend on which tokens they are."""
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """Fastest of ``repeats`` runs, in seconds: on a shared machine the minimum is the least disturbed."""
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def parse_bytes(text: str) -> int:
    from .summary import parse_bytes as parse
    return parse(text)


def _weight_bytes(model) -> int:
    return next(model.parameters()).element_size()


@torch.no_grad()
def warmup(model, tokens: int = 64, steps: int = 4):
    """One short forward, prefill and a few decode steps: kernel builds, allocator and oneDNN primitive
    caches are filled before anything is timed."""
    from .generate import decode_step, prefill
    ids = random_ids(model.config.vocab_size, tokens, seed=1)
    model(ids)
    cache = model.new_cache(1, tokens + steps)
    logits = prefill(model, cache, ids)
    for _ in range(steps):
        logits = decode_step(model, cache, greedy(logits))


def greedy(logits):
    """The next token as generate's greedy sampling picks it: argmax over fp32 logits (transformers'
    generate casts to fp32 too; torch's bf16 argmax over 32K logits costs ~3x the cast + fp32 argmax)."""
    return logits.float().argmax(-1)


# The first call at a new shape pays one-time costs (oneDNN primitives, allocator growth): up to this
# many tokens a measurement is preceded by an untimed call of the same shape; longer ones amortise them.
WARM_SAME_SHAPE_UP_TO = 8192


def forward_logits(model, ids: torch.Tensor, all_logits: bool = True) -> torch.Tensor:
    """What ``full_forward`` measures: the logits of every position, or the hidden states of every position
    and the logits of the last only. Through ``model.logits``, so Granite's logits_scaling is applied as
    the model applies it."""
    if all_logits:
        return model(ids)
    h, _ = model.hidden(ids)
    return model.logits(h[:, -1:])


@torch.no_grad()
def full_forward(model, n: int, logits_budget: int = 4 << 30, repeats: int = 1) -> dict:
    """``model(ids)`` on n tokens, no cache. When the [n, vocab] logits would exceed ``logits_budget``
    bytes, the hidden states of all n positions are computed and the head is applied to the last one
    only; the row's ``logits`` field says which was measured."""
    ids = random_ids(model.config.vocab_size, n)
    all_logits = n * model.config.vocab_size * _weight_bytes(model) <= logits_budget

    def run():
        return forward_logits(model, ids, all_logits)

    with PeakRSS() as mem:
        if n <= WARM_SAME_SHAPE_UP_TO:
            run()
        s = best_time(run, repeats)
    return {"metric": "full_forward", "tokens": n, "seconds": s, "tok_s": n / s, "peak_rss": mem.bytes,
            "logits": "all" if all_logits else "last (hidden states of all; full logits over budget)"}


@torch.no_grad()
def prompt_and_decode(model, prompt: int, steps: int, chunk: int | None = None, repeats: int = 1,
                      warmup_steps: int = 2) -> dict:
    """Prefill ``prompt`` tokens with the engine (timed: prompt processing), then ``steps`` greedy
    decode steps at that context (timed after ``warmup_steps`` untimed ones). Best of ``repeats``."""
    from .generate import DEFAULT_PREFILL_CHUNK, decode_step, prefill
    chunk = chunk or DEFAULT_PREFILL_CHUNK
    ids = random_ids(model.config.vocab_size, prompt)
    best_pp = best_dec = float("inf")
    with PeakRSS() as mem:
        if prompt <= WARM_SAME_SHAPE_UP_TO:
            prefill(model, model.new_cache(1, prompt), ids, chunk=chunk)
        for _ in range(max(1, repeats)):
            cache = model.new_cache(1, prompt + warmup_steps + steps)
            t0 = time.perf_counter()
            logits = prefill(model, cache, ids, chunk=chunk)
            best_pp = min(best_pp, time.perf_counter() - t0)
            for _ in range(warmup_steps):
                logits = decode_step(model, cache, greedy(logits))
            t0 = time.perf_counter()
            for _ in range(steps):
                logits = decode_step(model, cache, greedy(logits))
            best_dec = min(best_dec, time.perf_counter() - t0) if steps else 0.0
            cache_bytes = cache.nbytes()
            del cache
    return {"prompt": prompt, "chunk": chunk, "pp_seconds": best_pp, "pp_tok_s": prompt / best_pp,
            "decode_steps": steps, "decode_seconds": best_dec, "decode_tok_s": steps / best_dec if steps else 0.0,
            "peak_rss": mem.bytes, "cache_bytes": cache_bytes}


def cache_table(cfg, contexts: list[int], dtypes: list[str]) -> list[dict]:
    """Inference-cache bytes per context and cache dtype, from the memory plan (no allocation)."""
    from .summary import memory_plan
    rows = []
    for dt in dtypes:
        for n in contexts:
            p = memory_plan(cfg, n, cache_dtype=dt, weight_dtype=dt)
            rows.append({"dtype": dt, "context": n, "kv": p.kv, "conv": p.conv, "ssm": p.ssm,
                         "total": p.kv + p.conv + p.ssm})
    return rows


# ---- the command -------------------------------------------------------------------------------


def bench(model: str, lengths: list[int] = (2048, 8192, 32768), prompt: int = 2048,
          decode_prompt: int = 128, decode_tokens: int = 64, dtypes: list[str] = ("float32", "bfloat16"),
          threads: int = 0, repeats: int = 1, logits_budget: str = "4GiB", out: str = "", quantize: str = "") -> dict:
    """Measure a model's speed on this machine: full-forward prefill, prompt processing and decode
    tokens per second, peak memory, and cache bytes per context, for each dtype.

    Full forward is ``model(ids)`` returning the logits of every position; when those logits would not
    fit ``logits_budget`` the hidden states of every position and the head on the last one are timed
    instead (the table says so). Prompt processing is the engine's chunked prefill (last logits only);
    decode is the engine's one-token step after a prompt of ``decode_prompt`` tokens. Each dtype is
    warmed up before anything is timed, and measurements of up to 8K tokens are preceded by an untimed
    call of the same shape. Ratios are against the first dtype.

    Args:
        model: checkpoint directory or preset name (presets get random weights, seed 0)
        lengths: full-forward prefill lengths in tokens
        prompt: prompt-processing length in tokens
        decode_prompt: prompt length before the timed decode steps
        decode_tokens: decode steps timed
        dtypes: weight dtypes to measure (float32, bfloat16)
        threads: torch threads (0: torch's default)
        repeats: runs per measurement; the fastest is kept
        logits_budget: largest full-logits tensor to materialise, such as 4GiB
        out: also write OUT.json and OUT.md
        quantize: quantize the weights while loading: int8, int4, or a spec such as int4:g32 (empty: off)

    Examples:
        hybridlm bench bench-88m
        hybridlm bench bench-88m --lengths 2048 --dtypes bfloat16
        hybridlm bench ./my-checkpoint --threads 2 --out results/bench
    """
    from .checkpoint import load_model, parse_dtype
    from .cli import set_threads
    set_threads(threads)
    lengths = [int(n) for n in lengths]
    dtypes = [str(d) for d in dtypes]
    for d in dtypes:
        if parse_dtype(d) is None:
            raise ValueError(f"give explicit dtypes (float32, bfloat16), not {d!r}")
    budget = parse_bytes(logits_budget)
    env = environment()
    results: dict = {"env": env, "model": model, "rows": [], "argv": sys.argv, "quantize": quantize or None}
    cfg = None
    for d in dtypes:
        m = load_model(model, dtype=parse_dtype(d), quantize=quantize)
        cfg = m.config
        results.setdefault("params", {"total": m.num_params(), "active": m.num_params(active=True)})
        warmup(m)
        for n in lengths:
            r = full_forward(m, n, budget, repeats)
            results["rows"].append({"dtype": d, **r})
            _progress(d, f"full forward {n:,}", r["tok_s"])
        r = prompt_and_decode(m, prompt, 0, repeats=repeats)
        results["rows"].append({"dtype": d, "metric": "prompt", "tokens": prompt, "seconds": r["pp_seconds"],
                                "tok_s": r["pp_tok_s"], "peak_rss": r["peak_rss"]})
        _progress(d, f"prompt {prompt:,}", r["pp_tok_s"])
        r = prompt_and_decode(m, decode_prompt, decode_tokens, repeats=repeats)
        results["rows"].append({"dtype": d, "metric": "decode", "tokens": decode_tokens, "context": decode_prompt,
                                "seconds": r["decode_seconds"], "tok_s": r["decode_tok_s"], "peak_rss": r["peak_rss"]})
        _progress(d, f"decode after {decode_prompt:,}", r["decode_tok_s"])
        del m
    contexts = sorted(set(lengths) | {prompt, decode_prompt})
    results["cache"] = cache_table(cfg, contexts, dtypes)
    results["end_load_average"] = load_average()
    text = format_table(results)
    print(text)
    if out:
        import json
        from pathlib import Path
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        p.with_suffix(".md").write_text(f"# hybridlm bench: {model}\n\n{environment_md(env)}\n```\n{text}\n```\n")
        print(f"wrote {p.with_suffix('.md')} and {p.with_suffix('.json')}")
    return results


def _progress(dtype: str, what: str, rate: float):
    print(f"  [{dtype}] {what}: {rate:,.1f} tok/s", file=sys.stderr, flush=True)


def format_table(results: dict) -> str:
    """The plain-text table ``bench`` prints: tok/s per dtype, ratio to the first dtype, peak RSS."""
    from .summary import fmt_bytes
    env = results["env"]
    rows: dict[tuple[str, int], dict] = {}           # (metric, tokens) -> {dtype: row}, in run order
    for r in results["rows"]:
        rows.setdefault((r["metric"], r["tokens"]), {})[r["dtype"]] = r
    dtypes = list(dict.fromkeys(r["dtype"] for r in results["rows"]))
    params = results.get("params", {})
    lines = [f"{results['model']}: {params.get('total', 0) / 1e6:.1f}M parameters "
             f"({params.get('active', 0) / 1e6:.1f}M active per token); {env['threads']} threads; "
             f"torch {env['torch']}; commit {env['commit']}",
             "kernels: " + ", ".join(f"{k}: {v}" for k, v in env["kernels"].items() if k != "backend")]
    head = f"{'measurement':34s}" + "".join(f"{d + ' tok/s':>17s}" for d in dtypes)
    head += "".join(f"{d[:4] + '/' + dtypes[0][:4]:>11s}" for d in dtypes[1:])
    head += "".join(f"{'peak RSS ' + d[:4]:>16s}" for d in dtypes)
    lines += ["", head, "-" * len(head)]
    names = {"full_forward": "full forward", "prompt": "prompt processing", "decode": "decode"}
    for (metric, tokens), by_dtype in rows.items():
        any_r = next(iter(by_dtype.values()))
        label = f"{names[metric]} {tokens:,}"
        if metric == "full_forward" and any_r["logits"] != "all":
            label += " (last logits*)"
        if metric == "decode":
            label = f"decode {tokens} steps at ctx {any_r['context']:,}"
        rates = [by_dtype.get(d, {}).get("tok_s") for d in dtypes]
        line = f"{label:34s}" + "".join(f"{r:17,.1f}" if r else f"{'-':>17s}" for r in rates)
        line += "".join(f"{r / rates[0]:10.2f}x" if r and rates[0] else f"{'-':>11s}" for r in rates[1:])
        line += "".join(f"{fmt_bytes(by_dtype[d]['peak_rss']):>16s}" if d in by_dtype else f"{'-':>16s}"
                        for d in dtypes)
        lines.append(line)
    if any(r.get("logits", "all") != "all" for r in results["rows"]):
        lines.append("* full logits [n, vocab] over --logits-budget: hidden states of every position, head on the "
                     "last one")
    cache = results.get("cache", [])
    if cache:
        lines += ["", f"{'inference cache at context':34s}" + "".join(f"{d + ' bytes':>17s}" for d in dtypes) +
                  "   (KV + conv + SSM state)"]
        for n in sorted({c["context"] for c in cache}):
            by = {c["dtype"]: c["total"] for c in cache if c["context"] == n}
            lines.append(f"{n:34,d}" + "".join(f"{fmt_bytes(by[d]):>17s}" for d in dtypes if d in by))
    return "\n".join(lines)
