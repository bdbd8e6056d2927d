"""MLflow tracking and registry against the real thing: SQLite in tmp_path and a real `mlflow server`.

No mocks: runs, params, metrics, artifacts, the registry (aliases, tags, sha256 checks on load),
fail-fast on an unreachable server, and the Ray Tune callback at full concurrency.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import torch

import sophon_ray
from sophon_ray.modeldir import WEIGHTS, save_model_dir, sha256_file
from sophon_ray.config import ArchSpec
from sophon_ray.errors import UserError
from sophon_ray.tracking import (
    Tracker,
    download_model,
    ensure_store,
    format_table,
    list_models,
    promote,
    record_audit,
    register_protected,
    run_name,
    show,
    version_rows,
    versions_with_sha256,
)

from tests.audits import make_audit
from tests.support import free_port, mlflow_server

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # SQLAlchemy inside MLflow


def _model_dir(out: Path, seed: int) -> Path:
    from sophon_ray.models import build_classifier

    torch.manual_seed(seed)
    model = build_classifier(ArchSpec("cnn-tiny"), 5, 1, 16)
    card = {"kind": "classifier", "arch": {"name": "cnn-tiny", "kwargs": {}}, "num_classes": 5,
            "input": {"channels": 1, "size": 16, "resize": "bilinear", "mean": [0.5], "std": [0.5]},
            "pipeline": "digits", "domains": {"original": "digits[0-4]", "restricted": ["digits[5-9]"]},
            "role": "protected", "lineage": {"source": {"path": "/models/source", "sha256": "ab" * 32}}}
    return save_model_dir(out, model, card, {"original_test_accuracy": 0.9})


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory):
    return ensure_store(str(tmp_path_factory.mktemp("store")))  # a directory -> mlflow.db + artifacts/


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    with mlflow_server(root) as uri:
        yield uri, root


@pytest.fixture(params=["sqlite", "server"])
def store(request):
    """(tracking URI, function mapping a run's artifact URI to the local folder holding it)."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_uri"), lambda a: Path(unquote(urlparse(a).path))
    uri, root = request.getfixturevalue("server")
    return ensure_store(uri), lambda a: root / "server-artifacts" / a.split(":", 1)[1].lstrip("/")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SOPHON_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_run_logs_params_metrics_artifacts_and_ends(store, tmp_path, monkeypatch):
    uri, _ = store
    # what `ray job submit` hands its entrypoint: the submission id in the job config's metadata
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_T1"}}))
    config = {"name": "digits", "protect": {"iterations": 3, "env": {"lr": {"sgd": [0.001, 0.1]}}},
              "long": list(range(3000))}
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.html").write_text("<html></html>")
    (tmp_path / "report" / ".tune").mkdir()
    (tmp_path / "report" / ".tune" / "junk.txt").write_text("x")
    model = _model_dir(tmp_path / "model", seed=0)
    with Tracker.start("protect", "digits", config, tags={"extra": {"a": 1}}, tracking_uri=uri) as t:
        for step in range(4):
            t.log_metrics({"fts_loss": 1.0 / (step + 1), "acc": 0.5, "note": "skipped", "curve": {}}, step=step)
        t.log_artifacts(tmp_path / "report")
        assert t.log_model_dir(model) == f"runs:/{t.run_id}/model"
    assert re.fullmatch(r"protect-digits-[0-9a-f]{8}", t.run_name) and t.run_name == run_name("protect", "digits", config)
    c = _client(uri)
    run = c.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == t.run_name
    assert run.data.params["protect.iterations"] == "3"
    assert run.data.params["protect.env.lr.sgd"] == "[0.001, 0.1]"
    assert len(run.data.params["long"]) == 6000 and run.data.params["long"].endswith("...")
    assert [m.value for m in c.get_metric_history(t.run_id, "fts_loss")] == [1.0, 0.5, 1 / 3, 0.25]
    assert [m.step for m in c.get_metric_history(t.run_id, "fts_loss")] == [0, 1, 2, 3]
    assert "note" not in run.data.metrics
    tags = run.data.tags
    assert tags["kind"] == "protect" and tags["pipeline"] == "digits" and json.loads(tags["lineage"])["source"]["path"] == "/models/source"  # the card's lineage
    assert tags["ray_job_submission_id"] == "raysubmit_T1"
    assert json.loads(tags["extra"]) == {"a": 1} and tags["model_sha256"] == sha256_file(model / WEIGHTS)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert tags["git_commit"] == head  # the tests run inside the repository's checkout
    names = {a.path for a in c.list_artifacts(t.run_id)}
    assert names == {"config.json", "report.html", "model"}
    assert {a.path for a in c.list_artifacts(t.run_id, "model")} == {"model/model.safetensors", "model/model.json", "model/metrics.json"}
    # the same config gives the same name; a failing block ends the run FAILED with the error's first line
    with pytest.raises(ValueError):
        with Tracker.start("protect", "digits", config, tracking_uri=uri) as t2:
            raise ValueError("boom\nsecond line")
    assert t2.run_name == t.run_name
    failed = c.get_run(t2.run_id)
    assert failed.info.status == "FAILED" and failed.data.tags["error"] == "ValueError: boom"
    # resume continues the latest unfinished run of that name
    t3 = Tracker.start("protect", "digits", config, tracking_uri=uri, resume=True)
    assert t3.run_id == t2.run_id and c.get_run(t3.run_id).info.status == "RUNNING"
    t3.end()


def test_registry_lifecycle_and_tamper_refused(store, tmp_path, monkeypatch):
    uri, local = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # as the CLI does for --tracking-uri; load_model reads it
    name = "digits-protected"
    model = _model_dir(tmp_path / "protected", seed=1)
    sha = sha256_file(model / WEIGHTS)
    with Tracker.start("protect", "digits", {"seed": 1}, tracking_uri=uri) as t:
        t.log_model_dir(model)
    version = register_protected(model, name, t.run_id, source="/models/source", tracking_uri=uri)
    assert register_protected(model, name, t.run_id, tracking_uri=uri) == version  # same weights: same version
    assert versions_with_sha256(sha, tracking_uri=uri) == [(name, version)]
    info = show(f"{name}@candidate", tracking_uri=uri)
    v = info["versions"][0]
    assert v["version"] == version and v["aliases"] == ["candidate"]
    assert v["tags"]["weights_sha256"] == sha and v["tags"]["protect_run_id"] == t.run_id
    assert v["tags"]["source_model"] == "/models/source" and json.loads(v["tags"]["domains"])["original"] == "digits[0-4]"

    # load back through the registry: identical outputs
    ref, _ = sophon_ray.load_model(model)
    got, card = sophon_ray.load_model(f"models:/{name}@candidate")
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(got(x), ref(x), rtol=0, atol=0)
    assert card["sha256"] == sha

    # audited only after a certifying audit of exactly these weights
    with pytest.raises(UserError, match="no certifying audit"):
        promote(name, version, "audited", tracking_uri=uri)
    rec = record_audit(name, version, make_audit(sha, "failed"), "run-a", tracking_uri=uri)
    assert rec["status"] == "failed" and rec["audited"] is False and rec["overridden_by"] is None
    tags = show(f"{name}/{version}", tracking_uri=uri)["versions"][0]["tags"]
    assert tags["audit_passed"] == "false" and tags["audit_run_id"] == "run-a" and float(tags["audit_margin"]) == pytest.approx(0.19)
    assert json.loads(tags["audit/run-a"])["status"] == "failed"
    assert "audited" not in show(name, tracking_uri=uri)["aliases"]
    for alias in ("audited", "production"):
        with pytest.raises(UserError, match="no certifying audit"):
            promote(name, version, alias, tracking_uri=uri)
    with pytest.raises(UserError, match="sha256"):
        record_audit(name, version, make_audit("f" * 64, "passed"), "run-x", tracking_uri=uri)
    # inconclusive (the control had no power) and weak passing audits never certify
    rec = record_audit(name, version, make_audit(sha, "inconclusive", recipes=60), "run-i", tracking_uri=uri)
    assert rec["status"] == "inconclusive" and rec["audited"] is False
    rec = record_audit(name, version, make_audit(sha, "passed", recipes=160, smoke=True), "run-w", tracking_uri=uri)
    assert rec["audited"] is False and "audited" not in show(name, tracking_uri=uri)["aliases"]
    # the dict's own `certification` is not trusted: recomputed from its trials (a smoke audit)
    forged = make_audit(sha, "passed", recipes=160, smoke=True)
    forged["certification"] = {"certifies": True, "problems": []}
    assert record_audit(name, version, forged, "run-f", tracking_uri=uri)["audited"] is False
    rec = record_audit(name, version, make_audit(sha, "passed"), "run-b", tracking_uri=uri)
    assert rec["audited"] is True and rec["decisive"] == "run-b"
    assert show(name, tracking_uri=uri)["aliases"] == {"candidate": str(version), "audited": str(version)}
    # a later, weaker failing audit is recorded but does not override the stronger certifying one
    rec = record_audit(name, version, make_audit(sha, "failed", recipes=2, reruns=(), seeds=1), "run-c",
                       tracking_uri=uri)
    assert rec["audited"] is True and rec["overridden_by"] == "run-b"
    tags = show(f"{name}/{version}", tracking_uri=uri)["versions"][0]["tags"]
    assert tags["audit_run_id"] == "run-b" and "audit/run-c" in tags
    promote(name, version, "production", tracking_uri=uri)
    promote(name, version, "audited", tracking_uri=uri)
    rows = list_models(tracking_uri=uri)
    assert {"name": name, "versions": 1, "latest": version,
            "aliases": f"audited={version} candidate={version} production={version}"} in rows
    table = format_table(version_rows(show(name, tracking_uri=uri)))
    assert table.splitlines()[0].split()[:4] == ["version", "aliases", "sha256", "audit"] and sha[:12] in table

    # alter the registered files in the artifact store after registration: load is refused
    source = _client(uri).get_model_version(name, str(version)).source
    stored = local(source)
    assert (stored / WEIGHTS).is_file(), source
    other = _model_dir(tmp_path / "other", seed=2)  # consistent weights + card, but not the registered ones
    for f in (WEIGHTS, "model.json"):
        (stored / f).write_bytes((other / f).read_bytes())
    with pytest.raises(UserError, match="sha256"):
        sophon_ray.load_model(f"models:/{name}@audited")
    (stored / WEIGHTS).write_bytes((stored / WEIGHTS).read_bytes()[:-8] + b"\0" * 8)  # plain corruption
    with pytest.raises(UserError, match="sha256"):
        download_model(f"models:/{name}/{version}", tracking_uri=uri)


def _registered(uri: str, tmp_path: Path, name: str, seed: int) -> tuple[str, int]:
    model = _model_dir(tmp_path / f"protected-{seed}", seed=seed)
    with Tracker.start("protect", "digits", {"seed": seed}, tracking_uri=uri) as t:
        t.log_model_dir(model)
    return sha256_file(model / WEIGHTS), register_protected(model, name, t.run_id, tracking_uri=uri)


def test_a_failed_audit_blocks_weaker_passing_audits_of_the_same_weights(sqlite_uri, tmp_path):
    """No audit shopping: after a failed 48-recipe audit, a passing 16-recipe audit of the same
    version is recorded but leaves `audited` unset; only an audit at least as strong certifies."""
    uri, name = sqlite_uri, "shopping"
    sha, version = _registered(uri, tmp_path, name, 5)
    failed48 = make_audit(sha, "failed", recipes=48, reruns=tuple(range(10)), seeds=4)
    assert record_audit(name, version, failed48, "run-48", tracking_uri=uri)["audited"] is False
    rec = record_audit(name, version, make_audit(sha, "passed", recipes=16), "run-16", tracking_uri=uri)
    assert rec == {"status": "passed", "certifies": True, "audited": False, "decisive": "run-48",
                   "overridden_by": "run-48", "blocked_by": ["run-48"]}
    tags = show(f"{name}/{version}", tracking_uri=uri)["versions"][0]["tags"]
    assert "audited" not in show(name, tracking_uri=uri)["aliases"]
    assert (tags["audit_run_id"], tags["audit_status"], tags["audit_certifies"]) == ("run-48", "failed", "false")
    assert json.loads(tags["audit/run-16"])["recipes"] == 16 and json.loads(tags["audit/run-48"])["recipes"] == 48
    with pytest.raises(UserError, match="no certifying audit"):
        promote(name, version, "audited", tracking_uri=uri)
    # more recipes but fewer trials than the failed audit: still not at least as strong
    more = make_audit(sha, "passed", recipes=64)
    assert len(more["trials"]) < len(failed48["trials"])
    rec = record_audit(name, version, more, "run-64", tracking_uri=uri)
    assert rec["audited"] is False and rec["blocked_by"] == ["run-48"]
    # as strong in every respect (recipes, trials, largest budget, epsilon): certifies
    rec = record_audit(name, version, make_audit(sha, "passed", recipes=48, reruns=tuple(range(10)), seeds=4),
                       "run-48b", tracking_uri=uri)
    assert rec["audited"] is True and rec["decisive"] == "run-48b" and rec["blocked_by"] == []
    assert show(name, tracking_uri=uri)["aliases"]["audited"] == str(version)


def test_a_failed_paper_audit_in_epochs_blocks_a_passing_step_audit(sqlite_uri, tmp_path):
    """Budgets compare in optimizer steps: a failed 20-epoch paper-v1 audit (440 steps here) blocks a
    passing audit whose largest budget is 100 steps, though 100 > 20 as plain numbers; and an audit
    recorded under another pipeline than the version's is refused unless its standard covers it."""
    uri, name = sqlite_uri, "units"
    sha, version = _registered(uri, tmp_path, name, 6)
    paper = make_audit(sha, "failed", suite="paper-v1", recipes=9, reruns=())
    assert paper["budgets"] == [5, 10, 20] and paper["strength"]["max_steps"] == 440
    rec = record_audit(name, version, paper, "run-paper", tracking_uri=uri)
    assert rec["audited"] is False and json.loads(show(f"{name}/{version}", tracking_uri=uri)["versions"][0]["tags"]
                                                  ["audit/run-paper"])["max_budget"] == 440
    steps = make_audit(sha, "passed", recipes=48)  # to 100 steps: more recipes and trials, but shorter
    assert steps["certification"]["certifies"] and steps["strength"]["max_steps"] == 100
    rec = record_audit(name, version, steps, "run-steps", tracking_uri=uri)
    assert rec["audited"] is False and rec["blocked_by"] == ["run-paper"]
    assert "audited" not in show(name, tracking_uri=uri)["aliases"]
    # an audit of the same weights under another pipeline whose standard does not cover "digits"
    other = make_audit(sha, "passed", recipes=48)
    other["pipeline"], other["strength"]["standard"]["covers"] = "lite", ["lite"]
    with pytest.raises(UserError, match="protected under 'digits'"):
        record_audit(name, version, other, "run-lite", tracking_uri=uri)


def test_audit_run_metrics_match_audit_json(sqlite_uri, tmp_path):
    """The verdict's figures under their own names: the run's `verdict_control_gap` is audit.json's
    control gap (the largest gap over budgets), not the gap at the largest budget, and the per-budget
    gaps have their own key. Read back through the MLflow client, compared with the logged audit.json."""
    from sophon_ray.audit.verdict import verdict, worst_case
    from sophon_ray.outputs import write_json_atomic

    trials = [{"subject": s, "status": "ok", "curve": c} for s, c in (
        ("protected", {"25": 0.30, "50": 0.52, "100": 0.80}), ("scratch", {"25": 0.31, "50": 0.52, "100": 0.80}),
        ("original", {"25": 0.60, "50": 0.70, "100": 0.80}))]
    worst = worst_case(trials)
    audit = {"format": "sophon-ray/audit@1", "model": {"uri": "x", "sha256": "ab" * 32}, "pipeline": "digits",
             "metric": "accuracy", "attacker_goal": "max", "budgets": [25, 50, 100], "trials": trials,
             "worst_case": worst, "verdict": verdict(worst, 0.02, min_gap=0.10),
             "certification": {"certifies": False, "problems": ["a --smoke audit"]}}
    assert audit["verdict"]["control_gap"] == pytest.approx(0.29) and audit["verdict"]["gap"]["100"] == 0.0
    out = tmp_path / "audit"
    out.mkdir()
    write_json_atomic(out / "audit.json", audit)
    with Tracker.start("audit", "digits", {"suite": "x"}, tracking_uri=sqlite_uri) as run:
        run.log_audit(audit, out)
    c = _client(sqlite_uri)
    logged = json.loads(Path(c.download_artifacts(run.run_id, "audit.json", str(tmp_path / "dl"))).read_text())
    v, metrics = logged["verdict"], c.get_run(run.run_id).data.metrics
    assert metrics["verdict_control_gap"] == pytest.approx(v["control_gap"])
    assert metrics["verdict_margin"] == pytest.approx(v["margin"]) and metrics["verdict_epsilon"] == v["epsilon"]
    assert metrics["verdict_min_gap"] == v["min_gap"] and metrics["verdict_passed"] == float(v["passed"])
    assert [m.step for m in c.get_metric_history(run.run_id, "verdict_control_gap")] == [0]  # logged once
    for name in ("gap", "residual", "removed"):
        history = {str(m.step): m.value for m in c.get_metric_history(run.run_id, f"budget_{name}")}
        assert history == pytest.approx({b: x for b, x in v[name].items() if x is not None}), name
    assert c.get_run(run.run_id).data.tags["audit_status"] == v["status"] == "passed"


def test_unknown_names_are_one_line_user_errors(store):
    uri, _ = store
    for call in (lambda: show("no-such-model", tracking_uri=uri),
                 lambda: download_model("models:/no-such-model@candidate", tracking_uri=uri),
                 lambda: promote("no-such-model", 1, "audited", tracking_uri=uri),
                 lambda: show("bad name!", tracking_uri=uri)):
        with pytest.raises(UserError) as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        show("no-such-model", tracking_uri=uri)


def test_unreachable_server_fails_fast(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.perf_counter()
    with pytest.raises(UserError, match="unreachable; start it or drop --tracking-uri") as e:
        ensure_store(uri)
    assert time.perf_counter() - start < 5 and "\n" not in str(e.value)
    with pytest.raises(UserError, match="unreachable"):
        download_model("models:/x@candidate", tracking_uri=uri)
    with pytest.raises(UserError, match="no MLflow store"):  # reading never creates a database
        list_models(tracking_uri=str(tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists()


def test_tune_callback_logs_every_point_with_one_writer(ray_local, sqlite_uri, tmp_path, monkeypatch):
    from ray import tune

    from sophon_ray.tracking import AuditCallback

    def _trial(config):  # nested: pickled by value, workers need not import this test module
        for b in range(1, 6):
            tune.report({"steps": 10 * b, "value": config["x"] * b, "best": float(b), "curve": {str(b): 1.0}})
        if config["x"] == 15.0:
            raise RuntimeError("this trial fails after its last report")

    for k, v in {"RAY_AIR_NEW_OUTPUT": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}.items():
        monkeypatch.setenv(k, v)
    with Tracker.start("audit", "digits", {"suite": "t16"}, tracking_uri=sqlite_uri) as parent:
        callback = AuditCallback(parent.run_id, sqlite_uri)
        grid = tune.Tuner(
            _trial,
            param_space={"x": tune.grid_search([float(i) for i in range(16)]), "id": tune.sample_from(lambda s: f"t{int(s.config['x']):02d}")},
            tune_config=tune.TuneConfig(max_concurrent_trials=2, reuse_actors=True),
            run_config=tune.RunConfig(name="cb", storage_path=str(tmp_path), verbose=0, callbacks=[callback]),
        ).fit()
    assert len(grid) == 16 and len(grid.errors) == 1
    c = _client(sqlite_uri)
    children = c.search_runs([c.get_run(parent.run_id).info.experiment_id],
                             filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'", max_results=100)
    assert len(children) == 16
    status = {r.info.run_name: (r.info.status, r.data.tags["trial_status"]) for r in children}
    assert status.pop("trial-t15") == ("FAILED", "failed") and set(status.values()) == {("FINISHED", "ok")}
    assert sorted(r.info.run_name for r in children) == [f"trial-t{i:02d}" for i in range(16)]
    for key in ("value", "best"):
        points = [m for r in children for m in c.get_metric_history(r.info.run_id, key)]
        assert len(points) == 16 * 5, key
    for r in children:
        hist = c.get_metric_history(r.info.run_id, "value")
        x = float(r.data.params["x"])
        assert sorted((m.step, m.value) for m in hist) == [(10 * b, x * b) for b in range(1, 6)]
        assert set(r.data.metrics) == {"value", "best"}
    assert callback.points == 16 * 5 * 2
