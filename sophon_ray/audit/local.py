"""In-process attack comparison (serial): every recipe on protected, scratch and source models.

The Ray Tune audit runs the same trials in parallel; this is the debugging/demo path and the
one `sophon-ray run` uses before the Tune layer lands.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from sophon_ray.audit.suites import recipe_label
from sophon_ray.config import PipelineConfig, Recipe


def compare(
    cfg: PipelineConfig,
    subjects: dict[str, Any],
    recipes: tuple[Recipe, ...],
    seeds: tuple[int, ...] = (0,),
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every (subject, recipe, seed) attack; `subjects` maps name -> model dir (None = scratch).

    Returns audit-style trial dicts: id, subject, recipe, seed, status, curve.
    """
    from sophon_ray import jobs

    t = jobs.load_tensors(cfg)
    trials = []
    plan = [(s, i, r, seed) for i, r in enumerate(recipes) for seed in seeds for s in subjects]
    start = time.perf_counter()
    for n, (subject, i, recipe, seed) in enumerate(plan, 1):
        curve = jobs.attack(cfg, subjects[subject], recipe, seed=seed, t=t)
        trials.append({
            "id": f"{subject}-r{i:02d}-s{seed}", "subject": subject, "recipe": dataclasses.asdict(recipe),
            "seed": seed, "status": "ok", "curve": {str(k): v for k, v in curve.items()},
        })
        last = curve[max(curve)]
        log(f"attack {n}/{len(plan)} {subject:9s} {recipe_label(recipe):40s} -> {last:.3f} ({time.perf_counter() - start:.0f}s)")
    return trials


def table(worst: dict[str, dict[str, float]], budgets: tuple[int, ...], digits: int = 3,
          verdict: dict[str, Any] | None = None) -> str:
    """A plain-text table: rows = subjects, columns = step budgets (best attacker value, `digits`
    decimals); with a verdict, the control rows below: `gap` (source - scratch, in the attacker's
    direction), `residual` (protected - scratch) and `removed` (1 - residual / gap)."""
    w = max(8, digits + 5)
    head = f"{'subject':10s}" + "".join(f"{b:>{w}d}" for b in budgets)
    rows = [head, "-" * len(head)]

    def row(name: str, values: dict[str, Any], fmt: str) -> str:
        cells = ("-".rjust(w) if values.get(str(b)) is None else format(values[str(b)], fmt).rjust(w) for b in budgets)
        return f"{name:10s}" + "".join(cells)

    for subject in ("original", "scratch", "protected"):
        if subject in worst:
            rows.append(row(subject, worst[subject], f".{digits}f"))
    if verdict is not None and verdict.get("gap") is not None:
        rows.append("-" * len(head))
        rows.append(row("gap", verdict.get("gap") or {}, f"+.{digits}f"))
        rows.append(row("residual", verdict.get("residual") or {}, f"+.{digits}f"))
        rows.append(row("removed", verdict.get("removed") or {}, ".0%"))
    return "\n".join(rows)
