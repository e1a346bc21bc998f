"""The ablation lab: train many small variants of a hybrid at equal parameters and equal tokens, over
several seeds and tasks, and say which of a set of claims the numbers support.

It follows the protocol of Jamba's ablations (Lieber et al. 2024, sec. 6): models that differ only in
their layer layout (attention-only, Mamba-only, hybrids of several attention:Mamba ratios, attention
placement, local:global attention, MoE vs dense) at (approximately) the same parameter count, trained
on the same tokens, then compared on language-modelling loss, in-context recall (MQAR, Zoology: Arora
et al. 2023) and few-shot format following.

The pieces, one file each: ``spec`` (the TOML spec), ``matching`` (equal parameters), ``tasks`` and
``lm_task`` (what is trained and scored), ``stats`` (intervals and verdicts), ``report`` (tables and
plots); this file runs the sweep:

1. every (variant, seed, task) not already in ``NAME.csv`` is trained (a run is keyed by variant, seed,
   task and a hash of everything that determines it, so an edited spec reruns exactly the runs it
   changed and an interrupted sweep resumes where it stopped), through ``hybridlm.train.train_step``,
   the step ``hybridlm train`` takes;
2. ``NAME.csv`` gets one row per run and metric, ``NAME_curves.csv`` the training loss and the tracked
   validation metric, ``NAME_tables.md`` and ``NAME_*.png`` the report.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..config import HybridConfig, expand_pattern
from .lm_task import LMTask
from .matching import count_params, match_variants
from .report import context_md, plot_context, plot_results, tables_md
from .spec import RUNNER_KEYS, Spec, Train, load_spec
from .tasks import make_task

VERSION = 2          # bump when a change to the runner invalidates earlier results
CONTEXT_VERSION = 3  # the same for the context-scaling measurement
CSV_FIELDS = ["variant", "seed", "task", "run_hash", "layout", "params", "active_params", "steps", "tokens",
              "seconds", "tok_s", "train_loss", "metric", "value"]
CURVE_FIELDS = ["variant", "seed", "task", "run_hash", "step", "tokens", "loss", "val"]


def build_task(spec: Spec, name: str):
    """The task object of ``[tasks.NAME]`` (runner keys such as steps or variants removed)."""
    opts = {k: v for k, v in spec.tasks[name].items() if k not in RUNNER_KEYS}
    kind = opts.pop("kind", name)
    if kind == "lm":
        return LMTask(**opts)
    return make_task(kind, spec.vocab, **opts)


def task_options(task) -> dict:
    if isinstance(task, LMTask):
        return task.options()
    return {"kind": task.name, **{k: v for k, v in asdict(task).items() if k != "vocab"}}


# ---- one run -----------------------------------------------------------------------------------
@dataclass
class Job:
    variant: str
    seed: int
    task: str
    task_obj: object
    cfg: HybridConfig
    train: Train
    eval_size: int
    run_hash: str
    device: str
    threads: int = 0


def _xy(batch):
    """A synthetic ``Batch`` or an LM (inputs, targets) pair -> (inputs, targets)."""
    if isinstance(batch, tuple):
        return batch
    return batch.input_ids, batch.targets


def micro_batches(x: torch.Tensor, y: torch.Tensor, micro: int, device):
    """(inputs, targets, is_last) slices of ``micro`` sequences of one step's batch."""
    n = x.shape[0]
    for i in range(0, n, micro):
        yield x[i:i + micro].to(device), y[i:i + micro].to(device), i + micro >= n


def run_job(job: Job) -> tuple[list[dict], list[dict]]:
    """Train one variant on one task from seed ``job.seed`` through ``hybridlm.train.train_step`` (the
    trainer's step: autocast, accumulation, clipping) and evaluate it; returns (metric rows, curve)."""
    if job.threads:
        torch.set_num_threads(job.threads)
    from ..model import HybridLM
    from ..optim import build_optimizer, build_scheduler
    from ..train import LossModule, resolve_dtype, train_step
    t0 = time.perf_counter()
    cfg, t = job.cfg, job.train
    micro = t.micro_batch or t.batch_size
    if t.batch_size % micro:
        raise ValueError(f"[train] batch_size {t.batch_size} must be a multiple of micro_batch {micro}")
    torch.manual_seed(job.seed)
    model = HybridLM(cfg).init_weights(job.seed).to(job.device)
    module = LossModule(model, 0.0)
    opt = build_optimizer(model, t.lr, t.weight_decay, t.betas)
    sched = build_scheduler(opt, t.warmup, t.steps, t.min_lr_ratio)
    dtype = resolve_dtype(t.dtype, job.device)
    stream = job.task_obj.stream(t.batch_size, job.seed)
    tokens_per_step = t.batch_size * job.task_obj.seq_len
    curve, losses, train_seconds = [], [], 0.0

    def point(step, loss):
        val = ""
        if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
            model.eval()
            val = next(iter(job.task_obj.evaluate(model, job.eval_size, seed=0, device=job.device).values()))
            model.train()
        curve.append({"step": step, "tokens": step * tokens_per_step, "loss": loss, "val": val})

    model.train()
    for step in range(t.steps):
        x, y = _xy(next(stream))
        s0 = time.perf_counter()
        m = train_step(module, micro_batches(x, y, micro, job.device), t.batch_size // micro, model.parameters(),
                       t.grad_clip, dtype)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - s0
        losses.append(m["ce"])
        done = step + 1
        if done % max(1, t.steps // 50) == 0 or done == t.steps or (t.eval_every and done % t.eval_every == 0):
            point(done, losses[-1])
    model.eval()
    metrics = job.task_obj.evaluate(model, job.eval_size, seed=0, device=job.device)
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, len(losses) // 10):]
    base = {"variant": job.variant, "seed": job.seed, "task": job.task, "run_hash": job.run_hash,
            "layout": cfg.pattern, "params": count_params(cfg), "active_params": count_params(cfg, True),
            "steps": t.steps, "tokens": t.steps * tokens_per_step, "seconds": round(seconds, 2),
            "tok_s": round(t.steps * tokens_per_step / max(train_seconds, 1e-9)),
            "train_loss": round(sum(tail) / len(tail), 5)}
    rows = [{**base, "metric": k, "value": v} for k, v in metrics.items()]
    keys = {k: base[k] for k in ("variant", "seed", "task", "run_hash")}
    return rows, [{**keys, **c} for c in curve]


def _run_hash(config: dict, task_name: str, task_opts: dict, train: Train, seed: int, eval_size) -> str:
    blob = json.dumps({"v": VERSION, "config": config, "task": task_name, "task_options": task_opts,
                       "train": asdict(train), "seed": seed, "eval_size": eval_size}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan_jobs(spec: Spec, device: str, seeds: list[int] | None = None) -> tuple[list[Job], dict]:
    """Every (variant, seed, task) run of the spec, seed-major so that an interrupted sweep leaves
    whole seeds of every variant; and the matched variants per task."""
    tasks, matched, by_vocab = {}, {}, {}
    for tname in spec.tasks:
        task = tasks[tname] = build_task(spec, tname)
        if isinstance(task, LMTask):
            task.prepare()          # the tokenizer decides the vocabulary size
            vocab = task.vocab_size
        else:
            vocab = spec.vocab.size
        if vocab not in by_vocab:
            by_vocab[vocab] = match_variants(spec, vocab)
        matched[tname] = by_vocab[vocab]
    jobs = []
    # a task's own `seeds` replace the spec's; --seeds (the ``seeds`` argument) replaces both
    task_seeds = {t: seeds if seeds is not None else opts.get("seeds", spec.seeds) for t, opts in spec.tasks.items()}
    budget_keys = ("steps", "batch_size", "micro_batch", "lr", "warmup", "eval_every")
    for seed in sorted(set().union(*task_seeds.values())):
        for tname, opts in spec.tasks.items():
            if seed not in task_seeds[tname]:
                continue
            train = Train(**{**asdict(spec.train), **{k: opts[k] for k in budget_keys if k in opts}})
            eval_size = opts.get("eval_size", 512)
            names = opts.get("variants") or [v.name for v in spec.variants]
            for vname in names:
                cfg = matched[tname][vname]["config"]
                h = _run_hash(asdict(cfg), tname, task_options(tasks[tname]), train, seed, eval_size)
                jobs.append(Job(vname, seed, tname, tasks[tname], cfg, train, eval_size, h, device))
    return jobs, matched


def quick_spec(spec: Spec) -> Spec:
    """The spec's whole pipeline in seconds (``--quick``): two seeds, 3 steps of 4 sequences per run, small
    evaluation sets and context lengths; results go to NAME_quick.*. For checking a spec and the code,
    never for conclusions."""
    tasks = {}
    for name, opts in spec.tasks.items():
        o = {**opts, "steps": 3, "batch_size": 4, "micro_batch": 0, "warmup": 1, "eval_size": 8,
             "eval_every": 2 if opts.get("eval_every") else 0}
        if "seeds" in o:
            o["seeds"] = o["seeds"][:2]
        if "eval_windows" in o or (o.get("kind", name) == "lm"):
            o["eval_windows"] = 4
        tasks[name] = o
    ctx = None
    if spec.context:
        ctx = {**spec.context, "lengths": [64, 128], "decode_tokens": 2, "repeats": 1}
    return replace(spec, name=spec.name + "_quick", seeds=spec.seeds[:2], tasks=tasks, context=ctx,
                   train=replace(spec.train, steps=3, batch_size=4, micro_batch=0, warmup=1, eval_every=0))


# ---- results files -----------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_csv(path: Path, fields: list[str], rows: list[dict]):
    """Append rows, fsynced; a file written with other columns (an older version) is rewritten first with
    the current ones (its rows keep their values; new columns stay empty)."""
    if path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header != fields:
            old = read_csv(path)
            tmp = path.with_suffix(".csv.tmp")
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                w.writeheader()
                w.writerows(old)
            os.replace(tmp, path)
    new = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def finished(rows: list[dict]) -> set[tuple]:
    return {(r["variant"], int(r["seed"]), r["task"], r["run_hash"]) for r in rows}


def current_rows(rows: list[dict], jobs: list[Job]) -> list[dict]:
    """The rows of the spec's current runs (earlier runs of edited settings stay in the file, unused)."""
    want = {(j.variant, j.seed, j.task, j.run_hash) for j in jobs}
    return [r for r in rows if (r["variant"], int(r["seed"]), r["task"], r["run_hash"]) in want]


# ---- claim (e): memory and decode speed against context ----------------------------------------
def context_scaling(spec: Spec, device: str) -> list[dict]:
    """Cache bytes (allocated, not estimated) and prefill / decode throughput at growing context for the
    layouts in ``[context]`` (Jamba sec. 3.2: throughput against context; Table 1: only attention layers
    keep a cache that grows with context), measured with ``hybridlm bench``'s own prompt-and-decode
    (best of ``repeats``: on a shared CPU the slowdowns come from other processes, not the model)."""
    from ..bench import prompt_and_decode, warmup
    from ..model import HybridLM
    c = dict(spec.context)
    lengths, tokens, repeats = c.pop("lengths"), c.pop("decode_tokens", 16), c.pop("repeats", 3)
    names = c.pop("variants")
    model_fields = {**spec.model, **c.pop("model", {})}
    rows = []
    for vn in names:
        v = spec.variant(vn)
        fields = {"vocab_size": spec.vocab.size, **model_fields, **v.overrides}
        cfg = HybridConfig(layout=v.layout, num_hidden_layers=len(expand_pattern(v.layout)), **fields)
        model = HybridLM(cfg).init_weights(0).to(device).eval()
        warmup(model, tokens=min(64, min(lengths)))
        for n in lengths:
            r = prompt_and_decode(model, n, tokens, repeats=repeats)
            rows.append({"variant": vn, "layout": cfg.pattern, "context": n, "cache_bytes": r["cache_bytes"]["total"],
                         "kv_bytes": r["cache_bytes"]["kv"], "prefill_tok_s": r["pp_tok_s"],
                         "decode_tok_s": r["decode_tok_s"], "threads": torch.get_num_threads()})
    return rows


def measure_context(spec: Spec, device: str, outdir: Path) -> tuple[list[dict], bool]:
    """The context-scaling rows from OUT/NAME_context.csv when it was measured with the same settings and
    kernel backend, else measured now and written there; and whether they were measured now."""
    from .. import kernels
    path = outdir / f"{spec.name}_context.csv"
    settings = json.dumps([CONTEXT_VERSION, spec.context, spec.model,
                           [asdict(spec.variant(v)) for v in spec.context["variants"]], kernels.report(), device],
                          sort_keys=True, default=str)
    key = hashlib.sha256(settings.encode()).hexdigest()[:16]
    rows = read_csv(path)
    if rows and all(r["settings"] == key for r in rows):
        return rows, False
    rows = [{**r, "settings": key} for r in context_scaling(spec, device)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return rows, True


# ---- the command -------------------------------------------------------------------------------
def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but torch sees no GPU; use --device cpu or auto")
    return name


def _hardware(device: str, workers: int, threads: int) -> str:
    from ..bench import environment
    env = environment()
    hw = f"{env['cpu']}, {env['cores']} cores; {workers} worker process(es) x {threads or env['threads']} torch threads"
    if device == "cuda":
        hw += f"; GPU: {torch.cuda.get_device_name(0)}"
    kern = ", ".join(f"{op}: {how}" for op, how in env["kernels"].items() if op != "backend")
    return (f"{hw}; torch {env['torch']}, Python {env['python']}, {platform.system()}, "
            f"hybridlm commit {env['commit']}; kernels: {kern}")


def ablate(spec: str, out: str = "results", workers: int = 1, threads: int = 0, device: str = "",
           seeds: str = "", quick: bool = False, dry_run: bool = False) -> int:
    """Train layout variants at equal parameters and tokens over seeds and tasks; write CSV, tables, plots.

    Resumable: runs already in OUT/NAME.csv with the same settings are skipped, so rerunning an
    interrupted or extended sweep only does what is missing. The spec format is documented in
    examples/ablation.toml.

    Args:
        spec: TOML spec file (variants, tasks, training budget, seeds, claims)
        out: directory for NAME.csv, NAME_curves.csv, NAME_tables.md and NAME_*.png
        workers: runs trained in parallel processes (CPU: each gets THREADS torch threads)
        threads: torch threads per run (0: torch's default, or cores / workers with several workers)
        device: cpu, cuda or auto (default: the spec's device, auto = the GPU when present)
        seeds: comma-separated seeds overriding the spec's, e.g. 0,1
        quick: the spec's whole pipeline in seconds (2 seeds, 3 steps a run; files NAME_quick.*): a check, not results
        dry_run: print the matched variants and the runs to do, train nothing

    Examples:
        hybridlm ablate examples/ablation.toml --out results --workers 2
        hybridlm ablate examples/ablation.toml --quick --out /tmp/ablate-check
        hybridlm ablate examples/ablation.toml --dry-run
    """
    wall0 = time.perf_counter()
    s = load_spec(spec)
    if quick:
        s = quick_spec(s)
    dev = _device(device or s.device)
    seed_list = [int(x) for x in seeds.split(",")] if seeds else None
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    csv_path, curves_path = outdir / f"{s.name}.csv", outdir / f"{s.name}_curves.csv"
    jobs, matched = plan_jobs(s, dev, seed_list)
    done = finished(read_csv(csv_path))
    todo = [j for j in jobs if (j.variant, j.seed, j.task, j.run_hash) not in done]
    print(f"ablate {s.name}: {len(s.variants)} variants, tasks {', '.join(s.tasks)}; {len(jobs)} runs, "
          f"{len(jobs) - len(todo)} already done, {len(todo)} to do on {dev}", flush=True)
    for name, m in matched[next(iter(matched))].items():
        print(f"  {name:18s} {m['config'].pattern:12s} {s.match_field}={m['field_value']:<5d} "
              f"params {m['params']:>9,} active {m['active_params']:>9,} ({m['deviation']:+.1%})")
    if dry_run:
        return 0
    if workers > 1 and dev == "cpu":
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
    for j in todo:
        j.threads = threads

    def record(job, rows, curve):
        append_csv(csv_path, CSV_FIELDS, rows)
        append_csv(curves_path, CURVE_FIELDS, curve)
        summary = ", ".join(f"{r['metric']}={float(r['value']):.3f}" for r in rows)
        print(f"  [{job.task}] {job.variant} seed {job.seed}: {summary} ({rows[0]['seconds']} s)", flush=True)

    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed
        # spawn: forking a process whose OpenMP pool has started can deadlock the child
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_job, j): j for j in todo}
            for f in as_completed(futures):
                record(futures[f], *f.result())
    else:
        for j in todo:
            record(j, *run_job(j))

    rows = current_rows(read_csv(csv_path), jobs)
    curves = current_rows(read_csv(curves_path), jobs)
    if threads:
        torch.set_num_threads(threads)     # the context measurement runs here, with the workers' threads
    ctx, ctx_new = measure_context(s, dev, outdir) if s.context else ([], False)
    wall = time.perf_counter() - wall0
    runs = list({(r["variant"], r["seed"], r["task"]): r for r in rows}.values())
    run_seconds = sum(float(r["seconds"]) for r in runs)
    header = [f"## Ablation `{s.name}`\n",
              f"- command: `hybridlm ablate {spec} --out {out} --workers {workers}`" +
              (f" --seeds {seeds}" if seeds else "") + (" --quick" if quick else ""),
              f"- hardware: {_hardware(dev, workers, threads)}",
              f"- this invocation: {wall:.0f} s wall ({len(todo)} runs trained, {workers} worker(s)"
              f"{', context scaling measured' if ctx_new else ''}); "
              f"sum of all {len(jobs)} runs' own times: {run_seconds:.0f} s",
              "- training speed per worker (tokens/s, mean over runs): " +
              "; ".join(f"{t}: {statistics.fmean(float(r['tok_s'] or 0) for r in runs if r['task'] == t):,.0f}"
                        for t in s.tasks if any(r["task"] == t for r in runs)), "", ""]
    body = tables_md(s, rows, matched) + ("\n" + context_md(ctx) if ctx else "")
    (outdir / f"{s.name}_tables.md").write_text("\n".join(header) + body)
    # plots are redrawn only when something changed (matplotlib is slow on a busy CPU)
    if rows and (todo or not (outdir / f"{s.name}_curves.png").exists()):
        plot_results(s, rows, curves, outdir)
    if ctx and (ctx_new or not (outdir / f"{s.name}_context.png").exists()):
        plot_context(ctx, outdir / f"{s.name}_context.png")
    print(f"wrote {csv_path}, {outdir / (s.name + '_tables.md')} and plots ({wall:.0f} s)", file=sys.stderr)
    return 0