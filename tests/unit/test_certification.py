"""What may certify a model (issue 31), without Ray or MLflow: the budget standard comes from the
pipeline as written (not from --budgets, --set attack.budgets=... or a rename), `strength` counts
the recipes and seeds the trials actually ran, and `registry.decide` lets no audit that is weaker
than a failed one certify the same weights."""

from __future__ import annotations

import dataclasses

import pytest

from sophon_ray import tasks
from sophon_ray.audit.driver import MINIMUM, Plan, assemble, ran, standard_of
from sophon_ray.audit.space import AuditPlanner
from sophon_ray.config import Recipe
from sophon_ray.pipelines import PIPELINES, load
from sophon_ray.tracking.registry import at_least_as_strong, decide

SUBJECTS = {"protected": "/m/protected", "scratch": None, "original": "/m/source"}
VALUES = {"protected": 0.30, "scratch": 0.31, "original": 0.62}  # margin -0.01, control gap +0.31: passes


def _trials(budgets, recipes: int = 16, reruns: tuple[int, ...] = (0, 1, 2), seeds: int = 2) -> list[dict]:
    """audit.json trial records of a passing audit: every recipe on every subject with seed 0, then
    `reruns` (recipe indices) with seeds 1..`seeds`; ids as `space.trial_id` makes them."""
    out = []
    plan = [(i, 0) for i in range(recipes)] + [(i, s) for s in range(1, seeds + 1) for i in reruns]
    for i, seed in plan:
        for subject, value in VALUES.items():
            out.append({"id": f"{subject}-r{i:02d}-s{seed}", "subject": subject, "recipe": {"lr": 1e-3 * (i + 1)},
                        "seed": seed, "status": "ok", "curve": {str(b): value for b in budgets}})
    return out


def _plan(cfg, standard_cfg, budgets=None, seeds: int = 2) -> Plan:
    """A Plan as `make_plan` builds it: `budgets` (--budgets) replace the config's, the standard
    is taken from the config before that."""
    standard = standard_of(cfg, standard_cfg)
    if budgets is not None:
        cfg = dataclasses.replace(cfg, attack=dataclasses.replace(cfg.attack, budgets=tuple(budgets)))
    return Plan(cfg, "out/protected", "/m/protected", "ab" * 32, SUBJECTS, "quick-v3", None, None, seeds, None,
                standard=standard)


@pytest.fixture
def pipeline_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("name: mine\ndescription: a user's pipeline file\nbase: digits\n"
                    "attack: {budgets: [10, 25, 50, 100, 300]}\n")
    return path


def test_pipeline_file_audited_with_budgets_1_does_not_certify(pipeline_file):
    standard_cfg = load(pipeline_file, smoke=False)
    cfg = tasks.get_pipeline(pipeline_file)
    assert cfg.name == "mine" and "mine" not in PIPELINES and max(cfg.attack.budgets) == 300
    audit = assemble(_plan(cfg, standard_cfg, budgets=[1]), _trials([1]), len(_trials([1])), 0.02, None, n_explore=16)
    assert audit["verdict"]["status"] == "passed" and audit["budgets"] == [1]
    std = audit["strength"]["standard"]
    assert (std["source"], std["pipeline"], std["budgets"], std["max_budget"]) == ("pipeline", "mine", [10, 25, 50, 100, 300], 300)
    assert audit["certification"] == {"certifies": False,
                                      "problems": ["largest budget 1 < the standard's 300 (pipeline mine)"]}
    # the same audit at the pipeline's own budgets certifies: the budget was the only problem
    full = _trials(cfg.attack.budgets)
    audit = assemble(_plan(cfg, standard_cfg), full, len(full), 0.02, None, n_explore=16)
    assert audit["certification"] == {"certifies": True, "problems": []}


def test_set_overrides_and_renames_do_not_move_the_standard(pipeline_file):
    standard_cfg = load(pipeline_file, smoke=False)
    # --set attack.budgets=[1] is applied before the audit; the standard is still the file's
    cfg = tasks.get_pipeline(pipeline_file, overrides=["attack.budgets=[1]"])
    assert standard_of(cfg, standard_cfg)["max_budget"] == 300
    # renamed to a bundled pipeline's name (whose largest budget is smaller): still the file's own
    renamed = tasks.get_pipeline(pipeline_file, overrides=["name=digits"])
    std = standard_of(renamed, standard_cfg)
    assert {k: std[k] for k in ("source", "pipeline", "budgets", "max_budget")} == {
        "source": "pipeline", "pipeline": "mine", "budgets": [10, 25, 50, 100, 300], "max_budget": 300}
    # a bundled pipeline renamed, without the pipeline as written: no standard, never certifies
    other = tasks.get_pipeline("digits", overrides=["name=my-digits", "attack.budgets=[1]"])
    std = standard_of(other, None)
    assert std["source"] == "unknown" and std["max_budget"] is None and "not a bundled pipeline" in std["reason"]
    trials = _trials([1])
    audit = assemble(_plan(other, None), trials, len(trials), 0.02, None, n_explore=16)
    assert audit["verdict"]["status"] == "passed" and not audit["certification"]["certifies"]
    assert audit["certification"]["problems"] == [f"no budget standard: {std['reason']}"]
    # a bundled name without the pipeline as written: that pipeline's own (non-smoke) budgets
    digits = tasks.get_pipeline("digits", smoke=True)
    std = standard_of(digits, None)
    assert std["source"] == "bundled" and std["budgets"] == list(PIPELINES["digits"].get_config().attack.budgets)
    # a different kind than the pipeline as written: no standard
    assert standard_of(tasks.get_pipeline("digits-diffusion"), standard_cfg)["source"] == "unknown"


def test_audit_without_reruns_records_one_seed_and_does_not_certify():
    """top_k=0 (reachable from run_audit and the Python API): the planner plans no re-run, so
    every recipe ran with one seed, whatever --seeds asked for."""
    cfg = tasks.get_pipeline("digits")
    recipes = tuple(Recipe(lr=1e-4 * (i + 1)) for i in range(16))
    planner = AuditPlanner(tuple(SUBJECTS), recipes=recipes, seeds=3, top_k=0)
    configs = [planner.suggest(f"t{i}") for i in range(16 * 3)]
    for i, c in enumerate(configs):
        planner.on_trial_complete(f"t{i}", {"score": VALUES[c["subject"]]})
    assert planner.suggest("t-last") == "FINISHED" and len(planner.planned) == 16 * 3  # no re-run planned
    budgets = cfg.attack.budgets
    trials = [{"id": c["id"], "subject": c["subject"], "recipe": c["recipe"], "seed": c["seed"], "status": "ok",
               "curve": {str(b): VALUES[c["subject"]] for b in budgets}} for c in planner.planned.values()]
    audit = assemble(_plan(cfg, load("digits"), seeds=3), trials, planner.total, 0.02, None, n_explore=16)
    s = audit["strength"]
    assert audit["verdict"]["status"] == "passed"
    assert (s["seeds"], s["seeds_requested"], s["reruns"], s["recipes"], s["trials"]) == (1, 3, 0, 16, 48)
    assert audit["certification"] == {"certifies": False, "problems": [f"1 seeds per re-run recipe < {MINIMUM['seeds']}"]}


def test_ran_counts_what_the_trials_ran():
    trials = _trials([10], recipes=16, reruns=(0, 4), seeds=2)
    assert ran(trials) == {"recipes": 16, "reruns": 2, "seeds": 3}  # seed 0 + re-run seeds 1, 2
    trials[-1]["status"] = "failed"  # one re-run of recipe 4 on "original" did not finish
    assert ran(trials) == {"recipes": 16, "reruns": 2, "seeds": 2}
    assert ran(_trials([10], recipes=4, reruns=())) == {"recipes": 4, "reruns": 0, "seeds": 1}
    assert ran([]) == {"recipes": 0, "reruns": 0, "seeds": 0}


def _rec(run, status, recipes, trials=None, budget=300, eps=0.02, order=1):
    return {"run": run, "status": status, "certifies": status == "passed", "recipes": recipes,
            "trials": trials if trials is not None else recipes * 3 + 54, "max_budget": budget, "epsilon": eps,
            "order": order}


def test_a_failed_audit_blocks_every_audit_that_is_not_at_least_as_strong():
    failed48 = _rec("f48", "failed", 48)
    passed16 = _rec("p16", "passed", 16, order=2)
    assert decide([failed48, passed16]) == (failed48, False)  # strength first, outcome second
    assert decide([passed16]) == (passed16, True)
    # an audit as strong in every respect may certify; stronger on one axis but weaker on another may not
    passed48 = _rec("p48", "passed", 48, order=3)
    assert at_least_as_strong(passed48, failed48) and decide([failed48, passed16, passed48]) == (passed48, True)
    for weaker in (_rec("b", "passed", 64, budget=100), _rec("e", "passed", 64, eps=0.03),
                   _rec("t", "passed", 64, trials=100)):
        assert not at_least_as_strong(weaker, failed48) and decide([failed48, weaker])[1] is False
    # inconclusive or weak passing audits block nothing; of several certifying audits the strongest decides
    inconclusive = _rec("i", "inconclusive", 200)
    assert decide([inconclusive, passed16]) == (passed16, True)
    assert decide([passed16, passed48, _rec("f10", "failed", 10)]) == (passed48, True)
    # equal strength: the failed one ranks first among audits that do not certify
    assert decide([_rec("p", "inconclusive", 48), failed48])[0] is failed48


def test_a_suite_protocol_that_does_not_certify_or_counts_epochs_never_certifies():
    cfg = tasks.get_pipeline("digits")
    trials = _trials(cfg.attack.budgets)
    plan = _plan(cfg, load("digits"))
    assert assemble(plan, trials, len(trials), 0.02, None, n_explore=16)["certification"]["certifies"]
    for protocol, problem in ((tasks.SuiteProtocol(certifies=False), "suite quick-v3's protocol does not certify"),
                              (tasks.SuiteProtocol(unit="epochs"), "budgets in epochs, the pipeline's in steps")):
        audit = assemble(dataclasses.replace(plan, protocol=protocol), trials, len(trials), 0.02, None, n_explore=16)
        assert audit["certification"]["problems"] == [problem]


LITE = "name: lite\nbase: mnist-to-digits\nattack: {budgets: [1]}\n"


def test_a_pipeline_file_cannot_lower_the_standard_of_a_bundled_model(tmp_path):
    """Issue 35: a four-line file with mnist-to-digits' model and data and budgets [1] audits a
    mnist-to-digits model; the standard is still mnist-to-digits' largest budget (400 steps), and
    audit.json shows where it came from."""
    (tmp_path / "lite.yaml").write_text(LITE)
    written = load(tmp_path / "lite.yaml", smoke=False)
    cfg = tasks.get_pipeline(str(tmp_path / "lite.yaml"))
    card = {"pipeline": "mnist-to-digits"}
    std = standard_of(cfg, written, card)
    assert (std["source"], std["pipeline"], std["max_budget"]) == ("card", "mnist-to-digits", 400)
    assert {"lite", "mnist-to-digits"} <= set(std["covers"])
    # the same file with a model whose card names the file: the bundled pipeline of the same model and data
    assert standard_of(cfg, written, {"pipeline": "lite"})["pipeline"] == "mnist-to-digits"
    plan = dataclasses.replace(_plan(cfg, written), standard=std)
    trials = _trials([1])
    audit = assemble(plan, trials, len(trials), 0.02, None, n_explore=16)
    assert audit["verdict"]["status"] == "passed" and not audit["certification"]["certifies"]
    assert audit["strength"]["standard"]["max_budget"] == 400
    assert audit["certification"]["problems"] == ["largest budget 1 < the standard's 400 (card mnist-to-digits)"]


def test_the_kind_floor_holds_for_a_users_own_data(tmp_path):
    """A pipeline of the user's own data matches no bundled one: its own budgets, but never below
    the kind's floor (FLOOR_STEPS)."""
    from sophon_ray.audit.certify import FLOOR_STEPS

    (tmp_path / "own.yaml").write_text("name: own\nbase: digits\ninput: {size: 12}\nattack: {budgets: [5, 10]}\n")
    written = load(tmp_path / "own.yaml", smoke=False)
    std = standard_of(tasks.get_pipeline(str(tmp_path / "own.yaml")), written, {"pipeline": "own"})
    assert (std["source"], std["max_budget"]) == ("floor", FLOOR_STEPS["classifier"]) == ("floor", 50)


def _facts_audit(facts, mode="quick-v3", attack_seed=0):
    cfg = tasks.get_pipeline("digits", overrides=[f"attack.seed={attack_seed}"])
    plan = dataclasses.replace(_plan(cfg, load("digits")), mode=mode, model_facts=facts)
    trials = _trials(cfg.attack.budgets)
    return assemble(plan, trials, len(trials), 0.02, None, n_explore=16)


def test_a_harden_round_does_not_certify_on_the_recipes_it_trained_on():
    fed = {"mode": "quick-v3", "attack_seed": 0, "seeds": 2, "rounds": [1]}
    own = _facts_audit({"guard_passed": True, "trained_against": fed})
    assert own["verdict"]["status"] == "passed" and not own["certification"]["certifies"]
    assert own["certification"]["problems"][0].startswith("the model trained on this suite's recipes (quick-v3")
    # another suite, or fresh seeds (another attack seed), can certify the same weights
    assert _facts_audit({"trained_against": fed}, mode="default-v2")["certification"]["certifies"]
    assert _facts_audit({"trained_against": fed}, attack_seed=7)["certification"]["certifies"]
    assert _facts_audit({"trained_against": None})["certification"]["certifies"]


def test_a_guard_that_never_passed_blocks_certification():
    audit = _facts_audit({"guard_passed": False, "trained_against": None})
    assert audit["verdict"]["status"] == "passed"
    assert audit["certification"]["problems"] == [
        "the protection's guard never passed (original-domain metric below the source's)"]
    assert _facts_audit({"guard_passed": None})["certification"]["certifies"]  # a model without a guard (source)


def test_recheck_recomputes_what_the_dict_claims():
    from sophon_ray.audit.driver import recheck

    audit = _facts_audit({})
    assert recheck(audit)["certification"] == audit["certification"] == {"certifies": True, "problems": []}
    forged = {**audit, "trials": [t for t in audit["trials"] if t["subject"] != "original"]}  # no control left
    assert forged["certification"]["certifies"] and not recheck(forged)["certification"]["certifies"]
    assert not recheck({"format": "x"})["certification"]["certifies"]
