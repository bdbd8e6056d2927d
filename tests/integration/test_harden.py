"""The hardening loop on a real local Ray (Ray Train protection, Ray Tune audits) and MLflow
(SQLite): a harden killed after round 1 resumes there, round 2 starts from round 1's weights with
round 1's strongest recipes in its environment space, each round is a registry version with its
audit recorded, and the harden run shows removed per budget per round."""

from __future__ import annotations

import json

import pytest

from sophon_ray import tasks
from sophon_ray.app.harden import harden
from sophon_ray.modeldir import read_card
from sophon_ray.outputs import claim

FAST = ["pretrain.steps=30", "protect.iterations=3"]


@pytest.mark.slow  # ~3 min on 2 busy cores: 2 rounds of Ray Train protection + Ray Tune audit, then a rerun
def test_a_killed_harden_resumes_after_its_last_finished_round(ray_local, digits_models, tmp_path):
    from mlflow import MlflowClient

    cfg = tasks.get_pipeline("digits", True, FAST)
    root = claim(tmp_path / "harden", "harden")
    source = digits_models / "source"
    first: list[str] = []
    kw = dict(source=source, rounds=2, workers=1, suite="test-v1", seeds=1, concurrency=2, samples=False,
              smoke=True, model_name="sophon-harden-test")

    def stop(r, record):  # as a Ctrl-C right after round 1's state was written
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        harden(cfg, root, on_round=stop, log=first.append, **kw)
    state = json.loads((root / "harden.json").read_text())
    assert [r["round"] for r in state["rounds"]] == [1] and state["done"] is None
    assert not (root / "round-2").exists()
    r1 = state["rounds"][0]
    weights1 = root / "round-1" / "protected" / "model.safetensors"
    stamp, sha1 = weights1.stat().st_mtime_ns, read_card(weights1.parent)["sha256"]
    assert r1["sha256"] == sha1 and r1["fed_back"] and r1["env_recipes"] == []
    client = MlflowClient()
    exp = client.get_experiment_by_name("sophon-ray").experiment_id
    runs = client.search_runs([exp], "tags.kind = 'harden'")
    assert len(runs) == 1 and runs[0].info.status == "KILLED"

    again: list[str] = []
    summary = harden(cfg, root, log=again.append, **kw)  # the same command again
    assert not any(line.startswith("round 1") for line in again), again[:5]  # round 1 is not redone
    assert weights1.stat().st_mtime_ns == stamp
    assert [r["round"] for r in summary["rounds"]] == [1, 2] and summary["done"] in ("rounds", "passed")
    card2 = read_card(root / "round-2" / "protected")
    assert card2["lineage"]["start"]["sha256"] == sha1  # round 2 started from round 1's weights ...
    assert card2["lineage"]["source"]["sha256"] == read_card(source)["sha256"]  # ... the source stays the control
    recipes = card2["lineage"]["protect"]["env"]["recipes"]
    fed = [f["env"] for f in r1["fed_back"]]
    assert recipes == summary["rounds"][1]["env_recipes"] and recipes[0] == fed[0]  # round 1's strongest, exactly
    assert all(f in recipes for f in fed)
    progress = next((root / ".ray").glob(f"*-from{sha1[:8]}")) / "progress.jsonl"
    assert any(json.loads(line).get("fts_recipe_envs", 0) > 0 for line in progress.read_text().splitlines())
    assert summary["audit"]["model"]["sha256"] == card2["sha256"]
    # round 2 trained on round 1's audit recipes: its card says which, and an audit of that suite and
    # attack seed records it (and would not certify it); round 1 trained on none
    fed_by = card2["lineage"]["fed_by"]
    assert (fed_by["mode"], fed_by["attack_seed"], fed_by["rounds"]) == (summary["audit"]["strength"]["mode"], 0, [1])
    assert summary["audit"]["strength"]["model"]["trained_against"] == fed_by
    assert any("trained on this suite's recipes" in p for p in summary["audit"]["certification"]["problems"])
    assert "fed_by" not in read_card(root / "round-1" / "protected")["lineage"]
    assert isinstance(card2["lineage"]["guard"]["passed"], bool)  # recorded on the Ray Train path too

    # each round: a registry version with its audit recorded on it
    for rec in summary["rounds"]:
        mv = client.get_model_version("sophon-harden-test", str(rec["version"]))
        assert mv.tags["weights_sha256"] == rec["sha256"] and any(k.startswith("audit/") for k in mv.tags)
    # the harden run (resumed, now finished): removed per budget at step = round, the plot
    run = client.search_runs([exp], "tags.kind = 'harden'")[0]
    assert run.info.status == "FINISHED"
    for b in summary["audit"]["budgets"]:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"removed_{b}"))
        want = [(r["round"], r["removed"][str(b)]) for r in summary["rounds"] if r["removed"].get(str(b)) is not None]
        assert [s for s, _ in history] == [s for s, _ in want]
        assert [v for _, v in history] == pytest.approx([v for _, v in want])
    assert (root / "removed.png").stat().st_size > 0
    assert "removed.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
    # a third run of the same command has nothing left to do (no Ray, no MLflow run)
    done: list[str] = []
    assert harden(cfg, root, log=done.append, **kw)["rounds"] == summary["rounds"] and "nothing to do" in done[-1]


@pytest.mark.slow  # ~1-2 min on 2 busy cores: round 0's audit, one in-process protection and its audit
def test_a_harden_from_a_start_model_audits_it_first_and_trains_on_its_attacks(ray_local, digits_models, tmp_path):
    cfg = tasks.get_pipeline("digits", True, FAST)
    root = claim(tmp_path / "harden", "harden")
    source, start = digits_models / "source", digits_models / "protected"
    start_card = read_card(start)
    log: list[str] = []
    kw = dict(source=source, start=start, rounds=1, workers=0, suite="test-v1", seeds=1, concurrency=2,
              samples=False, smoke=True, model_name="sophon-harden-start-test")
    summary = harden(cfg, root, log=log.append, **kw)
    r0, r1 = summary["rounds"]
    assert r0["round"] == 0 and r0["model"] == str(start.resolve()) and r0["sha256"] == start_card["sha256"]
    assert r0["audit"] == "round-0/audit/audit.json" and (root / r0["audit"]).is_file()
    assert not (root / "round-0" / "protected").exists()  # the start's weights stay where they are
    assert json.loads((root / r0["audit"]).read_text())["model"]["sha256"] == start_card["sha256"]
    assert r0["fed_back"] and r0["seconds"]["protect"] == 0.0
    card1 = read_card(root / "round-1" / "protected")
    assert card1["lineage"]["start"]["sha256"] == start_card["sha256"]  # round 1 protects from the start ...
    assert card1["lineage"]["source"]["sha256"] == read_card(source)["sha256"]  # ... the source stays the control
    assert r1["env_recipes"][0] == r0["fed_back"][0]["env"] and card1["lineage"]["fed_by"]["rounds"] == [0]
    assert any("audit of the --start model" in line for line in log)
    done: list[str] = []  # the same command again: nothing left to do
    assert harden(cfg, root, log=done.append, **kw)["rounds"] == summary["rounds"] and "nothing to do" in done[-1]
