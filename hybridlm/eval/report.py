"""The ablation report: the markdown tables (variants, results, claim verdicts, context scaling) and the
plots (a metric per variant with a dot per seed, accuracy against a swept task option, validation and
training curves, cache and speed against context). matplotlib is imported where a plot is drawn."""
from __future__ import annotations

import math
import statistics
from pathlib import Path

from .spec import Spec
from .stats import compare, decide, mean_std, stability

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
        lines += claims_md(spec, rows)
    return "\n".join(lines)


def by_seed(rows: list[dict]) -> dict[tuple, dict[int, float]]:
    """(variant, task, metric) -> {seed: value}."""
    out: dict[tuple, dict[int, float]] = {}
    for r in rows:
        out.setdefault((r["variant"], r["task"], r["metric"]), {})[int(r["seed"])] = float(r["value"])
    return out


def claim_results(spec: Spec, rows: list[dict]) -> list[dict]:
    """Per claim: its interval, verdict, the seeds whose removal flips it, and the budget it rests on."""
    vals = by_seed(rows)
    steps = {r["task"]: int(r["steps"]) for r in rows}
    out = []
    for c in spec.claims:
        a, b = vals.get((c.a, c.task, c.metric)), vals.get((c.b, c.task, c.metric))
        if not a or not b:
            out.append({"claim": c, "verdict": "not run"})
            continue
        iv = compare(a, b)
        out.append({"claim": c, "interval": iv, "verdict": decide(c.expect, c.margin, iv),
                    "flips": stability(c.expect, c.margin, a, b), "steps": steps[c.task]})
    return out


def claims_md(spec: Spec, rows: list[dict]) -> list[str]:
    lines = ["### Claims\n",
             "Each verdict rests on the paired differences of the two variants over the seeds they share (same "
             "seed: same data order and initialisation scheme); *seeds* and *steps* say how many. ✱ marks a "
             "Welch (unpaired) interval. The last column names the seeds whose removal alone would change the "
             "verdict.\n",
             "| id | claim | test | seeds × steps | a − b | 95% interval | verdict | with one seed fewer |",
             "|---|---|---|---|---:|---|---|---|"]
    for r in claim_results(spec, rows):
        c = r["claim"]
        test = f"{c.task} {c.metric}: `{c.a}` {c.expect} `{c.b}`" + (f" (margin {c.margin:g})" if c.margin else "")
        if r["verdict"] == "not run":
            lines.append(f"| {c.id} | {c.text} | {test} | – | – | – | not run | – |")
            continue
        iv = r["interval"]
        ci = "–" if math.isnan(iv.lo95) else f"[{iv.lo95:+.3f}, {iv.hi95:+.3f}]" + ("" if iv.paired else " ✱")
        flips = "stable" if not r["flips"] else "flips without seed " + ", ".join(map(str, r["flips"]))
        lines.append(f"| {c.id} | {c.text} | {test} | {iv.n} × {r['steps']} | {iv.d:+.3f} | {ci} | "
                     f"**{r['verdict']}** | {flips} |")
    lines.append("")
    return lines


def _values(rows: list[dict]) -> dict[tuple, list[float]]:
    """(variant, task, metric) -> one value per seed."""
    return {k: list(v.values()) for k, v in by_seed(rows).items()}


def _errorbars(ax, x, names, get):
    """One line per variant: mean and std over seeds of ``get(variant, x)`` (a list of values or None)."""
    for i, vn in enumerate(names):
        ys = [get(vn, v) for v in x]
        if all(ys):
            ax.errorbar(x, [statistics.fmean(y) for y in ys], yerr=[mean_std(y)[1] if len(y) > 1 else 0 for y in ys],
                        marker="o", capsize=3, label=vn, color=f"C{i % 10}")


def plot_results(spec: Spec, rows: list[dict], curves: list[dict], out: Path) -> list[Path]:
    """PNGs: per task a metric per variant (bars: mean, dots: seeds); per swept task the accuracy against
    the swept option; per multi-length task accuracy against context; the curves."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    vals = _values(rows)
    written = []
    names = [v.name for v in spec.variants]

    def save(fig, stem):
        fig.tight_layout()
        path = out / f"{spec.name}_{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    swept = {t for _, (_, tasks) in spec.sweeps.items() for t in tasks}
    for base, (option, tasks) in spec.sweeps.items():
        metrics = [m for t, m in _metric_columns(rows, spec) if t in tasks]
        for m in dict.fromkeys(metrics):
            fig, ax = plt.subplots(figsize=(6, 4))
            by_value = {v: t for t, v in tasks.items()}
            _errorbars(ax, sorted(by_value), names, lambda vn, v: vals.get((vn, by_value[v], m)))
            ax.set_xscale("log", base=2)
            ax.set_xlabel(option)
            ax.set_ylabel(m)
            if "acc" in m:
                ax.set_ylim(-0.03, 1.03)
            ax.set_title(f"{base}: {m} vs {option} (mean ± std over seeds)")
            ax.legend(fontsize=7)
            save(fig, base if m == metrics[0] else f"{base}_{m}")
    for tname in spec.tasks:
        cols = [m for t, m in _metric_columns(rows, spec) if t == tname]
        if not cols or tname in swept:
            continue
        at = [m for m in cols if "@" in m]
        if at:   # accuracy against evaluation length, one line per variant
            fig, ax = plt.subplots(figsize=(6, 4))
            # "acc@64": at 64 tokens of context; "acc@pairs=16": with that task option at 16
            by_x = {int(m.split("@")[1].split("=")[-1]): m for m in at}
            option = at[0].split("@")[1].split("=")[0] if "=" in at[0] else None
            _errorbars(ax, sorted(by_x), names, lambda vn, x: vals.get((vn, tname, by_x[x])))
            ax.set_ylim(-0.03, 1.03)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(option or "context length (tokens)")
            ax.set_ylabel(at[0].split("@")[0])
            ax.set_title(f"{tname}: accuracy vs {option or 'context'} (trained at "
                         f"{spec.tasks[tname].get('seq_len', '?')} tokens)", fontsize=9)
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
        save(fig, tname)
    if curves:
        # per task: the validation metric where it was tracked (against tokens seen), else the training loss
        tasks = [t for t in spec.tasks if t not in swept and any(c["task"] == t for c in curves)]
        fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(5 * max(1, len(tasks)), 4), squeeze=False)
        for ax, tname in zip(axes[0], tasks):
            mine = [c for c in curves if c["task"] == tname]
            key = "val" if any(c.get("val") not in (None, "") for c in mine) else "loss"
            for i, vn in enumerate(names):
                pts: dict[int, list[float]] = {}
                for c in mine:
                    if c["variant"] == vn and c.get(key) not in (None, ""):
                        pts.setdefault(int(c["tokens"] if key == "val" else c["step"]), []).append(float(c[key]))
                if pts:
                    xs = sorted(pts)
                    ax.plot(xs, [statistics.fmean(pts[x]) for x in xs], label=vn, color=f"C{i % 10}",
                            marker="." if key == "val" else None)
            metric = next((r["metric"] for r in rows if r["task"] == tname), "val")
            ax.set_title(f"{tname}: " + (f"validation {metric}" if key == "val" else "training loss") +
                         " (mean over seeds)", fontsize=9)
            ax.set_xlabel("tokens" if key == "val" else "step")
            if key == "loss" or "loss" in metric:
                ax.set_yscale("log")
            ax.legend(fontsize=7)
        save(fig, "curves")
    return written


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
    return "\n".join(out) + "\n" + context_verdict(rows)


def context_verdict(rows: list[dict]) -> str:
    """Claim (e), the efficiency advantage grows with context: for each variant against the first
    (the reference, e.g. all-attention), the ratios of cache bytes and of decode and prefill speed at the
    shortest and the longest context. A measurement of one model each, not a seeded experiment: it
    is 'confirmed' when the cache and decode-speed advantages both grow from the shortest to the
    longest context, 'refuted' when either shrinks."""
    lengths = sorted({int(r["context"]) for r in rows})
    names = list(dict.fromkeys(r["variant"] for r in rows))
    if len(lengths) < 2 or len(names) < 2:
        return ""
    get = {(r["variant"], int(r["context"])): r for r in rows}
    ref, lo, hi = names[0], lengths[0], lengths[-1]

    def ratio(vn, n, k, inverse=False):
        a, b = float(get[(vn, n)][k]), float(get[(ref, n)][k])
        return b / a if inverse else a / b
    out = [f"\nAdvantage over `{ref}` at {lo:,} → {hi:,} tokens of context (cache: {ref}'s bytes / the "
           f"variant's; speeds: the variant's / {ref}'s):\n",
           "| variant | cache ratio | decode speed ratio | prefill speed ratio | grows with context? |",
           "|---|---|---|---|---|"]
    for vn in names[1:]:
        cache = [ratio(vn, n, "cache_bytes", inverse=True) for n in (lo, hi)]
        dec = [ratio(vn, n, "decode_tok_s") for n in (lo, hi)]
        pre = [ratio(vn, n, "prefill_tok_s") for n in (lo, hi)]
        grows = "confirmed" if cache[1] > cache[0] and dec[1] > dec[0] else "refuted"
        out.append(f"| {vn} | {cache[0]:.1f}x → {cache[1]:.1f}x | {dec[0]:.2f}x → {dec[1]:.2f}x | "
                   f"{pre[0]:.2f}x → {pre[1]:.2f}x | **{grows}** |")
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
