"""What the hardening loop reads from its audits: the attacks to feed back, removed per round.

- `winners(audit, top)`: the `top` strongest distinct recipes on the protected model, over every
  (trial, budget) pair at the budgets that count (the protected model's residual over scratch
  exceeds the verdict's epsilon; none does: the one with the largest residual), each scored by the
  trial's advantage over scratch's worst case at that budget; a recipe counts once, at its
  strongest budget, which is its horizon.
- `feedback(audit, task, protocol, top)`: those attacks as `config.EnvRecipe`s
  (`core.feedback.env_recipe`): horizon K = the winning budget in optimizer steps (the trial's
  `step_budgets` where a suite counts epochs), the schedule over the attack's own length (its
  largest step budget), support = the attacker's images per class under the audit's protocol.
- `removed_table` / `plot_removed`: `removed` (1 - residual / gap, audit.json verdict) per budget
  per round, as text and as a PNG.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sophon_ray.config import EnvRecipe, Recipe, to_dict
from sophon_ray.tasks.base import Metric, SuiteProtocol, Task, metric_named


def _budget_index(audit: dict[str, Any], budget: str) -> int:
    return [str(b) for b in audit["budgets"]].index(budget)


def winners(audit: dict[str, Any], top: int) -> list[dict[str, Any]]:
    """The `top` strongest distinct recipes against the protected model (module docstring),
    strongest first.

    Every (ok protected trial, budget) pair is a candidate at the budgets that count (the protected
    model's residual over scratch exceeds the verdict's epsilon; none does: the one budget with the
    largest residual), scored by the trial's own advantage over scratch's worst case there (over
    0 where scratch has none); ties go to the earlier budget, then plan order. A recipe counts once,
    at its strongest pair: that budget is its horizon.

    Args:
        audit: an audit.json dict; top: at most this many.
    Returns:
        [{"budget": int (the suite's unit), "steps": K (optimizer steps), "total": the attack's
        length in optimizer steps, "recipe": {...}, "trial": id, "value": the metric reached,
        "residual": the protected model's advantage over scratch at that budget, "score"}].
    """
    metric: Metric = metric_named(audit["metric"])
    v = audit.get("verdict") or {}
    residual = {str(b): r for b, r in (v.get("residual") or {}).items() if r is not None}
    scratch = (audit.get("worst_case") or {}).get("scratch") or {}
    ranked = sorted(residual, key=lambda b: (-residual[b], _budget_index(audit, b)))
    chosen = [b for b in ranked if residual[b] > float(v.get("epsilon") or 0.0)] or ranked[:1]
    pairs = [(metric.advantage(t["curve"][b], scratch.get(b, 0.0)), _budget_index(audit, b), n, t, b)
             for n, t in enumerate(audit["trials"]) if t["subject"] == "protected" and t["status"] == "ok"
             for b in chosen if t["curve"].get(b) is not None]
    out, seen = [], set()
    for score, i, _, trial, b in sorted(pairs, key=lambda p: (-p[0], p[1], p[2])):
        key = json.dumps(trial["recipe"], sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        steps = trial.get("step_budgets") or audit["budgets"]
        out.append({"budget": int(b), "steps": int(steps[i]), "total": int(steps[-1]), "recipe": trial["recipe"],
                    "trial": trial["id"], "value": trial["curve"][b], "residual": residual[b], "score": score})
        if len(out) >= top:
            break
    return out


def feedback(audit: dict[str, Any], task: Task, protocol: SuiteProtocol, top: int) -> list[dict[str, Any]]:
    """`winners` as fixed FTS environments (`core.feedback.env_recipe`).

    Args:
        audit: the round's audit.json dict; task: the pipeline's task (the attacker's data);
        protocol: the audit's suite protocol (`Task.protocol`, or the steps protocol of a search);
        top: at most this many.
    Returns:
        [{"env": EnvRecipe as a dict, "notes": [what the inner loop does not reproduce], **winner}].
    """
    from sophon_ray.core.feedback import env_recipe

    support = task.attacker_support(protocol)
    out = []
    for w in winners(audit, top):
        env, notes = env_recipe(Recipe(**w["recipe"]), w["steps"], w["total"], support)
        out.append({**w, "env": to_dict(env), "notes": list(notes)})
    return out


def merged(earlier: tuple[Any, ...], new: list[dict[str, Any]]) -> tuple[EnvRecipe, ...]:
    """`earlier` recipes followed by the `new` ones not among them (order kept, exact duplicates once)."""
    from sophon_ray.core.feedback import as_env_recipe

    out = [as_env_recipe(r) for r in earlier]
    for item in new:
        r = as_env_recipe(item)
        if r not in out:
            out.append(r)
    return tuple(out)


def removed_table(rounds: list[dict[str, Any]], budgets: list[int], unit: str = "steps") -> str:
    """Plain text: one row per round (status, margin, removed at each budget, in `unit`)."""
    from sophon_ray.tasks.base import budget_label

    width = max(13, *(len(budget_label(b, unit)) + 3 for b in budgets))
    head = f"{'round':6s}{'status':14s}{'margin':>9s}" + "".join(f"{budget_label(b, unit):>{width}s}" for b in budgets)
    rows = [head, "-" * len(head)]
    for r in rounds:
        margin = "-" if r.get("margin") is None else f"{r['margin']:+.3f}"
        cells = "".join(("-" if r["removed"].get(str(b)) is None else f"{r['removed'][str(b)]:.0%}").rjust(width)
                        for b in budgets)
        rows.append(f"{r['round']:<6d}{r['status']:14s}{margin:>9s}{cells}")
    return "\n".join(rows)


def plot_removed(rounds: list[dict[str, Any]], budgets: list[int], path: Path, unit: str = "steps") -> str:
    """removed (share of the source's advantage over scratch the protection took away) per budget
    (in `unit`) per round, one line per budget; returns the file name."""
    from sophon_ray.audit.report import pyplot, save_figure
    from sophon_ray.tasks.base import budget_label

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["round"] for r in rounds]
    for b in budgets:
        ys = [r["removed"].get(str(b)) for r in rounds]
        ax.plot(xs, [float("nan") if y is None else y for y in ys], "o-", label=budget_label(b, unit))
    ax.axhline(1.0, color="tab:green", ls="--", lw=1, label="all removed")
    ax.axhline(0.0, color="tab:gray", ls=":", lw=1)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set(xlabel="hardening round", ylabel="removed = 1 - residual / gap",
           title="Share of the source's advantage over scratch removed,\nper attack budget and round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
