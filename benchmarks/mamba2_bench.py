"""Issue 15's Mamba-2 benchmark on a Granite-4.0-H-shaped model, in one run:

1. One Mamba-2 mixer (hidden 768, Granite's mixer ratios): prefill of 512 and 2048 tokens and one decode
   step, hybridlm's chunked SSD (``ssd_chunked``) vs its sequential reference (``ssd_scan_ref``) vs
   transformers' CPU path for the same layer (``GraniteMoeHybridMambaLayer``, whose mamba_ssm /
   causal_conv1d calls fall back to PyTorch without those packages), the same weights copied in; outputs
   compared before anything is timed; fp32 and bf16.
2. The whole model (~107M parameters, dense, attention at one layer in ten, no positional encoding, random
   weights) saved once in Granite's format and loaded by ``HybridLM.from_pretrained`` and transformers'
   ``GraniteMoeHybridForCausalLM.from_pretrained``: logits compared, then prompt processing at 512 and
   2048 tokens and greedy decode (64 tokens after a 128-token prompt), fp32 and bf16 each; the issue's
   targets (prefill >= 5x, decode >= 4x transformers) judged on each system's best dtype.
3. llama.cpp on the same weights: its own converter, then llama-bench pp512 / tg64 (or why not).
4. A long prompt (``--long``, 262,144 tokens) through ``hybridlm.generate`` in a child process of its own:
   peak RSS against ``hybridlm plan``'s figure for that model and context (target: within 1.5x).

    bash benchmarks/build_llama_cpp.sh          # once: llama.cpp, outside the repo
    python benchmarks/mamba2_bench.py           # writes benchmarks/results/mamba2.{md,json}
    python benchmarks/mamba2_bench.py --quick   # smoke test: short lengths, model and mixer at hidden 256

Checkpoints live under ~/.cache/hybridlm (made once, seed 0, by ``write_random_checkpoint``); nothing of
them, or of llama.cpp, lives in the repository. Run it on a quiet machine: every figure is tokens per
second at ``--threads`` threads, the best of ``--repeats`` runs after an untimed warm-up of the same shape.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")           # transformers is an oracle here; never fetch
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if "--quick" in sys.argv:
    # the smoke test runs on shared machines: libgomp's default spin-wait (~300,000 spins) there makes it
    # 3-4x slower (benchmarks/contention.py); a full run keeps the default, as the other benchmarks do. Set
    # before torch is imported, or libgomp has read it already.
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from cpu_bench import CACHE, llama_cpp_paths, run_llama_bench  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DTYPES = ("float32", "bfloat16")
SHORT = {"float32": "fp32", "bfloat16": "bf16"}
TARGETS = {"prompt": 5.0, "decode": 4.0}               # issue 15: hybridlm / transformers' CPU path


# ---- the model -----------------------------------------------------------------------------------------
def granite_config(quick: bool):
    """A dense Granite-4.0-H-shaped config (family granitemoehybrid). From the granite-4.0-h-tiny preset:
    Mamba-2 heads of 64 channels, expand 2, one B/C group, d_state 128, d_conv 4, chunk 256, 3:1 grouped
    query attention of head size 128, no positional encoding, attention at layer 5 of each 10, tied
    embeddings. Chosen here for ~100M parameters: hidden 768, 10 layers, a dense SwiGLU of 2048 (Granite's
    dense form: the shared MLP alone) and a 32,000-token vocabulary (Granite's 100,352 tokens would make
    the embedding three quarters of the model). ``quick``: the same layout at hidden 256, vocabulary 4096."""
    from hybridlm.config import HybridConfig
    d = 256 if quick else 768
    return HybridConfig(
        vocab_size=4096 if quick else 32000, hidden_size=d, intermediate_size=512 if quick else 2048,
        num_hidden_layers=10, layout="sssssassss", num_attention_heads=d // 128, num_key_value_heads=max(1, d // 384),
        head_dim=128, num_experts=1, num_experts_per_tok=1, mamba2_n_heads=2 * d // 64, mamba2_head_dim=64,
        mamba2_n_groups=1, mamba2_d_state=128, mamba_d_conv=4, mamba2_chunk_size=256, mamba_conv_bias=True,
        mamba_proj_bias=False, tie_word_embeddings=True, rope_theta=None, max_position_embeddings=262144,
        family="granitemoehybrid")


def layer_config(quick: bool):
    """The per-layer shape: the model's Mamba-2 mixer (hidden 768, 24 heads of 64, d_state 128; ``quick``:
    hidden 256, 8 heads)."""
    return granite_config(quick).replace(num_hidden_layers=1, layout="s")


def checkpoint(cfg, dtype_name: str) -> Path:
    """The model's random weights (seed 0) in Granite's format under ~/.cache/hybridlm, written once."""
    import torch

    from hybridlm.random_checkpoint import write_random_checkpoint
    tag = f"granite-h-d{cfg.hidden_size}-v{cfg.vocab_size}-{dtype_name}"
    path = CACHE / tag
    if not (path / "config.json").exists():
        tmp = path.with_name(tag + ".tmp")
        write_random_checkpoint(cfg, tmp, seed=0, dtype=getattr(torch, dtype_name))
        os.replace(tmp, path)
    return path


def hf_config(cfg):
    """transformers' GraniteMoeHybridConfig for ``cfg`` (the dict families.py writes as config.json)."""
    from transformers import GraniteMoeHybridConfig

    from hybridlm.families import config_to_family
    d = config_to_family(cfg)
    d.pop("architectures")
    d.pop("model_type")
    d["time_step_limit"] = tuple(cfg.mamba2_dt_limit)       # the JSON spelling of infinity is for files
    return GraniteMoeHybridConfig(**d)


def _say(what: str):
    print(f"  {what}", file=sys.stderr, flush=True)


def _maxdiff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---- 1. one mixer --------------------------------------------------------------------------------------
def _perturb_(module, seed: int):
    """Move the parameters that initialise to constants (A_log, D, dt_bias, norm, conv bias) off them, so the
    comparison would see a missing D skip or a wrong norm."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in ("A_log", "D", "dt_bias", "norm.weight", "conv1d.bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def layer_bench(cfg, lengths: list[int], ref_max: int, decode_prompt: int, decode_steps: int, repeats: int) -> dict:
    """Mixer-level prefill and decode tok/s, three implementations, both dtypes; agreement first."""
    import torch
    from transformers.cache_utils import DynamicCache
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMambaLayer

    from hybridlm import bench as B
    from hybridlm.cache import Mamba2State
    from hybridlm.mamba2 import Mamba2Mixer, ssd_scan_ref
    hcfg = hf_config(cfg)
    torch.manual_seed(0)
    ours0 = Mamba2Mixer(cfg).eval()
    _perturb_(ours0, 1)
    out = {"shape": {"hidden": cfg.hidden_size, "n_heads": cfg.mamba2_n_heads, "head_dim": cfg.mamba2_head_dim,
                     "n_groups": cfg.mamba2_n_groups, "d_state": cfg.mamba2_d_state, "d_conv": cfg.mamba_d_conv,
                     "chunk_size": cfg.mamba2_chunk_size, "params": sum(p.numel() for p in ours0.parameters())},
           "agreement": [], "rows": []}
    gen = torch.Generator().manual_seed(2)
    xs = {n: torch.randn(1, n, cfg.hidden_size, generator=gen) for n in sorted(set(lengths) | {ref_max})}
    steps_x = torch.randn(decode_steps + 2, 1, 1, cfg.hidden_size, generator=gen)
    prompt_x = torch.randn(1, decode_prompt, cfg.hidden_size, generator=gen)

    def our_state(dtype):
        return Mamba2State(conv=torch.zeros(1, cfg.mamba2_conv_dim, cfg.mamba_d_conv - 1, dtype=dtype),
                           ssm=torch.zeros(1, cfg.mamba2_n_heads, cfg.mamba2_head_dim, cfg.mamba2_d_state))

    def ref_scan(x, dt, A, B_, C, S0):
        return ssd_scan_ref(x, dt, A, B_, C, S0)

    for dname in DTYPES:
        dtype = getattr(torch, dname)
        ours = Mamba2Mixer(cfg).eval()
        ours.load_state_dict(ours0.state_dict())
        hf = GraniteMoeHybridMambaLayer(hcfg, 0).eval()
        hf.load_state_dict(ours0.state_dict())           # the same names: in_proj, conv1d, dt_bias, A_log, D, norm
        ours, hf = ours.to(dtype), hf.to(dtype)
        impls = {"hybridlm (ssd_chunked)": lambda x: ours(x),
                 "hybridlm (ssd_scan_ref)": lambda x: ours(x, scan=ref_scan),
                 "transformers (CPU path)": lambda x: hf(x)}
        with torch.no_grad():
            # agreement before timing: prefill at the shortest length, decode after the same prompt
            n0 = min(min(lengths), ref_max)
            x = xs[n0].to(dtype)
            y = ours(x)
            for name, got in (("transformers (CPU path)", hf(x)), ("hybridlm (ssd_scan_ref)", ours(x, scan=ref_scan))):
                out["agreement"].append({"dtype": dname, "what": f"prefill {n0}: ssd_chunked vs {name}",
                                         "max_abs_diff": _maxdiff(y, got), "scale": y.float().abs().max().item()})
            st, cache = our_state(dtype), DynamicCache(config=hcfg)
            ours(prompt_x.to(dtype), st)
            hf(prompt_x.to(dtype), cache=cache)
            d = max(_maxdiff(ours(s.to(dtype), st), hf(s.to(dtype), cache=cache)) for s in steps_x[:2])
            out["agreement"].append({"dtype": dname, "what": f"decode 2 steps after {decode_prompt}: hybridlm decode step vs "
                                     "transformers (CPU path)", "max_abs_diff": d})
            for a in out["agreement"][-3:]:
                _say(f"[{dname}] {a['what']}: max |diff| {a['max_abs_diff']:.2e}")
            # prefill
            for name, fn in impls.items():
                for n in lengths:
                    m = min(n, ref_max) if "scan_ref" in name else n
                    x = xs[m].to(dtype)
                    if m <= B.WARM_SAME_SHAPE_UP_TO:
                        fn(x)
                    s = B.best_time(lambda x=x, fn=fn: fn(x), repeats)
                    out["rows"].append({"dtype": dname, "impl": name, "metric": "prompt", "tokens": n,
                                        "measured_tokens": m, "seconds": s, "tok_s": m / s})
                    _say(f"[{dname}] layer {name} prefill {n}" + (f" (measured at {m})" if m != n else "") +
                         f": {m / s:,.0f} tok/s")
            # decode: one token against the state after the prompt (hybridlm: the fused C++ step; the reference
            # scan's decode is the same recurrence for one token, so it is not timed separately)
            decoders = {"hybridlm (decode step)": lambda s, st: ours(s, st),
                        "transformers (CPU path)": lambda s, c: hf(s, cache=c)}
            for name, fn in decoders.items():
                best = float("inf")
                for _ in range(max(1, repeats)):
                    state = our_state(dtype) if name.startswith("hybridlm") else DynamicCache(config=hcfg)
                    if name.startswith("hybridlm"):
                        ours(prompt_x.to(dtype), state)
                    else:
                        hf(prompt_x.to(dtype), cache=state)
                    for s in steps_x[:2]:
                        fn(s.to(dtype), state)                  # warm-up steps
                    steps = [s.to(dtype) for s in steps_x[2:]]
                    t0 = time.perf_counter()
                    for s in steps:
                        fn(s, state)
                    best = min(best, time.perf_counter() - t0)
                out["rows"].append({"dtype": dname, "impl": name, "metric": "decode", "tokens": decode_steps,
                                    "context": decode_prompt, "seconds": best, "tok_s": decode_steps / best})
                _say(f"[{dname}] layer {name} decode: {decode_steps / best:,.0f} tok/s")
    return out


# ---- 2. the whole model --------------------------------------------------------------------------------
def model_bench(ckpt: Path, pp: list[int], decode_prompt: int, decode_steps: int, repeats: int,
                check_tokens: int = 8, warm: tuple[int, int] = (64, 4)) -> dict:
    """hybridlm vs transformers on the saved checkpoint: logits, prompt processing, greedy decode."""
    import torch
    from transformers import GraniteMoeHybridForCausalLM

    from hybridlm import bench as B
    from hybridlm.model import HybridLM
    out = {"agreement": [], "rows": [], "greedy_equal": {}}
    for dname in DTYPES:
        dtype = getattr(torch, dname)
        ours = HybridLM.from_pretrained(ckpt, dtype=dtype).eval()
        theirs = GraniteMoeHybridForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
        out.setdefault("params", ours.num_params())
        vocab = ours.config.vocab_size
        with torch.no_grad():
            ids = B.random_ids(vocab, 64, seed=3)
            a, b = ours(ids), theirs(ids, use_cache=False).logits
            out["agreement"].append({"dtype": dname, "what": "logits, 64 tokens", "max_abs_diff": _maxdiff(a, b),
                                     "scale": b.float().abs().max().item()})
            _say(f"[{dname}] model logits max |diff| {out['agreement'][-1]['max_abs_diff']:.2e}")
        # hybridlm: the engine's chunked prefill (last logits) and decode_step loop
        B.warmup(ours, *warm)
        for n in pp:
            r = B.prompt_and_decode(ours, n, 0, repeats=repeats)
            out["rows"].append({"system": "hybridlm", "dtype": dname, "metric": "prompt", "tokens": n,
                                "seconds": r["pp_seconds"], "tok_s": r["pp_tok_s"]})
            _say(f"[hybridlm {dname}] prompt {n}: {r['pp_tok_s']:,.1f} tok/s")
        r = B.prompt_and_decode(ours, decode_prompt, decode_steps, repeats=repeats)
        out["rows"].append({"system": "hybridlm", "dtype": dname, "metric": "decode", "tokens": decode_steps,
                            "context": decode_prompt, "seconds": r["decode_seconds"], "tok_s": r["decode_tok_s"]})
        _say(f"[hybridlm {dname}] decode: {r['decode_tok_s']:,.1f} tok/s")
        # transformers: prefill fills its cache with the logits of the last token only; decode feeds the
        # greedy token back with the cache, as generate() does, without generate()'s bookkeeping
        ours_tokens = greedy_tokens_ours(ours, decode_prompt, check_tokens)
        del ours
        rows, hf_tokens = transformers_speed(theirs, pp, decode_prompt, decode_steps, repeats, check_tokens, warm)
        for row in rows:
            out["rows"].append({"system": "transformers", "dtype": dname, **row})
        out["greedy_equal"][dname] = ours_tokens == hf_tokens
        _say(f"[{dname}] greedy {check_tokens} tokens equal: {ours_tokens == hf_tokens}")
        del theirs
    out["check_tokens"] = check_tokens
    return out


def greedy_tokens_ours(model, prompt: int, n: int) -> list[int]:
    from hybridlm import bench as B
    from hybridlm.generate import decode_step, prefill
    cache = model.new_cache(1, prompt + n)
    logits = prefill(model, cache, B.random_ids(model.config.vocab_size, prompt))
    toks = []
    for _ in range(n):
        t = B.greedy(logits)
        toks.append(int(t))
        logits = decode_step(model, cache, t)
    return toks


def transformers_speed(model, pp: list[int], decode_prompt: int, steps: int, repeats: int, check_tokens: int,
                       warm: tuple[int, int]):
    import torch

    from hybridlm import bench as B
    vocab = model.config.vocab_size

    def prefill(ids):
        o = model(ids, use_cache=True, logits_to_keep=1)
        return o.logits[:, -1], getattr(o, "cache", None) or o.past_key_values

    def decode(logits, cache, n, record=None):
        for _ in range(n):
            t = B.greedy(logits)
            if record is not None:
                record.append(int(t))
            o = model(t[:, None], cache=cache, use_cache=True)
            logits, cache = o.logits[:, -1], getattr(o, "cache", None) or o.past_key_values
        return logits, cache

    rows = []
    with torch.no_grad():
        decode(*prefill(B.random_ids(vocab, warm[0], seed=1)), warm[1])           # warm-up
        for n in pp:
            ids = B.random_ids(vocab, n)
            if n <= B.WARM_SAME_SHAPE_UP_TO:
                prefill(ids)
            s = B.best_time(lambda ids=ids: prefill(ids), repeats)
            rows.append({"metric": "prompt", "tokens": n, "seconds": s, "tok_s": n / s})
            _say(f"[transformers {next(model.parameters()).dtype}] prompt {n}: {n / s:,.1f} tok/s")
        tokens: list[int] = []
        decode(*prefill(B.random_ids(vocab, decode_prompt)), check_tokens, record=tokens)   # the greedy check
        best = float("inf")
        for _ in range(max(1, repeats)):
            logits, cache = decode(*prefill(B.random_ids(vocab, decode_prompt)), 2)
            t0 = time.perf_counter()
            decode(logits, cache, steps)
            best = min(best, time.perf_counter() - t0)
        rows.append({"metric": "decode", "tokens": steps, "context": decode_prompt, "seconds": best,
                     "tok_s": steps / best})
        _say(f"[transformers {next(model.parameters()).dtype}] decode: {steps / best:,.1f} tok/s")
    return rows, tokens


# ---- 3. llama.cpp --------------------------------------------------------------------------------------
def llama_bench(ckpt: Path, root: Path, threads: int, pp: int, tg: int, reps: int, types: list[str]) -> dict:
    """Convert the checkpoint with llama.cpp's own converter (once per type) and run llama-bench on it.

    The converter is given a copy of config.json with ``num_experts_per_tok`` 0 for a dense model, as
    families.py now writes it: a checkpoint cached before that says 1 (``num_local_experts`` 0), which the
    converter stores as the experts-used count, and llama.cpp's loader then aborts
    (``GGML_ASSERT(n_expert_used_max <= hparams.n_expert)``). Without a tokenizer in the directory the converter takes its built-in
    GPT-NeoX vocabulary, cut to the model's size (speed does not depend on which strings the tokens are)."""
    paths = llama_cpp_paths(root)
    missing = [k for k in ("convert", "bench") if not paths[k].exists()]
    if missing:
        return {"error": f"llama.cpp not found at {root} ({', '.join(missing)} missing): run "
                         f"benchmarks/build_llama_cpp.sh or pass --llama-cpp"}
    src = root / "SOURCE"
    res = {"source": src.read_text().strip() if src.exists() else None, "types": {}}
    stage = ckpt.with_name(ckpt.name + "-llama")
    stage.mkdir(exist_ok=True)
    cfg = json.loads((ckpt / "config.json").read_text())
    if not cfg.get("num_local_experts") and cfg.get("num_experts_per_tok"):
        cfg["num_experts_per_tok"] = 0
        res["config_note"] = "num_experts_per_tok 1 -> 0 in the converter's copy of config.json (dense model)"
    (stage / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in ckpt.iterdir():
        if f.name.endswith((".safetensors", ".safetensors.index.json")) and not (stage / f.name).exists():
            (stage / f.name).symlink_to(f)
    for t in types:
        gguf = stage / f"model-{t}.gguf"
        if not gguf.exists():
            r = subprocess.run([sys.executable, str(paths["convert"]), str(stage), "--outtype", t, "--outfile",
                                str(gguf) + ".tmp"], capture_output=True, text=True)
            if r.returncode:
                err = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
                res["types"][t] = {"error": "convert_hf_to_gguf.py failed: " + " | ".join(err[-3:])[-1500:]}
                _say(f"[llama.cpp {t}] conversion failed: {err[-1] if err else r.returncode}")
                continue
            os.replace(str(gguf) + ".tmp", gguf)
        r = run_llama_bench(paths, gguf, threads, [pp], tg, reps)
        if "error" in r:
            lines = [ln for ln in r["error"].splitlines() if "GGML_ASSERT" in ln or "error" in ln.lower()]
            r["error"] = " | ".join(lines[-3:]) or r["error"][-800:]
        res["types"][t] = r
        _say(f"[llama.cpp {t}] {r.get('rows') or r.get('error')}")
    return res


# ---- 4. a long prompt, in a child process ----------------------------------------------------------------
def long_child(ckpt: str, n: int, new_tokens: int) -> dict:
    import torch

    from hybridlm.bench import _status_kib, peak_rss_bytes
    from hybridlm.generate import generate
    from hybridlm.model import HybridLM
    base = (_status_kib("VmRSS") or 0) * 1024                  # the runtime before any weight: torch + hybridlm
    model = HybridLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    after_load = peak_rss_bytes()
    ids = torch.randint(0, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    out = generate(model, ids, max_new_tokens=new_tokens)
    s = time.perf_counter() - t0
    assert out.shape == (1, n + new_tokens)
    return {"tokens": n, "new_tokens": new_tokens, "seconds": s, "tok_s": n / s, "rss_runtime": base,
            "peak_rss_after_load": after_load, "peak_rss": peak_rss_bytes()}


def long_prompt(ckpt: Path, n: int, new_tokens: int, threads: int) -> dict:
    from hybridlm.checkpoint import read_config
    from hybridlm.summary import memory_plan
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, __file__, "--child-long", str(ckpt), "--long", str(n), "--threads",
                        str(threads), "--long-new-tokens", str(new_tokens)], stdout=subprocess.PIPE, text=True, env=env)
    if r.returncode:
        return {"error": f"the long-prompt child exited with {r.returncode} (its stderr is above)"}
    row = json.loads(r.stdout.strip().splitlines()[-1])
    ctx = n + new_tokens                                            # generate allocates the cache for this
    p = memory_plan(read_config(ckpt), ctx, weight_dtype="bfloat16", cache_dtype="bfloat16")
    plan_cmd = [sys.executable, "-m", "hybridlm", "plan", str(ckpt), "--context", str(ctx)]
    shown = subprocess.run(plan_cmd, capture_output=True, text=True, cwd=REPO)
    row.update(plan={"context": ctx, "weights": p.weights, "kv": p.kv, "conv": p.conv, "ssm": p.ssm,
                     "runtime": p.runtime, "total": p.total},
               plan_command="hybridlm plan <checkpoint> --context " + str(ctx), plan_output=shown.stdout.strip(),
               ratio=row["peak_rss"] / p.total)
    _say(f"[long {n:,}] {row['tok_s']:,.0f} tok/s, peak RSS {row['peak_rss'] / 2**20:,.0f} MiB vs plan "
         f"{p.total / 2**20:,.0f} MiB: {row['ratio']:.2f}x")
    return row


# ---- the report ----------------------------------------------------------------------------------------
def _best(rows: list[dict], system: str, metric: str, tokens: int) -> tuple[float, str] | None:
    c = [(r["tok_s"], r["dtype"]) for r in rows if r["system"] == system and r["metric"] == metric
         and r["tokens"] == tokens]
    return max(c) if c else None


def write_report(res: dict, out: Path):
    from hybridlm.bench import environment_md
    from hybridlm.summary import fmt_bytes
    L = ["# Mamba-2 (Granite 4.0-H shape): hybridlm vs transformers' CPU path vs llama.cpp\n",
         f"`{res['command']}` ({res['wall_seconds'] / 60:.1f} min)" + (" — **quick smoke test, not a measurement**"
                                                                       if res["quick"] else "") + "\n",
         environment_md(res["env"]) + f"- {res['threads']} threads; best of {res['repeats']} after a warm-up\n"]
    lay = res.get("layer")
    if lay:
        sh = lay["shape"]
        L += ["\n## 1. One Mamba-2 mixer\n",
              f"hidden {sh['hidden']}, {sh['n_heads']} heads of {sh['head_dim']}, {sh['n_groups']} B/C group, "
              f"d_state {sh['d_state']}, d_conv {sh['d_conv']}, chunk {sh['chunk_size']} "
              f"({sh['params'] / 1e6:.2f}M parameters); input x [1, l, {sh['hidden']}], the same weights in both.\n",
              "| dtype | check | max abs diff |", "|---|---|---:|"]
        L += [f"| {a['dtype']} | {a['what']} | {a['max_abs_diff']:.2e} |" for a in lay["agreement"]]
        pp = sorted({r["tokens"] for r in lay["rows"] if r["metric"] == "prompt"})
        L += ["", "| dtype | implementation | " + " | ".join(f"prefill {n:,} tok/s" for n in pp) +
              " | decode tok/s | vs transformers |", "|---|---|" + "---:|" * (len(pp) + 2)]
        for d in DTYPES:
            hf = {(r["metric"], r["tokens"]): r["tok_s"] for r in lay["rows"]
                  if r["dtype"] == d and r["impl"].startswith("transformers")}
            for impl in dict.fromkeys(r["impl"] for r in lay["rows"] if r["dtype"] == d):
                rs = {(r["metric"], r["tokens"]): r for r in lay["rows"] if r["dtype"] == d and r["impl"] == impl}
                cells, ratios = [], []
                for n in pp:
                    r = rs.get(("prompt", n))
                    cells.append("–" if r is None else f"{r['tok_s']:,.0f}" +
                                 (f" (at {r['measured_tokens']:,})" if r["measured_tokens"] != n else ""))
                    if r and not impl.startswith("transformers"):
                        ratios.append(f"{r['tok_s'] / hf[('prompt', n)]:.1f}x")
                dec = next((r for k, r in rs.items() if k[0] == "decode"), None)
                cells.append(f"{dec['tok_s']:,.0f}" if dec else "–")
                if dec and not impl.startswith("transformers"):
                    ratios.append(f"decode {dec['tok_s'] / next(v for k, v in hf.items() if k[0] == 'decode'):.1f}x")
                L.append(f"| {d} | {impl} | " + " | ".join(cells) + f" | {' / '.join(ratios) or '1'} |")
        L += ["\nThe reference scan is sequential: its tok/s does not depend on length, and where marked it was "
              "measured on fewer tokens (`--ref-max`). Decode: one token against the state after a "
              f"{lay['rows'][-1]['context']}-token prompt; hybridlm's step is the fused C++ Mamba-2 step "
              "(`kernels.mamba2_step`; `ssd_step` where the kernels do not load; the reference scan on one token "
              "is the same recurrence)."]
    m = res.get("model")
    if m:
        L += [f"\n## 2. Whole model: {m['params'] / 1e6:.1f}M parameters, layout `{res['config']['layout']}`\n",
              f"Random weights (seed 0) saved in Granite's format at `{res['checkpoint']}`; hidden "
              f"{res['config']['hidden_size']}, vocabulary {res['config']['vocab_size']}, dense SwiGLU "
              f"{res['config']['intermediate_size']}, no positional encoding. Loaded by `HybridLM.from_pretrained` "
              "and `GraniteMoeHybridForCausalLM.from_pretrained`.\n", "| dtype | check | result |", "|---|---|---:|"]
        L += [f"| {a['dtype']} | {a['what']} | max abs diff {a['max_abs_diff']:.2e} (logits up to "
              f"{a['scale']:.2f}) |" for a in m["agreement"]]
        L += [f"| {d} | greedy, {m['check_tokens']} tokens after the decode prompt | {'equal' if eq else 'DIFFERENT'} |"
              for d, eq in m["greedy_equal"].items()]
        metrics = [("prompt", n) for n in res["pp"]] + [("decode", res["decode_steps"])]
        L += ["", "| measurement | hybridlm fp32 | hybridlm bf16 | transformers fp32 | transformers bf16 | "
              "best / best | target | met |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        for metric, n in metrics:
            cell = {(r["system"], r["dtype"]): r["tok_s"] for r in m["rows"] if r["metric"] == metric
                    and r["tokens"] == n}
            a, b = _best(m["rows"], "hybridlm", metric, n), _best(m["rows"], "transformers", metric, n)
            ratio = a[0] / b[0] if a and b else None
            label = f"prompt {n:,} (tok/s)" if metric == "prompt" else \
                f"decode {n} after {res['decode_prompt']} (tok/s)"
            judged = (f" | {ratio:.2f}x ({SHORT[a[1]]} / {SHORT[b[1]]}) | >= {TARGETS[metric]:.0f}x | "
                      f"{'yes' if ratio >= TARGETS[metric] else 'no'} |") if ratio else " | – | | |"
            L.append(f"| {label} | " + " | ".join(f"{cell.get((s, d), 0):,.1f}" for s in ("hybridlm", "transformers")
                                                 for d in DTYPES) + judged)
        L += ["\nhybridlm: the engine's chunked `prefill` (last logits only) and `decode_step` loop. transformers: "
              "`model(ids, use_cache=True, logits_to_keep=1)`, then one token at a time with its cache (what "
              "`generate` runs, without its bookkeeping). Ratios take each system's faster dtype."]
    ll = res.get("llama_cpp")
    if ll is not None:
        L += ["\n## 3. llama.cpp on the same weights\n"]
        if "error" in ll:
            L.append(f"Not run: {ll['error']}")
        else:
            L.append(f"llama.cpp {ll.get('source') or '?'}; `convert_hf_to_gguf.py` on the checkpoint"
                     + (f" ({ll['config_note']}: llama.cpp's loader aborts on 1 with no experts)"
                        if ll.get("config_note") else "") + f", then `llama-bench -t {res['threads']} -p "
                     f"{res['llama_pp']} -n {res['llama_tg']}`.\n")
            best_pp = _best(m["rows"], "hybridlm", "prompt", res["llama_pp"]) if m else None
            best_tg = _best(m["rows"], "hybridlm", "decode", res["decode_steps"]) if m else None
            L += ["| GGUF type | pp tok/s | tg tok/s | hybridlm best pp / llama.cpp | hybridlm best decode / "
                  "llama.cpp |", "|---|---:|---:|---:|---:|"]
            for t, r in ll["types"].items():
                if "error" in r:
                    L.append(f"| {t} | failed: {r['error'][:300]} | | | |")
                    continue
                ppr = next((x["tok_s"] for x in r["rows"] if x["metric"] == "prompt"), None)
                tgr = next((x["tok_s"] for x in r["rows"] if x["metric"] == "decode"), None)
                L.append(f"| {t} | {ppr or 0:,.1f} | {tgr or 0:,.1f} | "
                         f"{f'{best_pp[0] / ppr:.2f}x' if best_pp and ppr else '–'} | "
                         f"{f'{best_tg[0] / tgr:.2f}x' if best_tg and tgr else '–'} |")
            L.append("\nllama-bench's tg starts from an empty context, ours after the decode prompt; pp is "
                     "the mean of its repetitions, ours the best.")
    lg = res.get("long")
    if lg is not None:
        L += ["\n## 4. A long prompt through `hybridlm.generate` (bf16, a child process)\n"]
        if "error" in lg:
            L.append(f"Failed: {lg['error']}")
        else:
            p = lg["plan"]
            L += ["| prompt tokens | seconds | tok/s | RSS before load | peak RSS | plan (weights + KV + conv "
                  "+ SSM + runtime) | peak / plan | target |", "|---:|---:|---:|---:|---:|---:|---:|---|",
                  f"| {lg['tokens']:,} | {lg['seconds']:.1f} | {lg['tok_s']:,.0f} | {fmt_bytes(lg['rss_runtime'])} | "
                  f"{fmt_bytes(lg['peak_rss'])} | {fmt_bytes(p['total'])} ({fmt_bytes(p['weights'])} + "
                  f"{fmt_bytes(p['kv'])} + {fmt_bytes(p['conv'])} + {fmt_bytes(p['ssm'])} + "
                  f"{fmt_bytes(p['runtime'])}) | {lg['ratio']:.2f}x | "
                  f"<= 1.5x: {'met' if lg['ratio'] <= 1.5 else 'not met'} |",
                  f"\nThe plan is `{lg['plan_command']}` (bf16 weights and cache, context = prompt + "
                  f"{lg['new_tokens']} new tokens), its total the figure compared. Peak RSS is the whole process "
                  f"(VmHWM); {fmt_bytes(lg['rss_runtime'])} of it was held before any weight was read (Python, torch, "
                  f"hybridlm), against the plan's runtime estimate of {fmt_bytes(p['runtime'])} (which also "
                  f"covers one prefill chunk's buffers); peak RSS right after loading: "
                  f"{fmt_bytes(lg['peak_rss_after_load'])}.",
                  "\n```\n" + lg["plan_output"] + "\n```"]
    L += ["\n## Against the targets\n", summary(res)]
    out.with_suffix(".md").write_text("\n".join(L) + "\n")


def summary(res: dict) -> str:
    parts = []
    m = res.get("model")
    if m:
        for metric, n in [("prompt", x) for x in res["pp"]] + [("decode", res["decode_steps"])]:
            a, b = _best(m["rows"], "hybridlm", metric, n), _best(m["rows"], "transformers", metric, n)
            if a and b:
                what = f"prefill of {n:,} tokens" if metric == "prompt" else "decode"
                parts.append(f"{what} {a[0] / b[0]:.1f}x transformers' CPU path (target {TARGETS[metric]:.0f}x: "
                             f"{'met' if a[0] / b[0] >= TARGETS[metric] else 'not met'})")
        worst = max(a["max_abs_diff"] for a in m["agreement"] if a["dtype"] == "float32")
        parts.append(f"fp32 logits agree to {worst:.1e} (issue: <= 1e-4)")
    lay = res.get("layer")
    if lay:
        for d in DTYPES:
            rs = [r for r in lay["rows"] if r["dtype"] == d and r["metric"] == "prompt"]
            n = max(r["tokens"] for r in rs)
            tok = {r["impl"]: r["tok_s"] for r in rs if r["tokens"] == n}
            c, ref, hf = (tok.get(k) for k in ("hybridlm (ssd_chunked)", "hybridlm (ssd_scan_ref)",
                                                "transformers (CPU path)"))
            if c and ref and hf:
                parts.append(f"one {d} mixer at {n:,} tokens: chunked SSD {c / ref:.1f}x the sequential reference "
                             f"and {c / hf:.1f}x transformers")
    lg = res.get("long")
    if lg and "error" not in lg:
        parts.append(f"a {lg['tokens']:,}-token prompt peaked at {lg['ratio']:.2f}x the plan (target 1.5x: "
                     f"{'met' if lg['ratio'] <= 1.5 else 'not met'})")
    ll = res.get("llama_cpp") or {}
    if "error" in ll:
        parts.append(f"llama.cpp not run ({ll['error'][:120]})")
    for t, r in ll.get("types", {}).items():
        if "error" in r:
            parts.append(f"llama.cpp {t}: {r['error'][:200]}")
    return "; ".join(parts) + "." if parts else "Nothing measured."


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: short lengths, a small model, one repeat")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=None, help="runs per measurement, the fastest kept (default 2)")
    ap.add_argument("--pp", type=lambda s: [int(x) for x in s.split(",")], default=None,
                    help="prefill lengths, layer and model (default 512,2048)")
    ap.add_argument("--ref-max", type=int, default=None,
                    help="longest prefill the sequential reference scan runs (default 2048)")
    ap.add_argument("--decode-prompt", type=int, default=None, help="default 128")
    ap.add_argument("--decode-steps", type=int, default=None, help="default 64")
    ap.add_argument("--long", type=int, default=None, help="long-prompt tokens (default 262144; --quick 4096)")
    ap.add_argument("--long-new-tokens", type=int, default=4)
    ap.add_argument("--llama-cpp", type=Path, default=Path(os.environ.get("HYBRIDLM_LLAMA_CPP", CACHE / "llama.cpp")))
    ap.add_argument("--llama-types", type=lambda s: s.split(","), default=["bf16", "f32"])
    ap.add_argument("--llama-reps", type=int, default=None, help="llama-bench repetitions (default 3)")
    ap.add_argument("--skip", type=lambda s: set(s.split(",")), default=set(),
                    help="parts to leave out: layer,model,llama,long")
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/mamba2 (--quick: a temporary directory)")
    ap.add_argument("--child-long", help=argparse.SUPPRESS)
    a = ap.parse_args()
    import torch
    torch.set_num_threads(a.threads)
    if a.child_long:
        print(json.dumps(long_child(a.child_long, a.long, a.long_new_tokens)))
        return
    q = a.quick
    pp = a.pp or ([128] if q else [512, 2048])
    ref_max = a.ref_max or (32 if q else 2048)
    decode_prompt = a.decode_prompt or (16 if q else 128)
    decode_steps = a.decode_steps or (2 if q else 64)
    repeats = a.repeats or (1 if q else 2)
    long_n = a.long if a.long is not None else (4096 if q else 262144)
    llama_pp, llama_tg, llama_reps = pp[0], decode_steps, a.llama_reps or (1 if q else 3)
    out = a.out or (Path(tempfile.gettempdir()) / "mamba2_quick" if q else REPO / "benchmarks" / "results" / "mamba2")
    from hybridlm.bench import environment
    t0 = time.perf_counter()
    cfg = granite_config(q)
    res = {"command": " ".join(["python", "benchmarks/mamba2_bench.py", *sys.argv[1:]]), "quick": q,
           "threads": a.threads, "repeats": repeats, "pp": pp, "decode_prompt": decode_prompt,
           "decode_steps": decode_steps, "llama_pp": llama_pp, "llama_tg": llama_tg, "env": environment(),
           "config": cfg.to_dict()}
    res["config"]["layout"] = cfg.pattern
    ckpt = checkpoint(cfg, "float32")
    res["checkpoint"] = str(ckpt)
    if "layer" not in a.skip:
        res["layer"] = layer_bench(layer_config(q), pp, ref_max, decode_prompt, decode_steps, repeats)
    if "model" not in a.skip:
        check, warm = (4, (16, 1)) if q else (8, (64, 4))        # greedy tokens compared; warm-up prompt, steps
        res["model"] = model_bench(ckpt, pp, decode_prompt, decode_steps, repeats, check, warm)
    if "llama" not in a.skip:
        res["llama_cpp"] = llama_bench(ckpt, a.llama_cpp, a.threads, llama_pp, llama_tg, llama_reps, a.llama_types)
    if "long" not in a.skip and long_n:
        res["long"] = long_prompt(checkpoint(cfg, "bfloat16"), long_n, a.long_new_tokens, a.threads)
    res["wall_seconds"] = time.perf_counter() - t0
    out.parent.mkdir(parents=True, exist_ok=True)
    # the JSON first: a bug in the report loses nothing
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    write_report(res, out)
    print(out.with_suffix(".md").read_text())
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}", file=sys.stderr)


if __name__ == "__main__":
    main()
