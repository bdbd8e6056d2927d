"""The Ray Tune audit on real local Ray (no mocks): suite + baselines + report, retry and
permanent failure accounting, search mode, bad input, and the pure planner/space/suite pieces."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sophon_ray import jobs
from sophon_ray.audit.space import AuditPlanner, attack_space, to_recipe
from sophon_ray.audit.suites import DEFAULT_V1, QUICK_V1, QUICK_V2, QUICK_V3, SUITES, get_suite
from sophon_ray.cli import main
from sophon_ray.config import Recipe
from sophon_ray.core.attack import OPTIMIZERS, STRATEGIES
from sophon_ray.errors import UserError

FAST = ["--smoke", "--set", "pretrain.steps=30", "--set", "protect.iterations=3"]
TRIAL_KEYS = {"id", "subject", "recipe", "seed", "status", "curve"}


@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from sophon_ray.ray_local import local_init_kwargs, shutdown

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             **local_init_kwargs())
    yield
    shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit-models")
    assert main(["pretrain", "digits", *FAST, "--out", str(root / "source")]) == 0
    assert main(["protect", "digits", *FAST, "--source", str(root / "source"), "--out", str(root / "protected")]) == 0
    return root


@pytest.fixture(scope="module")
def cfg():
    return jobs.get_pipeline("digits", smoke=True)


def _check_format(audit: dict, budgets: list[int]) -> None:
    assert list(audit) == ["format", "model", "pipeline", "metric", "attacker_goal", "budgets", "trials",
                           "worst_case", "verdict", "strength", "certification"]
    assert audit["format"] == "sophon-ray/audit@1" and audit["pipeline"] == "digits"
    assert set(audit["model"]) == {"uri", "sha256"} and len(audit["model"]["sha256"]) == 64
    assert audit["metric"] == "accuracy" and audit["attacker_goal"] == "max" and audit["budgets"] == budgets
    for t in audit["trials"]:
        assert set(t) == TRIAL_KEYS and t["subject"] in ("protected", "scratch", "original")
        assert t["status"] in ("ok", "failed") and Recipe(**t["recipe"])
        if t["status"] == "ok":
            assert list(t["curve"]) == [str(b) for b in budgets]
            assert all(0.0 <= v <= 1.0 for v in t["curve"].values())
    assert set(audit["verdict"]) == {"passed", "status", "reason", "epsilon", "margin", "failed_trials", "min_gap",
                                     "control_gap", "gap", "residual", "removed"}
    assert audit["verdict"]["passed"] == (audit["verdict"]["status"] == "passed")
    assert audit["strength"]["smoke"] is False and audit["certification"]["certifies"] is False  # test-size audits
    for curve in audit["worst_case"].values():
        assert list(curve) == [str(b) for b in budgets]


def test_suite_audit_with_baselines_retry_and_report(ray_local, models, cfg, tmp_path):
    lines: list[str] = []
    out = tmp_path / "audit"
    audit = jobs_audit(cfg, models / "protected", out, lines, suite="test-v1", budgets=(5, 10), seeds=2,
                       fault_trial="protected-r01-s0")
    _check_format(audit, [5, 10])
    assert json.loads((out / "audit.json").read_text()) == audit
    assert set(audit["worst_case"]) == {"protected", "scratch", "original"}
    explore = [t for t in audit["trials"] if t["seed"] == 0]
    assert len(explore) == 4 * 3 and {t["subject"] for t in explore} == {"protected", "scratch", "original"}
    reruns = [t for t in audit["trials"] if t["seed"] > 0]
    assert reruns and {t["seed"] for t in reruns} == {1, 2}  # top recipes re-run with 2 fresh seeds
    assert len(reruns) % 6 == 0 and len({json.dumps(t["recipe"]) for t in reruns}) <= 2  # top-1 by protected ∪ scratch
    assert all(t["status"] == "ok" for t in audit["trials"]) and audit["verdict"]["failed_trials"] == 0
    retried = next(t for t in audit["trials"] if t["id"] == "protected-r01-s0")
    assert retried["status"] == "ok" and sum("protected-r01-s0 failed, retrying" in x for x in lines) == 1
    assert any(x.startswith(f"audit {len(audit['trials'])}/{len(audit['trials'])} ") for x in lines)
    for name in ("report.html", "curves.png", "scatter.png", "original.png"):
        assert (out / name).stat().st_size > 0
    env = json.loads((models / "protected" / "model.json").read_text())["lineage"]["environment"]
    assert f"CPU kernels {env['cpu_capability']}, oneDNN ISA {env['onednn_max_cpu_isa']}" in (out / "report.html").read_text()
    assert (out / ".tune").is_dir() and not list(out.glob(".*tmp*"))


def jobs_audit(cfg, model, out, lines, **kw):
    from sophon_ray.audit.driver import run_audit

    return run_audit(cfg, str(model), out=out, concurrency=2, log=lines.append, top_k=1, **kw)


@pytest.mark.slow  # ~45 s: the failing trial is retried twice, each on a fresh actor
def test_search_with_permanent_failure_fails_verdict(ray_local, models, cfg, tmp_path):
    lines: list[str] = []
    audit = jobs_audit(cfg, models / "protected", tmp_path, lines, search=1, budgets=(5,), seeds=1,
                       fault_trial=("protected-r00-s0", "always"))
    _check_format(audit, [5])
    failed = [t for t in audit["trials"] if t["status"] == "failed"]
    assert [t["id"] for t in failed] == ["protected-r00-s0"] and failed[0]["curve"] == {}
    assert audit["verdict"]["passed"] is False and audit["verdict"]["failed_trials"] >= 1
    assert len(audit["trials"]) == 6  # 1 searched recipe x 3 subjects + its re-run with seed 1
    assert (tmp_path / "search.png").is_file()


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--suite", "nope-v9"], "unknown attack suite"),
        (["--budgets", "50,25"], "increasing positive integers"),
        (["--concurrency", "99"], "exceeds"),
        (["--set", "input.size=8"], "does not match pipeline"),
        (["--seeds", "0"], "--seeds"),
        (["--search", "0"], "--search"),
        (["--suite", "test-v1", "--search", "2"], "smaller than suite"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(ray_local, models, tmp_path, capsys, extra, needle):
    out = tmp_path / "audit"
    rc = main(["audit", "digits", "--smoke", "--model", str(models / "protected"), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and needle in err[-1] and err[-1].startswith("error:")
    assert not out.exists()


def test_bad_input_raises_user_error_before_ray(models, cfg, tmp_path):
    from sophon_ray.audit.driver import run_audit

    with pytest.raises(UserError, match="unknown attack suite"):
        run_audit(cfg, str(models / "protected"), out=tmp_path, suite="nope")
    with pytest.raises(UserError, match="smaller than suite 'test-v1'"):
        run_audit(cfg, str(models / "protected"), out=tmp_path, suite="test-v1", search=3)
    assert list(tmp_path.iterdir()) == []


def test_suites_are_fixed_and_cover_the_space():
    assert len(QUICK_V1) == 16 and get_suite("quick-v1") is QUICK_V1
    assert QUICK_V2[:16] == QUICK_V1 and len(set(QUICK_V2)) == 18 and set(QUICK_V2[16:]) <= set(DEFAULT_V1)
    assert QUICK_V3[:18] == QUICK_V2 and len(set(QUICK_V3)) == 19 and get_suite("quick-v3") is QUICK_V3
    assert len(DEFAULT_V1) >= 48 and len(set(DEFAULT_V1)) == len(DEFAULT_V1)
    assert {r.strategy for r in DEFAULT_V1} == set(STRATEGIES) and {r.optimizer for r in DEFAULT_V1} == set(OPTIMIZERS)
    assert {r.schedule for r in DEFAULT_V1} == {"constant", "cosine", "warmup"}
    assert len(SUITES["test-v1"]) == 4 and {r.strategy for r in SUITES["test-v1"]} == set(STRATEGIES)


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
    from sophon_ray.diffusion_jobs import get_suite as diffusion_suite

    for suite in [*SUITES.values(), diffusion_suite("diffusion-v1")]:  # every suite can seed a search
        strategies = ("all", "up", "down") if suite[0].strategy in ("all", "up", "down") else STRATEGIES
        assert all(to_recipe(to_point(r, strategies)) == r for r in suite)
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
    p = AuditPlanner(("protected", "scratch"), recipes=recipes, seeds=1, top_k=1, goal="min")
    configs = [p.suggest(f"t{i}") for i in range(6)]
    values = {"protected": [0.3, 0.1, float("inf")], "scratch": [0.2, 0.5, 0.4]}  # inf: every budget diverged
    for i, c in enumerate(configs):
        p.on_trial_complete(f"t{i}", {"score": values[c["subject"]][c["index"]]})
    assert p.ranking("protected") == [(1, 0.1), (0, 0.3)] and p.rerun_indices() == [1, 0]
    trials = [{"subject": "protected", "status": "ok", "curve": {"5": 0.30, "10": None}},
              {"subject": "protected", "status": "ok", "curve": {"5": 0.25, "10": 0.2}},
              {"subject": "scratch", "status": "ok", "curve": {"5": 0.40, "10": 0.22}},
              {"subject": "scratch", "status": "failed", "curve": {}}]
    worst = worst_case(trials, "min")
    assert worst == {"protected": {"5": 0.25, "10": 0.2}, "scratch": {"5": 0.40, "10": 0.22}}
    v = verdict(worst, 0.005, "min")  # margin = the largest MSE reduction protected gives over scratch
    assert v["margin"] == pytest.approx(0.40 - 0.25) and v["passed"] is False


def test_plan_resolves_relative_model_paths(models, cfg, monkeypatch):
    """Tune trials run in their own working directory: every subject path must be absolute
    (regression: `make demo` writes out/digits/... relative to the repository)."""
    from sophon_ray.audit.driver import make_plan
    from sophon_ray.card import lineage_path

    monkeypatch.chdir(models)
    assert lineage_path("source") == str(models / "source") and lineage_path("models:/m@a") == "models:/m@a"
    plan = make_plan(cfg, "protected", suite="test-v1", search=None, budgets=(5, 10), seeds=1, fault_trial=None,
                     log=lambda m: None)
    assert plan.subjects["protected"] == str(models / "protected")
    assert plan.subjects["original"] == str(models / "source") and plan.subjects["scratch"] is None


def test_per_recipe_best_and_score_skip_diverged_and_failed():
    from sophon_ray.audit.report import per_recipe

    def trial(subject, index, curve, status="ok"):
        return {"id": f"{subject}-r{index:02d}-s0", "subject": subject, "seed": 0, "status": status,
                "recipe": {"strategy": "direct-all"}, "curve": curve}

    audit = {"attacker_goal": "max", "trials": [
        trial("protected", 0, {"10": 0.2, "25": 0.6, "50": None}),
        trial("scratch", 0, {"10": 0.5, "25": 0.9, "50": 1.0}),
        trial("protected", 1, {"10": None, "25": None}),
        trial("scratch", 1, {}, status="failed"),
    ]}
    best, score = per_recipe(audit), per_recipe(audit, stat="score")
    assert best["r00"]["protected"] == 0.6 and best["r00"]["scratch"] == 1.0
    assert score["r00"]["protected"] == pytest.approx(0.4) and score["r00"]["scratch"] == pytest.approx(0.8)
    assert set(best["r01"]) == set(score["r01"]) == {"recipe"}  # all diverged / failed: no value
    audit["attacker_goal"] = "min"
    assert per_recipe(audit)["r00"]["scratch"] == 0.5
