"""Budgets carry their unit wherever they are shown (issue 35 item 5): a paper-v1 audit counts
epochs, so report.html, the printed tables and the plain-words verdict say "epochs" (with the
optimizer steps each meant, from the trials' `step_budgets`), never "steps"; `--smoke` shrinks a
protocol suite's epochs; a diffusion audit's sample grids fine-tune for the steps the audit's
largest budget meant. Pure: hand-made audit dicts, no data, no training, no Ray."""

from __future__ import annotations

import json
import re

import pytest

from sophon_ray import tasks
from sophon_ray.audit.verdict import (audit_detail_table, audit_table, budget_label, budgets_line, meaning,
                                      side_by_side, step_equivalents, table, verdict)

RECIPE = {"strategy": "direct-all", "optimizer": "momentum", "lr": 1e-4, "batch_size": 200}


def _audit(unit: str = "epochs", budgets=(5, 10, 20), steps_per_budget=(22, 70), metric: str = "accuracy",
           broken: bool = False) -> dict:
    """The smallest audit dict `write_report` and the tables take: one ok trial per subject and
    per step multiplier (an epoch is 22 steps at batch 200 and 70 at batch 64: a range), a verdict,
    the protocol record with its unit. `broken`: the protected model beats scratch at 20 (failed)."""
    worst = {"original": {"5": 0.90, "10": 0.95, "20": 0.97}, "scratch": {"5": 0.40, "10": 0.60, "20": 0.80},
             "protected": {"5": 0.30, "10": 0.55, "20": 0.95 if broken else 0.81}}
    worst = {s: {b: v for b, v in c.items() if int(b) in budgets} for s, c in worst.items()}
    trials = []
    for i, per in enumerate(steps_per_budget):
        for subject, curve in worst.items():
            t = {"id": f"{subject}-r{i:02d}-s0", "subject": subject, "seed": 0, "status": "ok",
                 "recipe": {**RECIPE, "batch_size": 200 if i == 0 else 64}, "curve": dict(curve)}
            if unit == "epochs":
                t |= {"train_images": 4400, "step_budgets": [b * per for b in budgets]}
            trials.append(t)
    return {"format": "sophon-ray/audit@1", "model": {"uri": "/m/protected", "sha256": "ab" * 32},
            "pipeline": "mnist-to-digits", "metric": metric, "attacker_goal": "max", "budgets": list(budgets),
            "trials": trials, "worst_case": worst, "verdict": verdict(worst, 0.02, min_gap=0.10),
            "protocol": {"suite": "paper-v1" if unit == "epochs" else "test-v1", "unit": unit,
                         "budgets": list(budgets), "attacker_data": "full restricted training split"}}


def test_step_equivalents_read_the_trials_step_budgets():
    audit = _audit()
    assert step_equivalents(audit) == {"5": (110, 350), "10": (220, 700), "20": (440, 1400)}
    one = _audit(steps_per_budget=(22,))
    assert step_equivalents(one) == {"5": (110, 110), "10": (220, 220), "20": (440, 440)}
    assert budget_label(20, "epochs", step_equivalents(one)) == "20 epochs (~440 steps)"
    assert budget_label(20, "epochs", step_equivalents(audit)) == "20 epochs (~440-1400 steps)"
    assert budget_label(1, "epochs") == "1 epoch" and budget_label(25) == "25 steps"
    assert budgets_line(one) == "5, 10, 20 epochs (~110, ~220, ~440 steps)"
    steps = _audit(unit="steps", budgets=(10, 20))
    assert step_equivalents(steps) == {} and budgets_line(steps) == "10, 20 steps"
    old = {k: v for k, v in steps.items() if k != "protocol"}  # an audit.json from before the protocol record
    assert budgets_line(old) == "10, 20 steps"


def test_report_html_of_a_paper_v1_audit_labels_epochs_not_steps(tmp_path):
    pytest.importorskip("matplotlib")
    from sophon_ray.audit.report import write_report

    page = write_report(_audit(steps_per_budget=(22,)), tmp_path).read_text()
    assert "subject \\ epochs" in page and "subject \\ steps" not in page
    assert "fine-tuning steps" not in page
    assert "budgets 5, 10, 20 epochs (≈110, ≈220, ≈440 steps)" in page
    assert "<th>20<br><small>≈440 steps</small></th>" in page
    assert (tmp_path / "curves.png").is_file()
    (tmp_path / "samples.json").write_text(json.dumps({"recipe": RECIPE, "steps": 440, "budget": "the audit's 20 epochs",
                                                       "samples": 8, "sample_steps": 5, "judge": None, "subjects": {}}))
    page = write_report(_audit(steps_per_budget=(22,)), tmp_path).read_text()
    assert "440 steps (the audit&#x27;s 20 epochs), 8 samples" in page
    steps_page = write_report(_audit(unit="steps", budgets=(10, 20)), tmp_path / "steps").read_text()
    assert "subject \\ steps" in steps_page and "<th>20</th>" in steps_page and "epoch" not in steps_page


def test_curves_plot_names_the_unit(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from sophon_ray.audit import report

    seen = {}
    real = report.save_figure

    def keep(fig, path):
        ax = fig.axes[0]
        seen["xlabel"], seen["ticks"] = ax.get_xlabel(), [t.get_text() for t in ax.get_xticklabels()]
        return real(fig, path)

    monkeypatch.setattr(report, "save_figure", keep)
    report.plot_curves(_audit(steps_per_budget=(22,)), tmp_path / "curves.png")
    assert seen["xlabel"].startswith("fine-tuning budget (epochs") and "\n≈440" in seen["ticks"][-1]
    report.plot_curves(_audit(unit="steps", budgets=(10, 20)), tmp_path / "steps.png")
    assert seen["xlabel"] == "fine-tuning budget (steps)" and seen["ticks"] == ["10", "20"]


def test_printed_tables_label_epochs_with_their_steps():
    audit = _audit()
    lines = audit_table(audit).splitlines()
    assert lines[0].split()[:3] == ["subject", "\\", "epochs"] and lines[0].split()[3:] == ["5", "10", "20"]
    assert lines[1].split() == ["(steps)", "~110-350", "~220-700", "~440-1400"]
    assert any(line.startswith("protected") and line.split()[1:] == ["0.300", "0.550", "0.810"] for line in lines)
    assert "steps" not in lines[0]
    plain = table(audit["worst_case"], (5, 10, 20), 3, audit["verdict"])  # the old call: steps, no second row
    assert plain.splitlines()[0].split()[:3] == ["subject", "\\", "steps"] and "(steps)" not in plain
    steps = audit_table(_audit(unit="steps", budgets=(10, 20))).splitlines()
    assert steps[0].split() == ["subject", "\\", "steps", "10", "20"] and set(steps[1]) == {"-"}
    detail = {**audit, "worst_case_detail": {"protected": {"t1": {"5": 0.1, "10": 0.2, "20": 0.3}}}}
    d = audit_detail_table(detail).splitlines()
    assert d[0].split()[2] == "epochs" and d[1].split()[0] == "(steps)" and d[-1].split()[:2] == ["protected", "t1"]
    assert audit_detail_table(audit) == ""


def test_harden_rounds_table_and_plot_name_the_unit(tmp_path, monkeypatch):
    from sophon_ray.audit import report
    from sophon_ray.audit.rounds import plot_removed, removed_table

    rounds = [{"round": 1, "status": "failed", "margin": 0.2, "removed": {"5": 0.25, "20": None}},
              {"round": 2, "status": "passed", "margin": -0.01, "removed": {"5": 1.1, "20": 0.5}}]
    text = removed_table(rounds, [5, 20], "epochs").splitlines()
    assert text[0].split() == ["round", "status", "margin", "5", "epochs", "20", "epochs"]
    assert text[2].split()[-2:] == ["25%", "-"] and text[3].split()[-2:] == ["110%", "50%"]
    assert removed_table(rounds, [5, 20]).splitlines()[0].split()[3:] == ["5", "steps", "20", "steps"]
    labels = []
    real = report.save_figure
    monkeypatch.setattr(report, "save_figure", lambda fig, path: (labels.extend(
        t.get_text() for t in fig.axes[0].get_legend().get_texts()), real(fig, path))[1])
    plot_removed(rounds, [5, 20], tmp_path / "removed.png", "epochs")
    assert labels[:2] == ["5 epochs", "20 epochs"] and (tmp_path / "removed.png").stat().st_size > 0


def test_side_by_side_and_meaning_name_epochs_and_their_steps():
    paper, full = _audit(steps_per_budget=(22,)), _audit(unit="steps", budgets=(10, 20))
    text = side_by_side([("quick-v3", full), ("paper-v1", paper)])
    assert re.search(r"paper-v1\s+5 epochs \(~110 steps\)\s+0\.400", text)
    assert re.search(r"^\s+20 epochs \(~440 steps\)\s+0\.800", text, re.M)
    assert re.search(r"quick-v3\s+10 steps\s+0\.600", text)
    assert "at these budgets (5, 10, 20 epochs (~110, ~220, ~440 steps))" in meaning(paper, "paper")  # passed
    assert "at these budgets (10, 20 steps)" in meaning(full, "full")
    broken = meaning(_audit(steps_per_budget=(22,), broken=True), "paper")
    assert "FAILED" in broken and "from scratch at 20 epochs (~440 steps) (strongest:" in broken
    assert "from scratch at 20 steps (strongest:" in meaning(_audit(unit="steps", budgets=(10, 20), broken=True), "full")


def test_smoke_shrinks_a_protocol_suites_epochs_only():
    from sophon_ray.audit.driver import check_audit_flags
    from sophon_ray.tasks.base import SMOKE_EPOCHS, STEPS_PROTOCOL
    from sophon_ray.tasks.classifier.suites import PROTOCOLS
    from sophon_ray.tasks.diffusion.suites import PROTOCOLS_DIFFUSION

    assert SMOKE_EPOCHS == (1, 2)
    for p in (PROTOCOLS["paper-v1"], PROTOCOLS_DIFFUSION["paper-v1"]):
        small = p.smoke()
        assert small.budgets == (1, 2) and small.unit == "epochs" and p.budgets == (5, 10, 20)
        assert (small.attacker_data, small.metric_key, small.certifies) == (p.attacker_data, p.metric_key, p.certifies)
    assert STEPS_PROTOCOL.smoke() is STEPS_PROTOCOL
    cfg = tasks.get_pipeline("mnist-to-digits", smoke=True)
    protocol, budgets, _ = check_audit_flags(cfg, suite="paper-v1", search=None, smoke=True)
    assert budgets == (1, 2) and protocol.unit == "epochs"
    assert check_audit_flags(cfg, suite="paper-v1", search=None)[1] == (5, 10, 20)  # not smoke: the protocol
    assert check_audit_flags(cfg, suite="paper-v1", search=None, budgets=(3,), smoke=True)[1] == (3,)  # --budgets wins
    assert check_audit_flags(cfg, suite="test-v1", search=None, smoke=True)[1] == tuple(cfg.attack.budgets)


def test_diffusion_samples_fine_tune_for_the_steps_the_audit_budget_meant():
    from sophon_ray.tasks.diffusion.samples import attack_steps, strongest_recipe, strongest_trial

    audit = _audit(metric="mse", steps_per_budget=(22, 70))
    for t in audit["trials"]:  # the batch-64 recipe (70 steps an epoch) reaches the lowest MSE
        if t["recipe"]["batch_size"] == 64 and t["subject"] == "protected":
            t["curve"] = {"5": 0.2, "10": 0.1, "20": 0.05}
    trial = strongest_trial(audit)
    assert trial["recipe"]["batch_size"] == 64 and strongest_recipe(audit).batch_size == 64
    assert attack_steps(audit) == attack_steps(audit, trial) == (1400, "the audit's 20 epochs")  # not 20 steps
    first = next(t for t in audit["trials"] if t["subject"] == "protected" and t["recipe"]["batch_size"] == 200)
    assert attack_steps(audit, first) == (440, "the audit's 20 epochs")
    steps = _audit(unit="steps", budgets=(10, 20), metric="mse")
    assert attack_steps(steps) == (20, None)  # a steps audit: its largest budget as it is
    del first["step_budgets"]
    assert attack_steps(audit, first) is None  # epochs without their steps: unknown, never the bare 20


def test_diffusion_audit_extras_pass_the_step_budget_to_the_sample_grids(tmp_path, monkeypatch):
    from sophon_ray.tasks.diffusion import samples

    task = tasks.of(tasks.get_pipeline("digits-diffusion", smoke=True))
    audit = _audit(metric="mse", steps_per_budget=(22,))
    seen = {}
    monkeypatch.setattr(samples, "sample_report", lambda task, subjects, out, recipe, **kw: seen.update(kw) or kw)
    task.audit_extras(audit, {"protected": "/m/protected", "scratch": None}, tmp_path, log=lambda line: None)
    assert seen["steps"] == 440 and seen["budget"] == "the audit's 20 epochs"  # 20 epochs of 22 steps, not 20 steps
    for t in audit["trials"]:
        del t["step_budgets"]
    info = task.audit_extras(audit, {"protected": "/m/protected", "scratch": None}, tmp_path, log=lambda line: None)
    assert "does not record the optimizer steps" in info["skipped"]
