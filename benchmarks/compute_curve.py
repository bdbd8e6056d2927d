"""Issue 29's compute curve: removed fraction per attack budget against protection compute.

    .venv/bin/python benchmarks/compute_curve.py --out docs/img/compute_curve.png \
        "source:1:/path/audit-1x" "source:4:/path/audit-4x" "co-trained:0.75:/path/audit" ...

Each point is START:MULTIPLE:AUDIT_DIR: an `audit.json` written by `sophon-ray audit` (the same
suite and budgets for every point, e.g. `--suite screen-v1 --budgets 10,25 --seeds 1`), the
protection start it came from ("source" = SOPHON from the pre-trained weights, "co-trained" =
`protect.init=fresh`) and its compute as a multiple of the pipeline default (iterations x K,
200 x 10 on mnist-to-digits). Plots removed (1 - residual / gap, the verdict's own figure) per
budget against compute on a log axis, one line per start and budget, and prints a markdown table
(multiple, start, model sha256, original accuracy from the model's metrics.json, per-budget
protected / scratch / source and removed, status, margin).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def point(spec: str) -> dict:
    start, mult, path = spec.split(":", 2)
    audit = json.loads((Path(path) / "audit.json").read_text())
    v, wc = audit["verdict"], audit["worst_case"]
    model = Path(audit["model"]["uri"])
    metrics = model / "metrics.json"
    orig = json.loads(metrics.read_text()).get("original_test_accuracy") if metrics.is_file() else None
    return {"start": start, "multiple": float(mult), "sha": audit["model"]["sha256"][:12], "orig": orig,
            "budgets": [str(b) for b in audit["budgets"]], "removed": v.get("removed") or {}, "worst": wc,
            "status": v["status"], "margin": v.get("margin")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("points", nargs="+", metavar="START:MULTIPLE:AUDIT_DIR")
    ap.add_argument("--out", type=Path, required=True, help="the plot (png)")
    args = ap.parse_args()
    pts = sorted((point(s) for s in args.points), key=lambda p: (p["start"], p["multiple"]))
    budgets = pts[0]["budgets"]
    if any(p["budgets"] != budgets for p in pts):
        sys.exit("every audit must have the same budgets")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4))
    styles = {b: s for b, s in zip(budgets, ("-o", "--s", ":^", "-.v"))}
    for color, start in zip(("tab:blue", "tab:red", "tab:green", "tab:purple"), dict.fromkeys(p["start"] for p in pts)):
        ps = [p for p in pts if p["start"] == start]
        for b in budgets:
            ax.plot([p["multiple"] for p in ps], [100 * p["removed"][b] for p in ps], styles[b], color=color,
                    label=f"{start}, {b} steps")
    ax.axhline(50, color="grey", lw=0.8)
    ax.axhline(90, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("protection compute (x pipeline default, iterations x K)")
    ax.set_ylabel("removed (% of the source's advantage)")
    ax.set_title("mnist-to-digits: removed vs protection compute")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(args.out)

    head = " | ".join(f"{b}: protected / scratch / source | removed {b}" for b in budgets)
    print(f"| start | compute | model sha256 | original acc | {head} | status (margin) |")
    print("|" + "---|" * (5 + 2 * len(budgets)))
    for p in pts:
        cells = " | ".join(f"{p['worst']['protected'][b]:.3f} / {p['worst']['scratch'][b]:.3f} / "
                           f"{p['worst']['original'][b]:.3f} | {p['removed'][b]:.0%}" for b in budgets)
        orig = "-" if p["orig"] is None else f"{p['orig']:.3f}"
        print(f"| {p['start']} | {p['multiple']:g}x | `{p['sha']}…` | {orig} | {cells} | {p['status']} ({p['margin']:+.3f}) |")


if __name__ == "__main__":
    main()
