"""`sophon-ray run --paper` (issue 30 part 2, what `make demo` runs): after the main audit, the
protected model is audited with the SOPHON paper's protocol (paper-v1) in <out>/audit-paper,
tracked and recorded on the registered version like any audit, and the summary prints both
audits side by side with what each verdict means; a re-run skips every stage, the paper audit too."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from sophon_ray.app.cli import main
from tests.support import FAST, one_thread


@pytest.mark.slow
def test_run_paper_adds_a_tracked_paper_v1_audit_side_by_side(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    args = ["run", "digits", *FAST, "--paper", "--workers", "0", "--seeds", "1", "--concurrency", "2",
            "--tracking-uri", uri, "--out", str(tmp_path / "run")]
    with one_thread():
        assert main(args) == 0
    out, err = capsys.readouterr()
    full = json.loads((tmp_path / "run" / "audit" / "audit.json").read_text())
    paper = json.loads((tmp_path / "run" / "audit-paper" / "audit.json").read_text())
    assert paper["model"]["sha256"] == full["model"]["sha256"]
    p = paper["protocol"]
    assert (p["suite"], p["unit"], p["budgets"], p["certifies"]) == ("paper-v1", "epochs", [1, 2], False)  # --smoke: 1, 2
    assert p["attacker_data"] == "full restricted training split" and not paper["certification"]["certifies"]
    assert len(paper["trials"]) == 27 and {t["seed"] for t in paper["trials"]} == {0}  # each recipe once, 3 subjects
    assert "[4/4] paper-v1 audit on Ray Tune" in err
    table = out[out.index("Side by side"):].splitlines()
    assert [line.split()[:3] for line in table if line.startswith(("test-v1 ", "paper-v1 "))][:2] == [
        ["test-v1", "5", "steps"], ["paper-v1", "1", "epoch"]]
    assert f"paper-v1    {paper['verdict']['status'].upper()}: margin" in table[-10:] or any(
        line.startswith(f"paper-v1    {paper['verdict']['status'].upper()}: margin") for line in table)
    assert "What the verdicts mean:\n- The full audit (test-v1) " in out and "- The paper protocol (paper-v1) " in out
    # recorded like any audit: its own MLflow run, and a tag on the registered version beside the main audit's
    client = MlflowClient(uri)
    version = client.get_model_version_by_alias("sophon-digits", "candidate")
    audits = {k: json.loads(v) for k, v in version.tags.items() if k.startswith("audit/")}
    assert len(audits) == 2, version.tags
    assert {r.data.params.get("run.suite") for r in (client.get_run(k.split("/", 1)[1]) for k in audits)} == {"test-v1", "paper-v1"}
    with one_thread():
        assert main(args) == 0
    err = capsys.readouterr().err
    assert "[3/4] audit: " in err and "[4/4] paper-v1 audit: " in err and err.count("up to date, skipped") == 4
