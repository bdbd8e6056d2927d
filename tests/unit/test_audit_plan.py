"""The audit's pure pieces (no Ray started): fixed suites, the search space and its mapping to
recipes, the planner (explore, then re-runs of the top recipes), the verdict's worst case for a
minimising attacker, and the report's per-recipe table."""

from __future__ import annotations

import pytest

from sophon_ray.audit.space import AuditPlanner, attack_space, to_recipe
from sophon_ray.config import Recipe
from sophon_ray.core.attack import HEAD_STRATEGIES, OPTIMIZERS, STRATEGIES
from sophon_ray.errors import UserError
from sophon_ray.tasks import ACCURACY, MSE
from sophon_ray.tasks.classifier.suites import DEFAULT_V1, QUICK_V1, QUICK_V2, QUICK_V3, SUITES, get_suite
from sophon_ray.tasks.diffusion.suites import SUITES_DIFFUSION


def test_suites_are_fixed_and_cover_the_space():
    assert len(QUICK_V1) == 16 and get_suite("quick-v1") is QUICK_V1
    assert QUICK_V2[:16] == QUICK_V1 and len(set(QUICK_V2)) == 18 and set(QUICK_V2[16:]) <= set(DEFAULT_V1)
    assert QUICK_V3[:18] == QUICK_V2 and len(set(QUICK_V3)) == 19 and get_suite("quick-v3") is QUICK_V3
    assert len(DEFAULT_V1) >= 48 and len(set(DEFAULT_V1)) == len(DEFAULT_V1)
    assert {r.strategy for r in DEFAULT_V1} == set(HEAD_STRATEGIES) and {r.optimizer for r in DEFAULT_V1} == set(OPTIMIZERS)
    assert {r.schedule for r in DEFAULT_V1} == {"constant", "cosine", "warmup"}
    assert len(SUITES["test-v1"]) == 4 and {r.strategy for r in SUITES["test-v1"]} == set(HEAD_STRATEGIES)


def test_default_audit_and_run_suites_can_certify():
    """A default `audit` or `run` has at least the recipes a certifying audit needs (diffusion-v1's 15
    did not: no default diffusion run could reach `audited`); smoke suites never certify anyway."""
    from sophon_ray.audit.driver import MINIMUM
    from sophon_ray.tasks.classifier import ClassifierTask
    from sophon_ray.tasks.diffusion import DiffusionTask
    from sophon_ray.tasks.diffusion.suites import SUITE_DIFFUSION_V1, SUITE_DIFFUSION_V2

    for task in (ClassifierTask, DiffusionTask):
        suites = SUITES if task is ClassifierTask else SUITES_DIFFUSION
        for name in (task.audit_suite, task.run_suite):
            assert len(set(suites[name])) >= MINIMUM["recipes"], (task.kind, name)
    assert SUITE_DIFFUSION_V2[:15] == SUITE_DIFFUSION_V1 and len(set(SUITE_DIFFUSION_V2)) == 16


def test_space_and_recipe_mapping():
    space = attack_space()
    assert set(space) == {"strategy", "optimizer", "lr", "batch_size", "weight_decay", "schedule"}
    assert space["lr"].lower == 1e-5 and space["lr"].upper == 1e-1
    point = {"strategy": "initFC-FC", "optimizer": "adadelta", "lr": 0.05, "batch_size": 16, "weight_decay": 0.0,
             "schedule": "cosine"}
    assert to_recipe(point) == Recipe("initFC-FC", "adadelta", 0.5, 16, 0.0, "cosine")
    assert to_recipe({**point, "optimizer": "adam"}).lr == 0.05


def test_planner_plans_explore_then_reruns_of_top_recipes():
    recipes = tuple(Recipe(lr=lr) for lr in (1e-4, 1e-3, 1e-2))
    p = AuditPlanner(("protected", "scratch"), recipes=recipes, seeds=2, top_k=1, fault=("scratch-r02", "once", "/faults"))
    configs = [p.suggest(f"t{i}") for i in range(6)]
    assert [c["id"] for c in configs][:2] == ["protected-r00-s0", "scratch-r00-s0"]
    assert [c["fault"] for c in configs if c["fault"]] == [{"mode": "once", "marker": "/faults/scratch-r02-s0"}]
    assert p.suggest("t6") is None  # waits for the explore trials to finish
    values = {"protected": [0.2, 0.9, 0.4], "scratch": [0.8, 0.1, 0.3]}
    for i, c in enumerate(configs):
        p.on_trial_complete(f"t{i}", {"score": values[c["subject"]][c["index"]]})
    assert p.rerun_indices() == [1, 0]  # best protected recipe, then best scratch recipe
    reruns = [p.suggest(f"r{i}") for i in range(8)]
    assert {(c["index"], c["seed"]) for c in reruns} == {(1, 1), (0, 1), (1, 2), (0, 2)}
    assert p.suggest("r8") == p.FINISHED and p.total == 6 + 8


def test_search_starts_from_the_suite_then_tpe():
    from sophon_ray.audit.space import optuna_searcher, to_point
    from sophon_ray.tasks.diffusion import DiffusionTask

    # every suite but a fixed protocol (its own budgets and data) and horizon-v1 (whole-set batches of 100, which
    # the search space does not draw) can seed a search
    for name, suite in SUITES.items():
        assert name in ("paper-v1", "paper-adaptive-v1", "horizon-v1") or all(
            to_recipe(to_point(r, STRATEGIES)) == r for r in suite)
    with pytest.raises(UserError, match="outside the search space"):
        to_point(SUITES["horizon-v1"][-1], STRATEGIES)
    for name, suite in SUITES_DIFFUSION.items():
        assert name == "paper-v1" or all(to_recipe(to_point(r, DiffusionTask.strategies)) == r for r in suite)
    with pytest.raises(UserError, match="outside the search space"):
        to_point(Recipe(lr=1.0))  # adam at lr 1.0: above the space's 1e-1
    with pytest.raises(UserError, match="outside the search space"):
        to_point(Recipe(schedule="warmup", warmup_steps=5))  # the space draws the default warm-up only
    seeds = QUICK_V2[-3:]
    p = AuditPlanner(("protected", "scratch"), inner=optuna_searcher(n_trials=5, start_from=seeds), n_search=5,
                     seeds=1, top_k=1)
    configs = [p.suggest(f"t{i}") for i in range(10)]
    assert [Recipe(**c["recipe"]) for c in configs[:6:2]] == list(seeds)  # the suite's recipes first, in order
    assert [c["subject"] for c in configs[:2]] == ["protected", "scratch"] and len(p.recipes) == 5


def test_minimising_goal_ranks_lowest_first_and_skips_diverged():
    from sophon_ray.audit.verdict import verdict, worst_case

    recipes = tuple(Recipe("all", lr=lr) for lr in (1e-4, 1e-3, 1e-2))
    p = AuditPlanner(("protected", "scratch"), recipes=recipes, seeds=1, top_k=1, metric=MSE)
    configs = [p.suggest(f"t{i}") for i in range(6)]
    values = {"protected": [0.3, 0.1, float("inf")], "scratch": [0.2, 0.5, 0.4]}  # inf: every budget diverged
    for i, c in enumerate(configs):
        p.on_trial_complete(f"t{i}", {"score": values[c["subject"]][c["index"]]})
    assert p.ranking("protected") == [(1, 0.1), (0, 0.3)] and p.rerun_indices() == [1, 0]
    trials = [{"subject": "protected", "status": "ok", "curve": {"5": 0.30, "10": None}},
              {"subject": "protected", "status": "ok", "curve": {"5": 0.25, "10": 0.2}},
              {"subject": "scratch", "status": "ok", "curve": {"5": 0.40, "10": 0.22}},
              {"subject": "scratch", "status": "failed", "curve": {}}]
    worst = worst_case(trials, MSE)
    assert worst == {"protected": {"5": 0.25, "10": 0.2}, "scratch": {"5": 0.40, "10": 0.22}}
    assert worst_case(trials, ACCURACY)["protected"] == {"5": 0.30, "10": 0.2}  # a maximiser keeps the highest
    v = verdict(worst, 0.005, MSE)  # margin = the largest MSE reduction protected gives over scratch
    assert v["margin"] == pytest.approx(0.40 - 0.25) and v["passed"] is False


def test_per_recipe_best_and_score_skip_diverged_and_failed():
    from sophon_ray.audit.report import per_recipe

    def trial(subject, index, curve, status="ok"):
        return {"id": f"{subject}-r{index:02d}-s0", "subject": subject, "seed": 0, "status": status,
                "recipe": {"strategy": "direct-all"}, "curve": curve}

    audit = {"metric": "accuracy", "trials": [
        trial("protected", 0, {"10": 0.2, "25": 0.6, "50": None}),
        trial("scratch", 0, {"10": 0.5, "25": 0.9, "50": 1.0}),
        trial("protected", 1, {"10": None, "25": None}),
        trial("scratch", 1, {}, status="failed"),
    ]}
    best, score = per_recipe(audit), per_recipe(audit, stat="score")
    assert best["r00"]["protected"] == 0.6 and best["r00"]["scratch"] == 1.0
    assert score["r00"]["protected"] == pytest.approx(0.4) and score["r00"]["scratch"] == pytest.approx(0.8)
    assert set(best["r01"]) == set(score["r01"]) == {"recipe"}  # all diverged / failed: no value
    audit["metric"] = "mse"  # the attacker's best of an MSE curve is its lowest value
    assert per_recipe(audit)["r00"]["scratch"] == 0.5 and per_recipe(audit)["r00"]["protected"] == 0.2


def test_paper_v1_is_the_papers_protocol_and_round_trips():
    """paper-v1: the released code's attack first (SGD momentum 0.9, wd 1e-4, lr 1e-4, batch 200, all
    weights, head kept), the abstract's three methods and five optimizers, one more lr decade and
    batch 64; budgets 5/10/20 epochs on the whole restricted training split; never certifies."""
    import dataclasses
    import json

    from sophon_ray.tasks.classifier import ClassifierTask
    from sophon_ray.tasks.classifier.suites import PAPER_V1, PROTOCOLS
    from sophon_ray.tasks.diffusion.suites import PROTOCOLS_DIFFUSION

    assert PAPER_V1[0] == Recipe("direct-all", "momentum", 1e-4, 200, weight_decay=1e-4, schedule="constant")
    assert {r.strategy for r in PAPER_V1} == {"direct-all", "initFC-all", "direct-FC"}
    assert {r.optimizer for r in PAPER_V1} == {"sgd", "momentum", "nesterov", "adam", "adagrad"}
    assert {r.lr for r in PAPER_V1} == {1e-4, 1e-3} and {r.batch_size for r in PAPER_V1} == {200, 64}
    assert all(r.weight_decay == 1e-4 and r.schedule == "constant" for r in PAPER_V1) and len(set(PAPER_V1)) == 9
    for r in PAPER_V1:  # as audit.json records it and reads it back
        assert Recipe(**json.loads(json.dumps(dataclasses.asdict(r)))) == r
    for p in (PROTOCOLS["paper-v1"], PROTOCOLS_DIFFUSION["paper-v1"]):
        assert p.budgets == (5, 10, 20) and p.unit == "epochs" and p.attacker_data == "full" and not p.certifies
    assert PROTOCOLS_DIFFUSION["paper-v1"].metric_key == "t1" and PROTOCOLS["paper-v1"].metric_key is None
    assert SUITES_DIFFUSION["paper-v1"] == (Recipe("all", "adam", 1e-4, 200),)
    # an epoch is floor(images / batch) optimizer steps (a DataLoader with drop_last=True), at least 1
    p = PROTOCOLS["paper-v1"]
    assert p.epochs_to_steps((5, 10, 20), 1437, 200) == (35, 70, 140)
    assert p.epochs_to_steps((5, 10, 20), 1437, 64) == (110, 220, 440)
    assert p.epochs_to_steps((1, 2), 50, 200) == (1, 2)
    steps = ClassifierTask.protocol(ClassifierTask.__new__(ClassifierTask), "quick-v3")
    assert steps.unit == "steps" and steps.epochs_to_steps((10, 25), 1437, 200) == (10, 25)


def test_screen_v1_is_the_documented_screen():
    """screen-v1 (docs/history/results-2026-12-07.md, "Hardening (issue 29)"): the four recipes that break the default
    mnist-to-digits protection plus the paper's SGD 1e-4; too small to certify."""
    from sophon_ray.audit.driver import MINIMUM
    from sophon_ray.tasks.classifier.suites import SCREEN_V1

    assert get_suite("screen-v1") is SCREEN_V1 and [(r.strategy, r.optimizer, r.lr) for r in SCREEN_V1] == [
        ("direct-all", "adadelta", 1.0), ("direct-all", "rmsprop", 1e-3), ("direct-all", "adagrad", 1e-2),
        ("initFC-all", "adadelta", 0.5), ("direct-all", "sgd", 1e-4)]
    assert SCREEN_V1[3].weight_decay == 1e-3 and len(SCREEN_V1) < MINIMUM["recipes"]
