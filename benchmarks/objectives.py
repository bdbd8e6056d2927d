"""Issue 36's equal-compute comparison of FTS objectives: one table and one plot from finished runs.

    .venv/bin/python benchmarks/objectives.py --out docs/img/objectives.png \
        "sophon:/runs/sophon:/runs/a-sophon:/runs/p-sophon" "tail:/runs/tail:/runs/a-tail:/runs/p-tail" ...

Each point is LABEL:MODEL_DIR:AUDIT_DIR[:AUDIT_DIR...]: a protected model (its metrics.json and, for
a Ray Train protection, the loop seconds its run recorded, `train.driver.timings_of`) and the
audits of the fixed judge (`sophon-ray audit` writes each audit.json; issue 36: `--suite
horizon-v1 --budgets 10,25,100 --seeds 1` and `--suite paper-adaptive-v1 --reruns 0`, the same for
every point). Prints a markdown table (objective, iterations, protection loop seconds, original
accuracy, then per audit budget: the control's gap (source - scratch), the protected model's
residual (protected - scratch) and removed = 1 - residual / gap, and each audit's status and
margin) and plots removed per budget, one group of bars per objective.

    .venv/bin/python benchmarks/objectives.py --cost SOURCE_DIR

instead times two FTS steps (`Protection.fts_step`, in-process, the machine's threads) of
mnist-to-digits (or `--pipeline NAME`, e.g. digits-diffusion) from SOURCE_DIR at the comparison's settings (K 20, loss after every 4th step, E 2)
with each term on and off: the per-step cost ratios that set the equal-compute iteration counts,
and each term's value (e.g. the curvature κ that `curv_scale` is set against).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _budget_label(audit: dict, b: str) -> str:
    from sophon_ray.audit.verdict import budget_label, unit_of

    return budget_label(b, unit_of(audit))


def point(spec: str) -> dict:
    from sophon_ray.train.driver import timings_of

    label, model, *audits = spec.split(":")
    metrics = json.loads((Path(model) / "metrics.json").read_text())
    cols = []
    for a_dir in audits:
        audit = json.loads((Path(a_dir) / "audit.json").read_text())
        v = audit["verdict"]
        for b in audit["budgets"]:
            b = str(b)
            cols.append({"budget": _budget_label(audit, b), "gap": (v.get("gap") or {}).get(b),
                         "residual": (v.get("residual") or {}).get(b), "removed": (v.get("removed") or {}).get(b)})
        cols[-1]["verdict"] = f"{v['status']} {v.get('margin', 0):+.3f}"
    card = json.loads((Path(model) / "model.json").read_text())
    return {"label": label, "pipeline": card.get("pipeline", "?"), "start": (card.get("lineage") or {}).get("start"),
            "iterations": metrics.get("iterations"), "loop_s": timings_of(model).get("loop"),
            "orig": metrics.get("original_test_accuracy", metrics.get("original_test_mse")), "cols": cols}


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(points: list[dict]) -> str:
    heads = [c["budget"] for c in points[0]["cols"]]
    lines = ["| objective | iterations | loop s | original | " + " | ".join(f"{h}: gap / residual / removed" for h in heads)
             + " |", "|---" * (4 + len(heads)) + "|"]
    for p in points:
        cells = [f"{_f(c['gap'], '+.3f')} / {_f(c['residual'], '+.3f')} / **{_f(c['removed'], '.0%')}**"
                 + (f" ({c['verdict']})" if "verdict" in c else "") for c in p["cols"]]
        lines.append(f"| {p['label']} | {p['iterations']} | {_f(p['loop_s'], '.0f')} | {_f(p['orig'], '.3f')} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(points: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = [c["budget"] for c in points[0]["cols"]]
    width = 0.8 / len(points)
    fig, ax = plt.subplots(figsize=(10, 4))  # the legend sits right of the bars
    top = 2.5  # removed past 250% says no more than "all of it": such bars are cut there and labelled
    for i, p in enumerate(points):
        ys = [float("nan") if c["removed"] is None else c["removed"] for c in p["cols"]]
        xs = [j + i * width for j in range(len(heads))]
        ax.bar(xs, [min(y, top) for y in ys], width, label=f"{p['label']} ({p['iterations']} it{' last chunk' if p.get('start') else ''})")
        for x, y in zip(xs, ys):
            if y > top:
                ax.annotate(f"{y:.0%}", (x, top), ha="center", va="bottom", fontsize=7)
                ax.set_ylim(top=top * 1.1)
    ax.axhline(1.0, color="tab:green", ls="--", lw=1)
    ax.axhline(0.0, color="tab:gray", lw=0.8)
    ax.set_xticks([j + width * (len(points) - 1) / 2 for j in range(len(heads))], heads, fontsize=8)
    ax.set(ylabel="removed = 1 - residual / gap",
           title=f"FTS objectives at equal compute ({points[0]['pipeline']}): share of the source's advantage removed")
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


TERMS = {"sophon": [], "progress bound": ["protect.tail_weight=1.0"],
         "curvature": ["protect.curv_weight=1.0", "protect.curv_scale=5.0"], "coupling": ["protect.couple_weight=1.0"]}


def cost(source: str, pipeline: str = "mnist-to-digits", steps: int = 2) -> None:
    """Seconds per FTS step with each term on, and the ratio to SOPHON's (printed as a table)."""
    import time

    from sophon_ray import tasks

    base = ["protect.inner_steps=20", "protect.query_every=4"]
    rows = []
    for label, extra in TERMS.items():
        task = tasks.of(tasks.get_pipeline(pipeline, overrides=[*base, *extra]))
        t = task.load_tensors()
        model, _ = task.load_for(source, t)
        prot = task.build_protection(model, t, task.original_metric(model, t))
        t0 = time.perf_counter()
        ms = [prot.fts_step(0) for _ in range(steps)]
        rows.append((label, (time.perf_counter() - t0) / steps, ms[-1]))
    print("| term | s / FTS step | vs SOPHON | the term's value (last step) |\n|---|---|---|---|")
    for label, sec, m in rows:
        value = " ".join(f"{k} {v:.3g}" for k, v in m.items() if k in ("fts_tail", "fts_curv", "fts_couple")) or "-"
        print(f"| {label} | {sec:.2f} | {sec / rows[0][1]:.2f}x | {value} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("points", nargs="*", metavar="LABEL:MODEL_DIR:AUDIT_DIR[:AUDIT_DIR...]")
    ap.add_argument("--out", type=Path, help="the plot (png)")
    ap.add_argument("--cost", metavar="SOURCE_DIR", help="time one FTS step per term instead")
    ap.add_argument("--pipeline", default="mnist-to-digits", help="--cost: the pipeline SOURCE_DIR was trained for")
    args = ap.parse_args()
    if args.cost:
        cost(args.cost, args.pipeline)
        return
    if not args.points or args.out is None:
        ap.error("give the points and --out (or --cost SOURCE_DIR)")
    points = [point(s) for s in args.points]
    print(table(points))
    plot(points, args.out)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
