"""The audit report: PNG plots (matplotlib, Agg) and a self-contained `report.html` beside them.

Everything is drawn from the audit.json dict (plus the model directories' metrics.json), so a
report can be re-drawn from a finished audit:

- `curves.png`: best attack over recipes and seeds at each budget, protected vs scratch vs original;
- `scatter.png`: per recipe (seed 0), the protected model's best value vs scratch's;
- `search.png` (search mode): best score (mean over budgets) so far vs trial number;
- `original.png`: original-domain test metric of the protected model vs its source.

"Best" follows the audit's `attacker_goal`: the highest accuracy, or the lowest diffusion MSE;
every plot names the metric and the direction. A `samples.json` in the audit directory (diffusion:
sample grids and the judge's "recognised as restricted" fraction) adds a section.
"""

from __future__ import annotations

import html
import json
import string
from pathlib import Path
from typing import Any

from sophon_ray.audit.verdict import budgets_line, step_equivalents, steps_text, unit_of
from sophon_ray.config import Recipe, recipe_label
from sophon_ray.tasks.base import ACCURACY, Metric, metric_named

COLORS = {"protected": "tab:red", "scratch": "tab:gray", "original": "tab:blue"}


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _index(trial_id: str) -> str:
    return trial_id.rsplit("-", 2)[1]  # "protected-r07-s0" -> "r07"


def _metric(audit: dict[str, Any] | None) -> Metric:
    """The audit's metric (accuracy where there is no audit dict)."""
    return metric_named(audit["metric"]) if audit else ACCURACY


def _best(audit: dict[str, Any], values: Any) -> float | None:
    """The attacker's best of `values` (None entries = diverged are skipped)."""
    finite = [v for v in values if v is not None]
    return _metric(audit).best(finite) if finite else None


def _score(values: Any) -> float | None:
    """A trial's score: the mean of its finite values over budgets (what the planner ranks and the
    search optimises, `trial.py`); None when every value diverged."""
    finite = [v for v in values if v is not None]
    return sum(finite) / len(finite) if finite else None


def per_recipe(audit: dict[str, Any], seed: int = 0, stat: str = "best") -> dict[str, dict[str, Any]]:
    """{"r07": {"recipe": {...}, "<subject>": value}} over ok trials of one seed, in plan order.

    Args:
        audit: the audit.json dict.
        seed: which seed's trials (0 = the explore trials).
        stat: "best" (the attacker's best value at any budget) or "score" (the mean over budgets).
    Returns:
        Per recipe index, its recipe and each subject's `stat` over budgets.
    """
    reduce = {"best": lambda values: _best(audit, values), "score": _score}[stat]
    out: dict[str, dict[str, Any]] = {}
    for t in audit["trials"]:
        if t["seed"] != seed:
            continue
        row = out.setdefault(_index(t["id"]), {"recipe": t["recipe"]})
        value = reduce(list(t["curve"].values())) if t["status"] == "ok" else None
        if value is not None:
            row[t["subject"]] = value
    return out


def save_figure(fig: Any, path: Path) -> str:
    """Save a figure as a PNG at `path` and close it; returns the file name."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path.name


def plot_curves(audit: dict[str, Any], path: Path) -> str:
    """Worst-case curves per subject over the budgets; returns the file name."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = audit["budgets"]
    for subject, curve in audit["worst_case"].items():
        ax.plot(budgets, [curve.get(str(b), float("nan")) for b in budgets], "o-", label=subject,
                color=COLORS.get(subject))
    ax.set_xscale("log")
    ax.minorticks_off()
    unit, steps = unit_of(audit), step_equivalents(audit)
    ax.set_xticks(budgets, [str(b) + (f"\n{steps_text(steps[str(b)], '≈')}" if str(b) in steps else "") for b in budgets])
    xlabel = f"fine-tuning budget ({unit}" + ("; ≈ optimizer steps below each" if steps else "") + ")"
    ax.set(xlabel=xlabel, ylabel=f"best restricted test {audit['metric']}",
           title=f"Best attack over all recipes and seeds\n({_metric(audit).direction} = better for the attacker)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def plot_scatter(rows: dict[str, dict[str, Any]], path: Path, audit: dict[str, Any] | None = None) -> str:
    """Per recipe, protected best vs scratch best, marker by strategy; returns the file name."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    markers = {"direct-all": "o", "direct-FC": "s", "initFC-all": "^", "initFC-FC": "D", "renorm-all": "P",
               "bnrecal-all": "X", "all": "o", "up": "^", "down": "v"}
    pts_all: list[float] = []
    for strategy, marker in markers.items():
        pts = [(r["scratch"], r["protected"]) for r in rows.values()
               if r["recipe"]["strategy"] == strategy and "scratch" in r and "protected" in r]
        if pts:
            ax.scatter(*zip(*pts), marker=marker, label=strategy, alpha=0.7)
            pts_all += [v for p in pts for v in p]
    m = _metric(audit)
    metric, direction = m.name, m.direction
    if m.ceiling is not None:
        lo, hi = 0.0, m.ceiling + 0.02
    else:  # MSE: fit the data, with a margin
        lo, hi = (min(pts_all, default=0.0), max(pts_all, default=1.0))
        pad = 0.05 * (hi - lo or 1.0)
        lo, hi = max(lo - pad, 0.0), hi + pad
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="protected = scratch")
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel=f"scratch: best {metric}", ylabel=f"protected: best {metric}",
           title=f"Per recipe (seed 0; {direction} = better for the attacker)")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_search(rows: dict[str, dict[str, Any]], path: Path, audit: dict[str, Any] | None = None) -> str:
    """Best score so far vs search trial number, protected and scratch; returns the file name.

    `rows` are `per_recipe(audit, stat="score")`: the search optimises the mean over budgets, and
    the best value at any budget ties most recipes at the ceiling (flat on digits)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    m = _metric(audit)
    for subject in ("protected", "scratch"):
        xs, ys, best = [], [], m.worst
        for n, r in enumerate(rows.values(), 1):
            if subject in r:
                best = m.better(best, r[subject])
                xs.append(n)
                ys.append(best)
        ax.step(xs, ys, where="post", label=subject, color=COLORS[subject])
    ax.set(xlabel="search trial (recipe) number",
           ylabel=f"best score so far\n(mean restricted {m.name} over budgets)",
           title=f"Adversarial search progress\n({m.direction} = better for the attacker)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def original_accuracy(model_dir: str | None, source_dir: str | None, metric: str = "accuracy") -> dict[str, float]:
    """Original-domain test metric (`original_test_<metric>`) of the protected model and its source,
    from metrics.json files."""

    def read(d: str | None) -> dict[str, Any]:
        f = Path(d) / "metrics.json" if d else None
        return json.loads(f.read_text()) if f and f.is_file() else {}

    m, s = read(model_dir), read(source_dir)
    key = f"original_test_{metric}"
    out: dict[str, float] = {}
    source = m.get(f"source_{key}", s.get(key))
    if source is not None:
        out["source"] = float(source)
    if key in m:
        out["protected"] = float(m[key])
    return out


def environment_line(model_dir: str | None) -> str:
    """One sentence on what made the model's bits (its card's `lineage.environment`), '' if unknown."""
    try:
        env = json.loads((Path(model_dir) / "model.json").read_text())["lineage"]["environment"] if model_dir else None
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    if not isinstance(env, dict):
        return ""
    return (f"Made with torch {env.get('torch')} on {env.get('cpu')} ({env.get('machine')}): CPU kernels "
            f"{env.get('cpu_capability')}, oneDNN ISA {env.get('onednn_max_cpu_isa')}, {env.get('torch_threads')} "
            "torch threads. A re-made model (same code, config, seeds) is bit-identical only where these match "
            "(docs/results.md).")


def plot_original(acc: dict[str, float], path: Path, metric: Metric = ACCURACY) -> str:
    """Bar of the original-domain test metric, source vs protected; returns the file name."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    names = [k for k in ("source", "protected") if k in acc]
    bars = ax.bar(names, [acc[k] for k in names], color=[COLORS["original"], COLORS["protected"]][: len(names)])
    ax.bar_label(bars, fmt=f"%.{metric.digits}f")
    top = 1.05 * metric.ceiling if metric.ceiling is not None else 1.15 * max(acc.values(), default=1.0)
    ax.set(ylim=(0, top), ylabel=f"original-domain test {metric.name} ({metric.direction} = better)",
           title="Original task kept?")
    return save_figure(fig, path)


def _fmt(audit: dict[str, Any], v: float | None) -> str:
    if v is None:
        return "n/a"
    return _metric(audit).fmt(v)


def _budget_head(audit: dict[str, Any]) -> str:
    """The budget cells of a table's header row: the budget, and under an epoch budget the
    optimizer steps it meant (from the trials' `step_budgets`)."""
    steps = step_equivalents(audit)
    return "".join(f"<th>{b}" + (f"<br><small>{steps_text(steps[str(b)], '≈')} steps</small>" if str(b) in steps else "")
                   + "</th>" for b in audit["budgets"])


def _table_html(audit: dict[str, Any]) -> str:
    """Worst case per subject and budget (in the audit's unit), then the control rows: gap (source -
    scratch), residual (protected - scratch), removed (1 - residual / gap)."""
    budgets = audit["budgets"]
    head = _budget_head(audit)
    rows = "".join(
        f"<tr><td>{s}</td>" + "".join(f"<td>{_fmt(audit, c.get(str(b)))}</td>" for b in budgets) + "</tr>"
        for s, c in audit["worst_case"].items())
    v = audit.get("verdict") or {}

    def signed(x: float | None) -> str:
        return "n/a" if x is None else ("+" if x >= 0 else "") + _fmt(audit, x)

    for name, values, fmt in (("gap (control)", v.get("gap"), signed), ("residual", v.get("residual"), signed),
                              ("removed", v.get("removed"), lambda x: "n/a" if x is None else f"{x:.0%}")):
        if values is not None:
            rows += (f"<tr><td><i>{name}</i></td>" + "".join(f"<td><i>{fmt(values.get(str(b)))}</i></td>" for b in budgets)
                     + "</tr>")
    return f"<table><tr><th>subject \\ {html.escape(unit_of(audit))}</th>{head}</tr>{rows}</table>"


def _detail_html(audit: dict[str, Any]) -> str:
    """The worst case per part of the metric's breakdown (diffusion: timestep buckets), or ""."""
    detail = audit.get("worst_case_detail")
    if not detail:
        return ""
    budgets = audit["budgets"]
    head = _budget_head(audit)
    rows = "".join(
        f"<tr><td>{s} {html.escape(part)}</td>" + "".join(f"<td>{_fmt(audit, c.get(str(b)))}</td>" for b in budgets) + "</tr>"
        for s in ("original", "scratch", "protected") for part, c in (detail.get(s) or {}).items() if part != "overall")
    return ("<h2>Per timestep bucket</h2><p>t1 = timestep 1 only (the reference code's protocol); low / mid / high = "
            "the evaluation grid's timesteps in each third of the schedule; each cell is the best any attack reached "
            f"on that bucket.</p><table><tr><th>subject bucket \\ {html.escape(unit_of(audit))}</th>{head}</tr>{rows}</table>")


def _certification_html(audit: dict[str, Any]) -> str:
    cert = audit.get("certification")
    if not cert:
        return ""
    if cert.get("certifies"):
        return "<p>Strong enough to certify (registry alias <code>audited</code>).</p>"
    return ("<p>Not strong enough to certify: " + html.escape("; ".join(cert.get("problems") or [])) + "</p>")


def _top_html(audit: dict[str, Any], rows: dict[str, dict[str, Any]], k: int = 10) -> str:
    sign = -_metric(audit).sign
    ranked = sorted((r for r in rows.values() if "protected" in r), key=lambda r: sign * r["protected"])[:k]
    body = "".join(
        f"<tr><td>{html.escape(recipe_label(Recipe(**r['recipe'])))}</td><td>{_fmt(audit, r['protected'])}</td>"
        f"<td>{_fmt(audit, r.get('scratch'))}</td><td>{_fmt(audit, r.get('original'))}</td></tr>"
        for r in ranked)
    return f"<table><tr><th>recipe</th><th>protected</th><th>scratch</th><th>original</th></tr>{body}</table>"


def _samples_budget(info: dict[str, Any]) -> str:
    """` (the audit's 20 epochs)` where samples.json records the audit budget its steps stand for."""
    budget = info.get("budget")
    return f" ({html.escape(str(budget))})" if budget else ""


def _samples_html(path: Path) -> str:
    """The samples section from a samples.json (diffusion), or "" when there is none."""
    if not path.is_file():
        return ""
    info = json.loads(path.read_text())
    if "skipped" in info:
        return f"<h2>Samples</h2><p><i>{html.escape(info['skipped'])}</i></p>"
    judge = info.get("judge")
    label = recipe_label(Recipe(**info["recipe"]))
    head = (f"<h2>Samples before and after the strongest attack</h2><p>recipe {html.escape(label)}, "
            f"{info['steps']} steps{_samples_budget(info)}, {info['samples']} samples ({info['sample_steps']} DDPM steps) per grid. ")
    if judge:
        acc = "n/a" if judge.get("test_accuracy") is None else f"{judge['test_accuracy']:.3f}"
        conf, noise = judge.get("confidence") or 0.0, judge.get("on_noise") or {}
        none = "" if judge.get("none_class") is None else f", label not its 'no digit' class {judge['none_class']}"
        head += (f"'recognised' = fraction the judge classifier (test accuracy {acc}) accepts as a digit (top "
                 f"probability >= {conf:g}{none}) and labels as a restricted class {judge['classes']}: higher means "
                 "the attacker got a working generator of the restricted domain; 'rejected' = not accepted as any digit.")
        if noise:
            head += (f" On pure noise images the judge rejects {noise.get('rejected', 0):.2f} and calls "
                     f"{noise.get('recognised', 0):.2f} restricted.")
    else:
        head += "No judge classifier for this pipeline: grids only."
    cells = []
    for subject, row in info["subjects"].items():
        for when in ("before", "after"):
            if when in row:
                r = row[when]
                rec = "" if r.get("recognised") is None else f"<br>recognised {r['recognised']:.2f}"
                rec += "" if r.get("rejected") is None else f", rejected {r['rejected']:.2f}"
                cells.append(f"<figure style='display:inline-block;margin:4px'><img src='{r['grid']}'>"
                             f"<figcaption>{subject} {when}{rec}</figcaption></figure>")
    return head + "</p>" + "".join(cells)


def write_report(audit: dict[str, Any], out: str | Path, *, search: bool = False, model_dir: str | None = None,
                 source_dir: str | None = None) -> Path:
    """Draw the plots and write `report.html` into `out`.

    Args:
        audit: the audit.json dict.
        out: output directory (created if missing).
        search: whether the audit was a search (adds the best-so-far plot).
        model_dir, source_dir: model directories whose metrics.json give original-domain accuracy.
    Returns:
        The path of report.html.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = per_recipe(audit)
    images = [plot_curves(audit, out / "curves.png"), plot_scatter(rows, out / "scatter.png", audit)]
    if search:
        images.append(plot_search(per_recipe(audit, stat="score"), out / "search.png", audit))
    acc = original_accuracy(model_dir, source_dir, audit["metric"])
    if acc:
        images.append(plot_original(acc, out / "original.png", _metric(audit)))
    v = audit["verdict"]
    failed = [t["id"] for t in audit["trials"] if t["status"] != "ok"]
    margin = "n/a" if v["margin"] is None else f"{v['margin']:+.3f}"
    made = environment_line(model_dir)
    body = (
        f"<h1>Audit of {html.escape(audit['model']['uri'])}</h1>"
        f"<p>pipeline <b>{html.escape(audit['pipeline'])}</b>, sha256 <code>{audit['model']['sha256'][:16]}</code>, "
        f"{len(audit['trials'])} trials, budgets {html.escape(budgets_line(audit, '≈'))}</p>"
        f"{f'<p><small>{html.escape(made)}</small></p>' if made else ''}"
        f"<h2>Verdict: {html.escape(str(v.get('status') or ('passed' if v['passed'] else 'failed')).upper())}</h2>"
        f"<p>{html.escape(v.get('reason', ''))}</p><p>margin {margin} vs epsilon {v['epsilon']}; control gap "
        f"{'n/a' if v.get('control_gap') is None else format(v['control_gap'], '+.3f')} (min_gap {v.get('min_gap')}); "
        f"failed trials: {v['failed_trials']} {html.escape(', '.join(failed[:20]))}</p>"
        f"{_certification_html(audit)}"
        f"<h2>Best attack (restricted test {audit['metric']}, attacker goal {audit['attacker_goal']}: "
        f"{_metric(audit).direction} is better for the attacker)</h2>{_table_html(audit)}{_detail_html(audit)}"
        f"<h2>Strongest recipes against the protected model (seed 0)</h2>{_top_html(audit, rows)}"
        + "".join(f'<p><img src="{name}" alt="{name}"></p>' for name in images)
        + _samples_html(out / "samples.json")
    )
    template = string.Template((Path(__file__).with_name("report.html")).read_text())
    page = template.substitute(pipeline=html.escape(audit["pipeline"]), body=body)
    from sophon_ray.outputs import write_bytes_atomic

    path = out / "report.html"
    write_bytes_atomic(path, page.encode())
    return path
