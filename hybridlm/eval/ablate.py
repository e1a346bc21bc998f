"""The ablation lab: train many small variants of a hybrid at equal parameters and equal tokens, over
several seeds and tasks, and say which of a set of claims the numbers support.

It follows the protocol of Jamba's ablations (Lieber et al. 2024, sec. 6): models that differ only in
their layer layout (attention-only, Mamba-only, hybrids of several attention:Mamba ratios, attention
placement, MoE vs dense) at (approximately) the same parameter count, trained on the same tokens, then
compared on language-modelling loss and on in-context retrieval (MQAR, Zoology: Arora et al. 2023;
passkey; induction copy).

A spec (TOML; ``examples/ablation.toml`` is the commented reference) names the base model, the
variants, the tasks, the training budget, the seeds and the claims to check. ``ablate`` then

1. matches parameters: per variant it searches the ``match.field`` value (``intermediate_size`` by
   default) whose non-embedding parameter count (total, or active per token for MoE variants) is
   closest to the reference variant's, and refuses to run when any stays outside ``match.tolerance``;
2. runs every (variant, seed, task) not already in ``NAME.csv`` (a run is keyed by variant, seed, task
   and a hash of everything that determines it, so an edited spec reruns exactly the runs it changed
   and an interrupted sweep resumes where it stopped);
3. writes ``NAME.csv`` (one row per run and metric), ``NAME_curves.csv`` (training loss),
   ``NAME_tables.md`` (mean ± std over seeds, claim verdicts, context scaling) and ``NAME_*.png``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import HybridConfig, expand_pattern
from .tasks import Vocab, make_task

VERSION = 1          # bump when a change to the runner invalidates earlier results
CONTEXT_VERSION = 2  # the same for the context-scaling measurement
RUNNER_KEYS = {"steps", "batch_size", "lr", "warmup", "variants", "eval_size", "seeds"}
CSV_FIELDS = ["variant", "seed", "task", "run_hash", "layout", "params", "active_params", "steps", "tokens",
              "seconds", "train_loss", "metric", "value"]
CURVE_FIELDS = ["variant", "seed", "task", "run_hash", "step", "loss"]


# ---- the spec ----------------------------------------------------------------------------------
@dataclass
class Train:
    """Optimiser and budget of one run (every variant of a task gets the same)."""
    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 30
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    betas: tuple[float, float] = (0.9, 0.95)


@dataclass
class Variant:
    name: str
    layout: str
    overrides: dict = field(default_factory=dict)   # other HybridConfig fields of this variant
    match: str = "total"                            # "total", "active" or "none"


@dataclass
class Claim:
    """``a EXPECT b`` on ``task``'s ``metric``: expect is one of > >= < <= ==; ``margin`` is the
    tolerance in metric units for >=, <= (non-inferiority) and == (equivalence)."""
    id: str
    text: str
    task: str
    metric: str
    a: str
    b: str
    expect: str
    margin: float = 0.0


@dataclass
class Spec:
    name: str
    seeds: list[int]
    model: dict
    variants: list[Variant]
    tasks: dict[str, dict]
    train: Train = field(default_factory=Train)
    vocab: Vocab = field(default_factory=Vocab)
    match_field: str = "intermediate_size"
    match_reference: str | None = None
    match_tolerance: float = 0.03
    claims: list[Claim] = field(default_factory=list)
    context: dict | None = None
    device: str = "auto"

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise ValueError(f"unknown variant {name!r}; the spec defines {', '.join(v.name for v in self.variants)}")


def _read_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:          # Python 3.10: the same parser, published as `tomli`
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            from ..cli import CLIError
            raise CLIError("reading a TOML spec on Python 3.10 needs the `tomli` package: pip install tomli") \
                from None
    with open(path, "rb") as f:
        try:
            return tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None


def parse_spec(d: dict, name: str = "ablation") -> Spec:
    """A spec from its TOML content (see examples/ablation.toml for every key)."""
    known = {"name", "seeds", "device", "model", "match", "train", "vocab", "variants", "tasks", "claims", "context"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown top-level spec key(s) {unknown}; known: {sorted(known)}")
    if not d.get("variants"):
        raise ValueError("the spec defines no [variants]; add e.g. `attention = \"aaaaaaaa\"`")
    if not d.get("tasks"):
        raise ValueError("the spec defines no [tasks]; add e.g. `[tasks.mqar]`")
    variants = []
    for vname, v in d["variants"].items():
        if isinstance(v, str):
            v = {"layout": v}
        v = dict(v)
        if "layout" not in v:
            raise ValueError(f"variant {vname!r} has no layout; write `{vname} = \"mmmmammm\"` or an inline "
                             f"table with a layout key")
        match = v.pop("match", "total")
        if match not in ("total", "active", "none"):
            raise ValueError(f"variant {vname!r}: match must be 'total', 'active' or 'none', got {match!r}")
        variants.append(Variant(vname, v.pop("layout"), v, match))
    m = d.get("match", {})
    bad = sorted(set(m) - {"field", "reference", "tolerance"})
    if bad:
        raise ValueError(f"unknown [match] key(s) {bad}; known: field, reference, tolerance")
    train = d.get("train", {})
    bad = sorted(set(train) - {f for f in Train.__dataclass_fields__})
    if bad:
        raise ValueError(f"unknown [train] key(s) {bad}; known: {sorted(Train.__dataclass_fields__)}")
    if "betas" in train:
        train["betas"] = tuple(train["betas"])
    claims = []
    for i, c in enumerate(d.get("claims", [])):
        try:
            claims.append(Claim(**{"id": str(i + 1), "text": "", **c}))
        except TypeError as e:
            raise ValueError(f"claim {i + 1}: {e}; a claim has id, text, task, metric, a, b, expect, margin") \
                from None
        if claims[-1].expect not in _EXPECT:
            raise ValueError(f"claim {claims[-1].id}: expect must be one of {list(_EXPECT)}, got {c['expect']!r}")
    spec = Spec(name=d.get("name", name), seeds=list(d.get("seeds", [0])), model=dict(d.get("model", {})),
                variants=variants, tasks={k: dict(v) for k, v in d["tasks"].items()}, train=Train(**train),
                vocab=Vocab(**d.get("vocab", {})), match_field=m.get("field", "intermediate_size"),
                match_reference=m.get("reference", variants[0].name), match_tolerance=m.get("tolerance", 0.03),
                claims=claims, context=d.get("context"), device=d.get("device", "auto"))
    spec.variant(spec.match_reference)
    for t, opts in spec.tasks.items():
        for vn in opts.get("variants", []):
            spec.variant(vn)
    for c in claims:
        spec.variant(c.a), spec.variant(c.b)
        if c.task not in spec.tasks:
            raise ValueError(f"claim {c.id} is about task {c.task!r}, which the spec does not run")
    return spec


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"spec {path} does not exist; see examples/ablation.toml for the format")
    return parse_spec(_read_toml(path), name=path.stem)


# ---- equal-parameter matching ------------------------------------------------------------------
def count_params(cfg: HybridConfig, active: bool = False) -> int:
    """Parameters outside the embedding and the output head (identical across variants of one task),
    total or active per token. Counted with the model's own ``num_params`` on one-layer models of each
    distinct layer symbol, on the meta device (nothing allocated; the matcher calls this often)."""
    from collections import Counter

    from ..model import HybridLM
    def layers(layout: str, n: int) -> int:
        one = cfg.replace(layout=layout, num_hidden_layers=n, vocab_size=1)
        with torch.device("meta"):
            m = HybridLM(one)
        outside = 2 * cfg.hidden_size if not cfg.tie_word_embeddings else cfg.hidden_size  # 1-token emb, head
        return m.num_params(active=active) - outside - cfg.hidden_size

    total = cfg.hidden_size                                         # the final norm
    for sym, n in Counter(cfg.layer_symbols).items():
        # a feed-forward-only layer cannot be a model alone: counted beside a mixer-only one, then without it
        total += n * (layers(sym + "a_", 2) - layers("a_", 1) if sym in "fF" else layers(sym, 1))
    return total


def _config(spec: Spec, v: Variant, vocab_size: int, **changes) -> HybridConfig:
    fields = {**spec.model, **v.overrides, "vocab_size": vocab_size, **changes}
    return HybridConfig(layout=v.layout, num_hidden_layers=len(expand_pattern(v.layout)), **fields)


def match_variants(spec: Spec, vocab_size: int) -> dict[str, dict]:
    """Per variant: its config with ``match.field`` adjusted, its parameter counts and the deviation from
    the reference variant. Parameter counts grow monotonically with the field, so a bisection over the
    field's values (integers; multiples of 2 x heads for hidden_size, to keep an even head size) finds
    the closest."""
    ref_v = spec.variant(spec.match_reference)
    ref_cfg = _config(spec, ref_v, vocab_size)
    fname = spec.match_field
    if fname not in HybridConfig.__dataclass_fields__:
        raise ValueError(f"match.field {fname!r} is not a HybridConfig field")
    step = ref_cfg.num_attention_heads * 2 if fname == "hidden_size" else 1
    out = {}
    for v in spec.variants:
        cfg = _config(spec, v, vocab_size)
        which = v.match if v.match != "none" else "total"
        target = count_params(ref_cfg, active=(which == "active"))
        if v.match != "none" and v.name != ref_v.name:
            def n(x, v=v, which=which):
                return count_params(_config(spec, v, vocab_size, **{fname: x * step}), active=(which == "active"))
            lo, hi = 1, max(2, 2 * getattr(cfg, fname) // step)
            while n(hi) < target:
                hi *= 2
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if n(mid) <= target else (lo, mid)
            best = min((lo, hi), key=lambda x: abs(n(x) - target))
            cfg = _config(spec, v, vocab_size, **{fname: best * step})
        total, active = count_params(cfg), count_params(cfg, active=True)
        got = active if which == "active" else total
        dev = got / target - 1
        if v.match != "none" and abs(dev) > spec.match_tolerance:
            raise ValueError(f"variant {v.name!r}: the closest {fname} ({getattr(cfg, fname)}) gives {got:,} "
                             f"{which} parameters, {dev:+.1%} from the reference's {target:,} (tolerance "
                             f"{spec.match_tolerance:.0%}); match on another [match] field (intermediate_size is the "
                             f"finest), widen match.tolerance, or set match = \"none\" for this variant")
        out[v.name] = {"config": cfg, "params": total, "active_params": active, "matched_on": which,
                       "deviation": dev, "field_value": getattr(cfg, fname)}
    return out


# ---- language-modelling task -------------------------------------------------------------------
class LMTask:
    """Next-token loss on a corpus (default: the built-in Python standard-library corpus), through the
    training pipeline's own pieces: hybridlm.data's document split, token cache and packing, and a
    byte-level BPE from hybridlm.tokenizer trained on the train split only (cached by corpus digest)."""
    name = "lm"

    def __init__(self, corpus: str = "stdlib", vocab_size: int = 512, seq_len: int = 128,
                 eval_windows: int = 128, val_fraction: float = 0.05, cache_dir: str | None = None):
        self.corpus_spec, self.vocab_size, self.seq_len = corpus, vocab_size, seq_len
        self.eval_windows, self.val_fraction, self.cache_dir = eval_windows, val_fraction, cache_dir
        self._data = None
        self._path = None

    def options(self) -> dict:
        return {"corpus": self.corpus_spec, "vocab_size": self.vocab_size, "seq_len": self.seq_len,
                "eval_windows": self.eval_windows, "val_fraction": self.val_fraction}

    def __getstate__(self):
        # worker processes reopen the memory-mapped token files instead of receiving a copy
        return {**self.__dict__, "_data": None}

    def prepare(self):
        """Train (or load) the tokenizer and tokenise the corpus once; both cached on disk."""
        from ..data import Corpus, default_cache_dir, open_tokens, tokenize_corpus
        from ..tokenizer import load_tokenizer, train_tokenizer
        if self._data is None and self._path is not None:
            self._data = open_tokens(self._path)
        if self._data is not None:
            return self._data
        corpus = Corpus(self.corpus_spec, val_fraction=self.val_fraction)
        root = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        tok_dir = root / "ablate-tokenizers" / f"bpe{self.vocab_size}-{corpus.scan()['digest'][:24]}"
        if (tok_dir / "tokenizer.json").exists():
            tok = load_tokenizer(tok_dir)
        else:
            # the tokenizer sees training documents only, so validation text stays unseen
            tok = train_tokenizer(corpus.split("train"), self.vocab_size, show_progress=False)
            tok.save(tok_dir)
        self._data = tokenize_corpus(corpus, tok, cache_dir=self.cache_dir, progress=False)
        self._path = self._data.path
        self.vocab_size = tok.vocab_size
        return self._data

    def stream(self, batch_size: int, seed: int):
        """Packed training windows in the trainer's seeded order (``SampleOrder``)."""
        from ..data import PackedSequences, SampleOrder
        packed = PackedSequences(self.prepare().train, self.seq_len)
        order = SampleOrder(len(packed), seed)
        i = 0
        while True:
            yield packed.batch([order[j] for j in range(i, i + batch_size)])
            i += batch_size

    @torch.no_grad()
    def evaluate(self, model, n: int | None = None, seed: int = 0, batch_size: int = 32, device="cpu") -> dict:
        """Mean next-token cross-entropy (nats) over a fixed, evenly spaced set of validation windows
        (``eval_windows``; the sweep's ``eval_size`` does not apply)."""
        from ..data import PackedSequences, evenly_spaced
        packed = PackedSequences(self.prepare().val, self.seq_len)
        if len(packed) == 0:
            raise ValueError(f"the validation split of corpus {self.corpus_spec!r} has no window of "
                             f"{self.seq_len + 1} tokens; lower seq_len or raise val_fraction")
        idx = evenly_spaced(len(packed), self.eval_windows)
        total = count = 0.0
        for i in range(0, len(idx), batch_size):
            x, t = packed.batch(idx[i:i + batch_size])
            ce = model.loss(x.to(device), t.to(device))["ce"]
            total += float(ce) * t.numel()
            count += t.numel()
        return {"val_loss": total / count}


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
    return {k: v for k, v in asdict(task).items() if k != "vocab"}


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


def run_job(job: Job) -> tuple[list[dict], list[dict]]:
    """Train one variant on one task from seed ``job.seed``, evaluate it; returns (metric rows, curve)."""
    if job.threads:
        torch.set_num_threads(job.threads)
    from ..model import HybridLM
    from ..optim import build_optimizer, lr_factor
    t0 = time.perf_counter()
    cfg = job.cfg
    torch.manual_seed(job.seed)
    model = HybridLM(cfg).init_weights(job.seed).to(job.device)
    t = job.train
    opt = build_optimizer(model, t.lr, t.weight_decay, t.betas)
    stream = job.task_obj.stream(t.batch_size, job.seed)
    curve, losses = [], []
    model.train()
    for step in range(t.steps):
        for g in opt.param_groups:
            g["lr"] = t.lr * lr_factor(step, t.warmup, t.steps, t.min_lr_ratio)
        x, y = _xy(next(stream))
        out = model.loss(x.to(job.device), y.to(job.device))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        losses.append(float(out["ce"].detach()))
        if step % max(1, t.steps // 50) == 0 or step == t.steps - 1:
            curve.append({"step": step, "loss": losses[-1]})
    model.eval()
    metrics = job.task_obj.evaluate(model, job.eval_size, seed=0, device=job.device)
    seconds = time.perf_counter() - t0
    tail = losses[-max(1, len(losses) // 10):]
    base = {"variant": job.variant, "seed": job.seed, "task": job.task, "run_hash": job.run_hash,
            "layout": cfg.pattern, "params": count_params(cfg), "active_params": count_params(cfg, True),
            "steps": t.steps, "tokens": t.steps * t.batch_size * job.task_obj.seq_len,
            "seconds": round(seconds, 2), "train_loss": round(sum(tail) / len(tail), 5)}
    rows = [{**base, "metric": k, "value": v} for k, v in metrics.items()]
    keys = {k: base[k] for k in ("variant", "seed", "task", "run_hash")}
    return rows, [{**keys, **c} for c in curve]


def _xy(batch):
    """A synthetic ``Batch`` or an LM (inputs, targets) pair -> (inputs, targets)."""
    if isinstance(batch, tuple):
        return batch
    return batch.input_ids, batch.targets


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
    for seed in sorted(set().union(*task_seeds.values())):
        for tname, opts in spec.tasks.items():
            if seed not in task_seeds[tname]:
                continue
            train = Train(**{**asdict(spec.train), **{k: opts[k] for k in ("steps", "batch_size", "lr", "warmup")
                                                      if k in opts}})
            eval_size = opts.get("eval_size", 512)
            names = opts.get("variants") or [v.name for v in spec.variants]
            for vname in names:
                cfg = matched[tname][vname]["config"]
                h = _run_hash(asdict(cfg), tname, task_options(tasks[tname]), train, seed, eval_size)
                jobs.append(Job(vname, seed, tname, tasks[tname], cfg, train, eval_size, h, device))
    return jobs, matched


# ---- results files -----------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_csv(path: Path, fields: list[str], rows: list[dict]):
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


# ---- statistics and claims ---------------------------------------------------------------------
# two-sided 95% Student-t quantiles for 1..30 degrees of freedom (the value at 30 beyond: conservative)
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]
_EXPECT = {">": 1, ">=": 1, "<": -1, "<=": -1, "==": 0}


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def welch_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(difference of means a - b, lower, upper) of its 95% Welch interval; nan bounds with < 2 seeds."""
    d = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return d, float("nan"), float("nan")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return d, d, d
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    q = _T95[min(int(df), len(_T95)) - 1] if df >= 1 else _T95[0]
    return d, d - q * se, d + q * se


def verdict(claim: Claim, a: list[float], b: list[float]) -> tuple[str, float, float, float]:
    """'confirmed', 'refuted' or 'inconclusive' from the 95% interval of mean(a) - mean(b).

    ``>``: confirmed when the interval lies above 0, refuted when it lies at or below 0.
    ``>=`` (a matches or beats b within ``margin``): confirmed above -margin, refuted below it.
    ``==`` (within ``margin``): confirmed inside (-margin, margin), refuted wholly outside.
    ``<``, ``<=`` mirror ``>``, ``>=`` (for metrics where lower is better, such as a loss)."""
    d, lo, hi = welch_interval(a, b)
    if math.isnan(lo):
        return "inconclusive", d, lo, hi
    sign, m = _EXPECT[claim.expect], claim.margin
    if sign == 0:
        if -m < lo and hi < m:
            return "confirmed", d, lo, hi
        return ("refuted" if lo > m or hi < -m else "inconclusive"), d, lo, hi
    lo_s, hi_s = (lo, hi) if sign > 0 else (-hi, -lo)       # interval of sign * (a - b)
    bound = 0.0 if claim.expect in (">", "<") else -m
    if lo_s > bound:
        return "confirmed", d, lo, hi
    if (hi_s <= bound) if claim.expect in (">", "<") else (hi_s < bound):
        return "refuted", d, lo, hi
    return "inconclusive", d, lo, hi


def _values(rows: list[dict]) -> dict[tuple, list[float]]:
    """(variant, task, metric) -> one value per seed."""
    out: dict[tuple, list[float]] = {}
    for r in rows:
        out.setdefault((r["variant"], r["task"], r["metric"]), []).append(float(r["value"]))
    return out


# ---- report ------------------------------------------------------------------------------------
_LOWER_IS_BETTER = ("loss",)


def _fmt(xs: list[float], digits: int = 3) -> str:
    m, s = mean_std(xs)
    if math.isnan(s):
        return f"{m:.{digits}f} (n=1)"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _metric_columns(rows: list[dict], spec: Spec) -> list[tuple[str, str]]:
    cols = []
    for tname in spec.tasks:
        metrics = []
        for r in rows:
            if r["task"] == tname and r["metric"] not in metrics:
                metrics.append(r["metric"])
        # the headline metrics only: token accuracy and LM loss (seq_acc stays in the CSV)
        shown = [m for m in metrics if not m.startswith("seq_acc")] or metrics
        cols += [(tname, m) for m in shown]
    return cols


def tables_md(spec: Spec, rows: list[dict], matched: dict) -> str:
    vals = _values(rows)
    lines = []
    any_task = next(iter(matched))
    ref = spec.match_reference
    lines.append(f"### Variants (parameters matched to `{ref}` by `{spec.match_field}`)\n")
    lines.append("| variant | layout | " + spec.match_field + " | non-embedding params | active | vs reference |")
    lines.append("|---|---|---:|---:|---:|---:|")
    for v in spec.variants:
        m = matched[any_task][v.name]
        lines.append(f"| {v.name} | `{m['config'].pattern}` | {m['field_value']} | {m['params']:,} | "
                     f"{m['active_params']:,} | {m['deviation']:+.1%} ({m['matched_on']}) |")
    lines.append("")
    cols = _metric_columns(rows, spec)
    if cols:
        lines.append("### Results (mean ± std over seeds)\n")
        header = [f"{t} {m}" + (" ↓" if any(x in m for x in _LOWER_IS_BETTER) else " ↑") for t, m in cols]
        lines.append("| variant | " + " | ".join(header) + " |")
        lines.append("|---|" + "---:|" * len(cols))
        best = {}
        for t, m in cols:
            means = {v.name: statistics.fmean(vals[(v.name, t, m)]) for v in spec.variants if (v.name, t, m) in vals}
            if means:
                pick = min if any(x in m for x in _LOWER_IS_BETTER) else max
                best[(t, m)] = pick(means.values())
        for v in spec.variants:
            cells = []
            for t, m in cols:
                xs = vals.get((v.name, t, m))
                if not xs:
                    cells.append("–")
                    continue
                c = _fmt(xs)
                cells.append(f"**{c}**" if statistics.fmean(xs) == best[(t, m)] else c)
            lines.append(f"| {v.name} | " + " | ".join(cells) + " |")
        budget, seeds = {}, {}
        for r in rows:
            budget[r["task"]] = (r["steps"], r["tokens"])
            seeds.setdefault(r["task"], set()).add(int(r["seed"]))
        lines.append("")
        lines.append("Per run: " + "; ".join(f"{t}: seeds {sorted(seeds[t])}, {int(s)} steps, {int(n):,} tokens"
                                            for t, (s, n) in budget.items()) +
                     ". Bold: best mean in the column.\n")
    if spec.claims:
        lines.append("### Claims (95% Welch interval of mean(a) − mean(b) over seeds)\n")
        lines.append("| id | claim | test | a − b | 95% interval | verdict |")
        lines.append("|---|---|---|---:|---|---|")
        for c in spec.claims:
            a, b = vals.get((c.a, c.task, c.metric)), vals.get((c.b, c.task, c.metric))
            test = f"{c.task} {c.metric}: `{c.a}` {c.expect} `{c.b}`" + (f" (margin {c.margin})" if c.margin else "")
            if not a or not b:
                lines.append(f"| {c.id} | {c.text} | {test} | – | – | not run |")
                continue
            v, d, lo, hi = verdict(c, a, b)
            iv = "–" if math.isnan(lo) else f"[{lo:+.3f}, {hi:+.3f}]"
            lines.append(f"| {c.id} | {c.text} | {test} | {d:+.3f} | {iv} | **{v}** |")
        lines.append("")
    return "\n".join(lines)


def plot_results(spec: Spec, rows: list[dict], curves: list[dict], out: Path) -> list[Path]:
    """One PNG per task (metric per variant, a dot per seed), passkey accuracy against context
    length, and the training-loss curves; matplotlib imported here (an optional extra)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    vals = _values(rows)
    written = []
    names = [v.name for v in spec.variants]
    for tname in spec.tasks:
        cols = [m for t, m in _metric_columns(rows, spec) if t == tname]
        if not cols:
            continue
        at = [m for m in cols if "@" in m]
        if at:   # accuracy against evaluation length, one line per variant
            fig, ax = plt.subplots(figsize=(6, 4))
            lengths = [int(m.split("@")[1]) for m in at]
            for i, vn in enumerate(names):
                ys = [vals.get((vn, tname, m)) for m in at]
                if all(ys):
                    means = [statistics.fmean(y) for y in ys]
                    errs = [mean_std(y)[1] if len(y) > 1 else 0 for y in ys]
                    ax.errorbar(lengths, means, yerr=errs, marker="o", capsize=3, label=vn, color=f"C{i % 10}")
            ax.set_ylim(-0.03, 1.03)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel(at[0].split("@")[0])
            ax.set_title(f"{tname}: accuracy vs context (trained at {build_task(spec, tname).seq_len})")
            ax.legend(fontsize=7)
        else:
            fig, axes = plt.subplots(1, len(cols), figsize=(max(6, 1 + 0.8 * len(names)) * len(cols), 4),
                                     squeeze=False)
            for ax, m in zip(axes[0], cols):
                present = [vn for vn in names if (vn, tname, m) in vals]
                for i, vn in enumerate(present):
                    ys = vals[(vn, tname, m)]
                    ax.bar(i, statistics.fmean(ys), color=f"C{names.index(vn) % 10}", alpha=0.6)
                    ax.scatter([i] * len(ys), ys, color="k", s=10, zorder=3)
                ax.set_xticks(range(len(present)), present, rotation=40, ha="right", fontsize=8)
                ax.set_ylabel(m)
                ax.set_title(f"{tname}: {m} (bars: mean; dots: seeds)")
                if "acc" in m:
                    ax.set_ylim(0, 1.03)
                if "loss" in m:
                    lo = min(min(vals[(vn, tname, m)]) for vn in present)
                    hi = max(max(vals[(vn, tname, m)]) for vn in present)
                    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
        fig.tight_layout()
        path = out / f"{spec.name}_{tname}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if curves:
        tasks = [t for t in spec.tasks if any(c["task"] == t for c in curves)]
        fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
        for ax, tname in zip(axes[0], tasks):
            for i, vn in enumerate(names):
                pts: dict[int, list[float]] = {}
                for c in curves:
                    if c["task"] == tname and c["variant"] == vn:
                        pts.setdefault(int(c["step"]), []).append(float(c["loss"]))
                if pts:
                    steps = sorted(pts)
                    ax.plot(steps, [statistics.fmean(pts[s]) for s in steps], label=vn, color=f"C{i % 10}")
            ax.set_title(f"{tname}: training loss (mean over seeds)")
            ax.set_xlabel("step")
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{spec.name}_curves.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ---- claim (e): memory and decode speed against context ----------------------------------------
def context_scaling(spec: Spec, device: str) -> list[dict]:
    """Cache bytes (allocated, not estimated) and prefill / decode throughput at growing context for the
    layouts in ``[context]`` (Jamba sec. 3.2: throughput against context; Table 1: only attention layers
    keep a cache that grows with context). Each figure is the best of ``repeats`` measurements, since
    on a shared CPU the slowdowns come from other processes, not from the model."""
    from ..generate import decode_step, prefill
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
        g = torch.Generator().manual_seed(0)
        warm = model.new_cache(1, 2 * tokens)          # first calls pay one-off costs (allocator, kernel load)
        decode_step(model, warm, prefill(model, warm, torch.ones(1, tokens, dtype=torch.long, device=device))
                    .argmax(-1))
        for n in lengths:
            ids = torch.randint(spec.vocab.first, cfg.vocab_size, (1, n), generator=g).to(device)
            best_prefill = best_decode = float("inf")
            for _ in range(repeats):
                cache = model.new_cache(1, n + tokens)
                t0 = time.perf_counter()
                logits = prefill(model, cache, ids)
                t1 = time.perf_counter()
                tok = logits.argmax(-1)
                for _ in range(tokens):
                    tok = decode_step(model, cache, tok).argmax(-1)
                t2 = time.perf_counter()
                best_prefill, best_decode = min(best_prefill, t1 - t0), min(best_decode, t2 - t1)
            nb = cache.nbytes()
            rows.append({"variant": vn, "layout": cfg.pattern, "context": n, "cache_bytes": nb["total"],
                         "kv_bytes": nb["kv"], "prefill_tok_s": n / best_prefill, "decode_tok_s": tokens / best_decode,
                         "threads": torch.get_num_threads()})
    return rows


def context_md(rows: list[dict]) -> str:
    from ..summary import fmt_bytes
    lengths = sorted({int(r["context"]) for r in rows})
    names = list(dict.fromkeys(r["variant"] for r in rows))
    get = {(r["variant"], int(r["context"])): r for r in rows}
    cols = [("cache", "cache_bytes"), ("decode tok/s", "decode_tok_s"), ("prefill tok/s", "prefill_tok_s")]
    threads = rows[0].get("threads", "?")
    out = [f"### Context scaling (batch 1, fp32, untrained weights, {threads} torch thread(s); cache bytes as "
           f"allocated; tokens/s: best of the repeats)\n",
           "| context | " + " | ".join(f"{label}: {vn}" for label, _ in cols for vn in names) + " |",
           "|---:|" + "---:|" * (len(cols) * len(names))]
    for n in lengths:
        cells = []
        for label, k in cols:
            for vn in names:
                x = float(get[(vn, n)][k])
                cells.append(fmt_bytes(x) if k == "cache_bytes" else f"{x:,.0f}")
        out.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot_context(rows: list[dict], path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for vn in names:
        rs = sorted((r for r in rows if r["variant"] == vn), key=lambda r: int(r["context"]))
        x = [int(r["context"]) for r in rs]
        axes[0].plot(x, [float(r["cache_bytes"]) / 2 ** 20 for r in rs], marker="o", label=vn)
        axes[1].plot(x, [float(r["decode_tok_s"]) for r in rs], marker="o", label=vn)
    for ax, title in zip(axes, ("inference cache (MiB)", "decode tokens/s (batch 1)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
           seeds: str = "", dry_run: bool = False) -> int:
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
        dry_run: print the matched variants and the runs to do, train nothing

    Examples:
        hybridlm ablate examples/ablation.toml --out results --workers 2
        hybridlm ablate examples/ablation.toml --dry-run
    """
    wall0 = time.perf_counter()
    s = load_spec(spec)
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
    run_seconds = sum(float(r["seconds"]) for r in {(r["variant"], r["seed"], r["task"]): r for r in rows}.values())
    header = [f"## Ablation `{s.name}`\n",
              f"- command: `hybridlm ablate {spec} --out {out} --workers {workers}`" +
              (f" --seeds {seeds}" if seeds else ""),
              f"- hardware: {_hardware(dev, workers, threads)}",
              f"- this invocation: {wall:.0f} s wall ({len(todo)} runs trained, {workers} worker(s)"
              f"{', context scaling measured' if ctx_new else ''}); "
              f"sum of all {len(jobs)} runs' own times: {run_seconds:.0f} s", "", ""]
    body = tables_md(s, rows, matched) + ("\n" + context_md(ctx) if ctx else "")
    (outdir / f"{s.name}_tables.md").write_text("\n".join(header) + body)
    # plots are redrawn only when something changed (matplotlib is slow on a busy CPU)
    if rows and (todo or not (outdir / f"{s.name}_curves.png").exists()):
        plot_results(s, rows, curves, outdir)
    if ctx and (ctx_new or not (outdir / f"{s.name}_context.png").exists()):
        plot_context(ctx, outdir / f"{s.name}_context.png")
    print(f"wrote {csv_path}, {outdir / (s.name + '_tables.md')} and plots ({wall:.0f} s)", file=sys.stderr)
    return 0
