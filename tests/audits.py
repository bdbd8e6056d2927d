"""Real audit.json dicts for tests that need one without running Ray: the trial records an audit of
the `digits` pipeline would hold, assembled by `audit.driver.assemble` itself (so the registry's
re-check, which recomputes the verdict and the certification from the trials, sees what a real
audit writes).

    audit = make_audit(sha, "passed", recipes=16)              # certifies: 16 recipes, 3 seeds, to 100 steps
    audit = make_audit(sha, "failed", suite="paper-v1")        # the paper's protocol: 5/10/20 epochs, whole split
"""

from __future__ import annotations

import dataclasses
from typing import Any

from sophon_ray import tasks
from sophon_ray.audit.driver import Plan, assemble, audit_mode, standard_of
from sophon_ray.pipelines import load

# the best restricted accuracy each subject reaches at every budget, by the audit's outcome
VALUES = {"passed": {"protected": 0.30, "scratch": 0.31, "original": 0.62},     # margin -0.01, power
          "failed": {"protected": 0.50, "scratch": 0.31, "original": 0.62},     # margin +0.19
          "inconclusive": {"protected": 0.30, "scratch": 0.31, "original": 0.32}}  # no control power
STEPS_PER_EPOCH = 22  # digits' restricted split at batch 64 (the paper suite's trials record it)


def make_audit(sha: str, status: str = "passed", *, recipes: int = 16, reruns: tuple[int, ...] = (0, 1, 2),
               seeds: int = 2, subjects: tuple[str, ...] = ("protected", "scratch", "original"),
               suite: str = "quick-v3", budgets: tuple[int, ...] | None = None, smoke: bool = False,
               card: dict[str, Any] | None = None, model_facts: dict[str, Any] | None = None,
               attack_seed: int = 0, pipeline: str = "digits") -> dict[str, Any]:
    """An audit.json dict of `pipeline` (the trials every recipe and re-run would leave)."""
    cfg = tasks.get_pipeline(pipeline, overrides=[f"attack.seed={attack_seed}"])
    task = tasks.of(cfg)
    protocol = task.protocol(suite)
    budgets = tuple(budgets or protocol.budgets or cfg.attack.budgets)
    attack = dataclasses.replace(cfg.attack, budgets=budgets,
                                 train_per_class=None if protocol.attacker_data == "full" else cfg.attack.train_per_class)
    plan_cfg = dataclasses.replace(cfg, attack=attack)
    steps = [b * STEPS_PER_EPOCH for b in budgets] if protocol.unit == "epochs" else list(budgets)
    trials = []
    for i, seed in [(i, 0) for i in range(recipes)] + [(i, s) for s in range(1, seeds + 1) for i in reruns]:
        for subject in subjects:
            trials.append({"id": f"{subject}-r{i:02d}-s{seed}", "subject": subject, "recipe": {"lr": 1e-3 * (i + 1)},
                           "seed": seed, "status": "ok", "curve": {str(b): VALUES[status][subject] for b in budgets},
                           "step_budgets": steps, "train_images": 1437})
    plan = Plan(plan_cfg, "out/protected", "/m/protected", sha, {s: f"/m/{s}" for s in subjects},
                audit_mode(task, suite, None), None, None, seeds, None, protocol=protocol,
                standard=standard_of(cfg, load(pipeline), card), model_facts=model_facts or {})
    return assemble(plan, trials, len(trials), task.epsilon, None, n_explore=recipes, smoke=smoke)
