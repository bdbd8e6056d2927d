"""End to end with real clients: `ray job submit` of `sophon-ray run` to a local Ray head, an
`mlflow server` on 127.0.0.1, then the MLflow client finds the registered, audited version."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.support import BIN, ROOT, free_port, mlflow_server


@pytest.fixture()
def ray_head(tmp_path):
    """A Ray head of our own (`ray start --head --block` in its own session), killed as a group at
    the end: unlike `ray stop`, this leaves any other Ray on the machine alone."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the job must use the URI it is given
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # this head's own addresses, not another instance's
        env.pop(k, None)
    heads = []
    try:
        # One retry with fresh ports: a port picked free can be taken again before Ray binds it.
        for attempt in range(2):
            port, dash = free_port(), free_port()
            # every port of our own, so another Ray on the machine (default agent port 52365) cannot clash
            ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port",
                     "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port"]
            own = [x for flag in ports for x in (flag, str(free_port()))]
            head = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--disable-usage-stats", *own],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            heads.append((head, port))
            address = f"http://127.0.0.1:{dash}"
            deadline = time.time() + 90
            up = False
            while time.time() < deadline and head.poll() is None:
                if subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                                  capture_output=True).returncode == 0:
                    up = True
                    break
                time.sleep(1)
            if up:
                break
            _kill_group(head)
        assert up, "Ray head did not come up (two attempts)"
        yield address, env
    finally:
        for head, port in heads:
            _kill_group(head)
            _remove_address_file(port)


def _kill_group(head: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        time.sleep(3)


def _remove_address_file(port: int) -> None:
    """`ray start` wrote its address to Ray's address file; a killed head leaves it behind and
    every later State API lookup on this machine would wait on the dead GCS."""
    addr_file = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if addr_file.exists() and addr_file.read_text().strip().endswith(f":{port}"):
        addr_file.unlink(missing_ok=True)


def _submit(address, env, *args, timeout=900):
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--", *args]
    for _ in range(30):  # the head's job agent comes up a few seconds after the dashboard
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if "No available agent" not in r.stdout + r.stderr:
            return r
        time.sleep(2)
    return r


# Not marked slow (~90 s): the one `ray job submit` path stays in `make test`.
def test_ray_job_submit_run_registers_audited_model(ray_head, tmp_path):
    from mlflow import MlflowClient

    address, env = ray_head
    with mlflow_server(tmp_path / "mlflow") as uri:
        out = tmp_path / "run"
        r = _submit(address, env, "sophon-ray", "run", "digits", "--smoke", "--tracking-uri", uri, "--out", str(out))
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        job_id = re.search(r"Job '(raysubmit_\w+)' succeeded", r.stdout + r.stderr).group(1)
        from ray.job_submission import JobStatus, JobSubmissionClient

        assert JobSubmissionClient(address).get_job_status(job_id) == JobStatus.SUCCEEDED
        client = MlflowClient(uri)
        versions = client.search_model_versions("name='sophon-digits'")
        assert len(versions) == 1
        tags = versions[0].tags
        audit = json.loads((out / "audit" / "audit.json").read_text())  # what the job's audit wrote
        assert tags["audit_status"] == audit["verdict"]["status"] and tags["audit_sha256"] == audit["model"]["sha256"]
        audit_run = client.get_run(tags["audit_run_id"])  # the job's audit run says the same
        assert audit_run.data.tags["audit_status"] == audit["verdict"]["status"]
        assert audit_run.data.tags["ray_job_submission_id"] == job_id
        assert "weights_sha256" in tags and tags["audit_certifies"] == "false"  # a --smoke audit never certifies
        aliases = client.get_registered_model("sophon-digits").aliases
        assert aliases.get("candidate") == versions[0].version and "audited" not in aliases
        # a job with a bad pipeline fails fast, says why, registers nothing
        t = time.time()
        bad = _submit(address, env, "sophon-ray", "run", "nope", "--tracking-uri", uri, "--out", str(tmp_path / "bad"),
                      timeout=300)
        assert bad.returncode != 0 and "unknown pipeline" in bad.stdout + bad.stderr
        assert time.time() - t < 120
        assert len(client.search_model_versions("name='sophon-digits'")) == 1
