"""`make demo`'s benchmark and summary (issue 30 part 2): the demo pipeline is the reduced
mnist-to-digits that README and docs/design.md describe, the Makefile runs it with the paper's
protocol beside the full audit, and the summary's side-by-side table and plain-words verdicts
read what audit.json says. No data, no training: the pipeline is only loaded."""

from __future__ import annotations

import re
from pathlib import Path

from sophon_ray import tasks
from sophon_ray.audit.verdict import meaning, side_by_side, verdict
from sophon_ray.config import ArchSpec

ROOT = Path(__file__).resolve().parents[2]


def test_demo_pipeline_is_the_reduced_mnist_to_digits_the_docs_describe():
    base, demo = tasks.get_pipeline("mnist-to-digits"), tasks.get_pipeline("mnist-to-digits-demo")
    assert demo.name == "mnist-to-digits-demo"
    # the same benchmark: domains, labels, normalisation, attacker data, pretraining recipe
    assert (demo.original, demo.restricted) == (base.original, base.restricted)
    assert (demo.input.mean, demo.input.std, demo.input.channels) == (base.input.mean, base.input.std, 1)
    assert demo.attack.train_per_class == base.attack.train_per_class == 10
    assert (demo.pretrain.batch_size, demo.pretrain.lr) == (base.pretrain.batch_size, base.pretrain.lr)
    # reduced as README's quick start and docs/design.md "The demo" say
    assert demo.input.size == 16 and demo.arch == ArchSpec(name="cnn-small", kwargs={"width": 16})
    assert demo.pretrain.steps == 600
    p = demo.protect
    assert (p.iterations, p.envs_per_step, p.inner_steps, p.loss, p.init) == (300, 2, 10, "ice-neg", "source")
    assert demo.attack.budgets == (10, 25, 50)
    assert tasks.of(demo).run_suite == "quick-v3"
    model = tasks.of(demo).new_model(10, 0)
    assert sum(p.numel() for p in model.parameters()) == 16_794
    smoke = tasks.get_pipeline("mnist-to-digits-demo", smoke=True)
    assert smoke.protect.iterations == 4 and smoke.attack.budgets == (5, 10) and smoke.arch.kwargs == {"width": 4}


def test_make_demo_runs_the_demo_pipeline_with_the_papers_protocol():
    make = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^demo: .*\n((?:\t.*\n)+)", make, re.M).group(1)
    assert "sophon-ray run mnist-to-digits-demo --paper" in recipe
    assert "OMP_NUM_THREADS=1" in recipe  # one torch thread in the driver: 2 threads on a busy 2-core VM ran ~10x slower


def _audit(worst, suite, unit, budgets, recipe=None, epsilon=0.02):
    v = verdict(worst, epsilon, min_gap=0.10)
    best = max(worst["protected"], key=lambda b: worst["protected"][b] - worst["scratch"][b])
    trials = [{"subject": "protected", "status": "ok", "recipe": recipe or {"strategy": "direct-all", "optimizer": "rmsprop",
               "lr": 1e-3, "batch_size": 32}, "curve": {best: worst["protected"][best]}}]
    return {"verdict": v, "worst_case": worst, "budgets": budgets, "trials": trials, "metric": "accuracy",
            "protocol": {"suite": suite, "unit": unit, "attacker_data": "x"}}


FULL = _audit({"scratch": {"10": 0.5, "25": 0.89}, "original": {"10": 0.93, "25": 0.97},
               "protected": {"10": 0.78, "25": 0.97}}, "quick-v3", "steps", [10, 25])
PAPER = _audit({"scratch": {"5": 0.2, "20": 0.75}, "original": {"5": 0.96, "20": 0.98},
                "protected": {"5": 0.05, "20": 0.76}}, "paper-v1", "epochs", [5, 20],
               recipe={"strategy": "direct-all", "optimizer": "momentum", "lr": 1e-3, "batch_size": 200})


def test_side_by_side_reads_both_audits_per_budget():
    lines = side_by_side([("quick-v3", FULL), ("paper-v1", PAPER)]).splitlines()
    rows = {tuple(line.split()[:3]) if line.startswith(("quick", "paper")) else tuple(line.split()[:2]): line
            for line in lines[2:]}
    assert rows[("quick-v3", "10", "steps")].split()[3:] == ["0.500", "0.930", "0.780", "+0.430", "35%", "broken"]
    assert rows[("25", "steps")].split()[2:] == ["0.890", "0.970", "0.970", "+0.080", "0%", "broken"]
    assert rows[("paper-v1", "5", "epochs")].split()[3:] == ["0.200", "0.960", "0.050", "+0.760", "120%", "holds"]
    assert rows[("20", "epochs")].split()[2:] == ["0.750", "0.980", "0.760", "+0.230", "96%", "holds"]
    assert lines[-2] == "quick-v3    FAILED: margin +0.280 vs epsilon 0.02, control gap +0.430 (min_gap 0.1)"
    assert lines[-1] == "paper-v1    PASSED: margin +0.010 vs epsilon 0.02, control gap +0.760 (min_gap 0.1)"


def test_meaning_says_what_each_verdict_shows():
    failed = meaning(FULL, "The full audit (quick-v3)")
    assert failed.startswith("The full audit (quick-v3) FAILED: fine-tuning the protected model gets an attacker +0.280 "
                             "over training from scratch at 10 steps (strongest: direct-all rmsprop lr0.001 bs32)")
    assert "so this is a real failure" in failed and failed.endswith("does not hold against these attacks.")
    passed = meaning(PAPER, "The paper protocol (paper-v1)")
    assert passed.startswith("The paper protocol (paper-v1) PASSED: no attack in it got more than epsilon 0.02")
    assert "worth up to +0.760" in passed and "attacks it did not try are not covered" in passed
    weak = _audit({"scratch": {"10": 0.9}, "original": {"10": 0.92}, "protected": {"10": 0.9}}, "quick-v3", "steps", [10])
    assert "INCONCLUSIVE" in meaning(weak) and "cannot tell a protected model from an unprotected one" in meaning(weak)


def test_a_run_folder_with_a_paper_audit_is_ours(tmp_path):
    """`run --paper` writes <out>/audit-paper; running again must not take that folder for a user's."""
    from sophon_ray.outputs import _is_ours

    (tmp_path / "audit-paper").mkdir()
    (tmp_path / "audit-paper" / "audit.json").write_text("{}")
    assert _is_ours(tmp_path, "run")
    (tmp_path / "audit-paper" / "notes.txt").write_text("mine")
    assert not _is_ours(tmp_path, "run")
