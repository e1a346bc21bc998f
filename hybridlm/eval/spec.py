"""The ablation spec: what a sweep trains and which claims it checks (``examples/ablation.toml`` is the
commented reference; ``examples/ablation_quick.toml`` the seconds-long version CI runs).

A spec names the base model (HybridConfig fields), the variants (layouts and field changes), the tasks
with their budgets, the seeds and the claims. A task may sweep one of its options
(``sweep = "num_pairs"`` with ``num_pairs = [16, 32, 64]``): it expands into one task per value, named
``mqar-16``, ``mqar-32``, ... that claims can name, and the report plots the metric against the value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .stats import EXPECT
from .tasks import Vocab

# keys of a [tasks.NAME] table that configure the run rather than the task
RUNNER_KEYS = {"steps", "batch_size", "micro_batch", "lr", "warmup", "eval_every", "variants", "eval_size",
               "seeds", "sweep"}

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
    micro_batch: int = 0          # sequences per forward (0: the whole batch); batch_size / micro_batch accumulated
    dtype: str = "auto"           # bf16 autocast where the CPU has fast bf16 matmuls, else fp32 (hybridlm train's rule)
    eval_every: int = 0           # evaluate every N steps for the validation curve (0: at the end only)


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
    sweeps: dict[str, tuple[str, dict[str, object]]] = field(default_factory=dict)  # base -> (option, {task: value})

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
        if claims[-1].expect not in EXPECT:
            raise ValueError(f"claim {claims[-1].id}: expect must be one of {list(EXPECT)}, got {c['expect']!r}")
    tasks, sweeps = expand_sweeps(d["tasks"])
    spec = Spec(name=d.get("name", name), seeds=list(d.get("seeds", [0])), model=dict(d.get("model", {})),
                variants=variants, tasks=tasks, sweeps=sweeps, train=Train(**train),
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
            raise ValueError(f"claim {c.id} is about task {c.task!r}, which the spec does not run (its tasks: "
                             f"{', '.join(spec.tasks)})")
        runs = spec.tasks[c.task].get("variants")
        for vn in (c.a, c.b):
            if runs and vn not in runs:
                raise ValueError(f"claim {c.id} compares variant {vn!r} on task {c.task!r}, which does not run it; "
                                 f"add it to [tasks.{c.task.split('-')[0]}] variants")
    return spec


def expand_sweeps(tasks: dict) -> tuple[dict[str, dict], dict]:
    """``[tasks.X]`` with ``sweep = "OPTION"`` and a list of values -> one task per value (``X-VALUE``,
    ``kind`` X unless set) and {X: (OPTION, {task name: value})}."""
    out, sweeps = {}, {}
    for name, opts in tasks.items():
        opts = dict(opts)
        key = opts.pop("sweep", None)
        if key is None:
            out[name] = opts
            continue
        values = opts.get(key)
        if not isinstance(values, list) or not values:
            raise ValueError(f"[tasks.{name}] sweeps {key!r}, so {key} must be a non-empty list of values, "
                             f"got {values!r}")
        opts.setdefault("kind", name)
        sweeps[name] = (key, {})
        for v in values:
            out[f"{name}-{v}"] = {**opts, key: v}
            sweeps[name][1][f"{name}-{v}"] = v
    return out, sweeps


def load_spec(path: str | Path) -> Spec:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"spec {path} does not exist; see examples/ablation.toml for the format")
    return parse_spec(_read_toml(path), name=path.stem)


