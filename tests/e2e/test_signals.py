"""Real processes, real signals: an audit stopped with Ctrl-C records no verdict and keeps the
alias, a Ray Train protection stopped with SIGTERM writes no model, and a protection whose
driver was interrupted resumes from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sophon_ray.app.cli import main

from tests.support import BIN, FAST


def _wait_for(proc, path: Path, needle: str, timeout: float) -> str:
    """Poll `path` (the process's stderr) until `needle` appears; returns the text so far."""
    end = time.time() + timeout
    while time.time() < end:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        if proc.poll() is not None:
            pytest.fail(f"process ended ({proc.returncode}) before {needle!r}:\n{text[-3000:]}")
        time.sleep(0.5)
    proc.kill()
    pytest.fail(f"no {needle!r} within {timeout}s")


def _interrupt(args, cwd, env, needle, sig, tmp_path, timeout=240):
    log = tmp_path / f"stderr-{sig}.txt"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(BIN / "sophon-ray"), *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=f)
        _wait_for(proc, log, needle, timeout)
        proc.send_signal(sig)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the process did not stop within 90 s of the signal")
    return rc, log.read_text()


# ~30 s, not marked slow: the Ctrl-C and SIGTERM behaviour stays in `make test`.
def test_interrupted_audit_writes_no_verdict_and_keeps_the_alias(tmp_path):
    from mlflow import MlflowClient

    env = {**os.environ, "SOPHON_RAY_CACHE": str(tmp_path / "cache")}
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    env["MLFLOW_TRACKING_URI"] = uri
    src, prot = tmp_path / "source", tmp_path / "protected"
    assert main(["pretrain", "digits", *FAST, "--out", str(src)]) == 0
    assert main(["protect", "digits", *FAST, "--source", str(src), "--out", str(prot), "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    client.set_registered_model_alias("sophon-digits", "audited", "1")  # as if a strong audit had certified it
    for sig, code in ((signal.SIGINT, 130),):
        out = tmp_path / f"audit-{sig}"
        rc, err = _interrupt(["audit", "digits", "--smoke", "--model", str(prot), "--suite", "test-v1",
                              "--budgets", "200", "--concurrency", "1", "--out", str(out)],
                             tmp_path, env, "audit 1/", sig, tmp_path)
        assert rc == code, err[-2000:]
        assert "interrupted" in err.splitlines()[-1] and "Traceback" not in err
        assert not (out / "audit.json").exists() and not (out / "report.html").exists()
        assert client.get_registered_model("sophon-digits").aliases.get("audited") in ("1", 1)
        assert not any(k.startswith("audit") for k in client.get_model_version("sophon-digits", "1").tags)
        runs = client.search_runs([client.get_experiment_by_name("sophon-ray").experiment_id],
                                  "tags.kind = 'audit'", order_by=["attributes.start_time DESC"])
        assert runs[0].info.status == "KILLED"


# ~25 s, not marked slow (see above): a real Ray Train protection stopped by SIGTERM.
def test_interrupted_protect_writes_no_model(tmp_path):
    env = dict(os.environ)
    src, out = tmp_path / "source", tmp_path / "protected"
    assert main(["pretrain", "digits", *FAST, "--out", str(src)]) == 0
    rc, err = _interrupt(["protect", "digits", "--smoke", "--set", "protect.iterations=40", "--source", str(src),
                          "--workers", "1", "--out", str(out)], tmp_path, env, "protect 2", signal.SIGTERM, tmp_path)
    assert rc == 143, err[-2000:]
    assert "Traceback" not in err and not out.exists() and not list(tmp_path.glob(".protected*"))


@pytest.mark.slow
def test_resume_after_driver_interrupted(digits_models, tmp_path):
    out, storage = tmp_path / "prot", tmp_path / "storage"
    argv = [sys.executable, "-m", "sophon_ray.app.cli", "protect", "digits", "--smoke", "--source", str(digits_models / "source"),
            "--out", str(out), "--workers", "1", "--storage-path", str(storage),
            "--set", "protect.iterations=40", "--set", "protect.guard_every=5"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    progress = None
    while time.time() < deadline:
        found = list(storage.glob("*/checkpoint_*"))
        if found:
            progress = found[0].parent / "progress.jsonl"
            break
        time.sleep(0.5)
    assert progress is not None, "no checkpoint appeared"
    proc.send_signal(signal.SIGINT)  # Ctrl-C on the driver: it stops and shuts its local Ray down
    assert proc.wait(timeout=60) != 0
    assert not out.exists()
    interrupted_at = max(json.loads(x)["iteration"] for x in progress.read_text().splitlines())
    assert interrupted_at < 40
    r = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 40
    first = json.loads(progress.read_text().splitlines()[0])["iteration"]
    assert first > 4  # the resumed run started from a checkpoint, not from iteration 0
