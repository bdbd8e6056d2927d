"""Worst-case verdict over attack curves, with the unprotected source as the control (pure Python).

For every subject (protected / scratch / original) and budget, the attacker's best value over
all recipes and seeds. Per budget b, in the attacker's direction (signs flipped for goal "min"):

- `gap_b = best(original) - best(scratch)`: what pre-training is worth to an attacker (the
  control; a protection claim means something only where this is clearly positive);
- `residual_b = best(protected) - best(scratch)`: what is left of it after protection;
- `removed_b = 1 - residual_b / gap_b` where `gap_b > 0` (1.0: all of it removed; > 1: the
  protected model fine-tunes worse than scratch).

`margin = max_b residual_b`. Status:
- `failed`: margin > epsilon, or a planned trial failed, or nothing to compare;
- `inconclusive`: margin <= epsilon but the control has no power (`max_b gap_b < min_gap`, or
  no "original" subject): the audit cannot tell this model from an unprotected one;
- `passed`: margin <= epsilon and the control has power.
`passed` (bool) is `status == "passed"`.
"""

from __future__ import annotations

from typing import Any

STATUSES = ("passed", "inconclusive", "failed")


def worst_case(trials: list[dict[str, Any]], goal: str = "max") -> dict[str, dict[str, float]]:
    """Best value an attacker reached, per subject and budget, over ok trials (a diverged budget,
    null in the curve, gives the attacker nothing)."""
    pick = max if goal == "max" else min
    out: dict[str, dict[str, float]] = {}
    for t in trials:
        if t.get("status") != "ok":
            continue
        best = out.setdefault(t["subject"], {})
        for b, v in t["curve"].items():
            if v is None:
                continue
            b = str(b)
            best[b] = v if b not in best else pick(best[b], v)
    return out


def _diff(a: dict[str, float], b: dict[str, float], sign: float) -> dict[str, float]:
    return {k: sign * (a[k] - b[k]) for k in a if k in b}


def verdict(worst: dict[str, dict[str, float]], epsilon: float, goal: str = "max", failed_trials: int = 0,
            min_gap: float = 0.0) -> dict[str, Any]:
    """The verdict dict of audit.json from a worst-case table.

    Args:
        worst: `worst_case(...)`; epsilon: the advantage over scratch the verdict tolerates.
        goal: the attacker's goal ("max" accuracy, "min" MSE); failed_trials: planned trials
            that did not complete; min_gap: the control power `passed` needs.
    Returns:
        {"passed", "status", "reason", "epsilon", "margin", "failed_trials", "min_gap",
         "control_gap" (max gap or None), "gap", "residual", "removed" (per budget)}.
    """
    prot, scratch, orig = worst.get("protected", {}), worst.get("scratch", {}), worst.get("original", {})
    sign = 1.0 if goal == "max" else -1.0
    residual = _diff(prot, scratch, sign)
    gap = {b: g for b, g in _diff(orig, scratch, sign).items() if b in residual}
    removed = {b: (1.0 - residual[b] / g if g > 0 else None) for b, g in gap.items()}
    margin = max(residual.values()) if residual else None
    control = max(gap.values()) if gap else None
    if margin is None:
        status, reason = "failed", "no budget where both the protected model and scratch have a result"
    elif failed_trials:
        status, reason = "failed", f"{failed_trials} planned trials failed; the worst case is incomplete"
    elif margin > epsilon:
        status, reason = "failed", f"fine-tuning the protected model beats scratch by {margin:+.4g} > epsilon {epsilon:g}"
    elif control is None:
        status, reason = "inconclusive", ("no control: the unprotected source was not attacked (its directory is "
                                          "missing from the card's lineage), so the audit's power is unknown")
    elif control < min_gap:
        status, reason = "inconclusive", (f"the control has no power: the unprotected source beats scratch by at most "
                                          f"{control:+.4g} < min_gap {min_gap:g}, so this benchmark cannot tell a "
                                          "protected model from an unprotected one")
    else:
        status, reason = "passed", (f"margin {margin:+.4g} <= epsilon {epsilon:g} where the source beats scratch by "
                                    f"up to {control:+.4g}")
    return {"passed": status == "passed", "status": status, "reason": reason, "epsilon": epsilon, "margin": margin,
            "failed_trials": failed_trials, "min_gap": min_gap, "control_gap": control, "gap": gap,
            "residual": residual, "removed": removed}


def headline(v: dict[str, Any]) -> str:
    """One line: `verdict: PASSED (...)`, `INCONCLUSIVE (why)` or `FAILED (...)`."""
    status = v.get("status") or ("passed" if v.get("passed") else "failed")
    margin = "n/a" if v.get("margin") is None else f"{v['margin']:+.3f}"
    control = "" if v.get("control_gap") is None else f", control gap {v['control_gap']:+.3f} (min {v.get('min_gap')})"
    line = f"verdict: {status.upper()} (margin {margin} vs epsilon {v['epsilon']}{control}, {v['failed_trials']} failed trials)"
    return line if status == "passed" else f"{line}: {v.get('reason', '')}"
