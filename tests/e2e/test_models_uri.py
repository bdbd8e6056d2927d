"""`models:/` references through every form of --tracking-uri: the default ./mlruns, a SQLite URI,
a directory, a real `mlflow server` (the console script in subprocesses)."""

from __future__ import annotations

import os
import subprocess

from tests.support import BIN, FAST, mlflow_server


def _cli(args, cwd, env=None, timeout=300):
    return subprocess.run([str(BIN / "sophon-ray"), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_models_uri_resolves_through_every_tracking_uri_form(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["SOPHON_RAY_CACHE"] = str(tmp_path / "cache")
    work = tmp_path / "work"
    work.mkdir()
    src = tmp_path / "source"
    r = _cli(["pretrain", "digits", *FAST, "--out", str(src)], work, env)
    assert r.returncode == 0, r.stderr[-2000:]
    # the default store (./mlruns under the working directory): register via protect, then use the alias
    r = _cli(["protect", "digits", *FAST, "--source", str(src), "--out", str(tmp_path / "p")], work, env)
    assert r.returncode == 0, r.stderr[-2000:]
    r = _cli(["attack", "digits", *FAST, "--model", "models:/sophon-digits@candidate", "--recipe", "lr=0.01"], work, env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (work / "mlflow.db").exists()  # no stray store from MLflow's own default
    for form in ("mlruns", f"sqlite:///{work}/mlruns/mlflow.db", str(work / "mlruns")):
        r = _cli(["attack", "digits", *FAST, "--model", "models:/sophon-digits@candidate", "--recipe", "lr=0.01",
                  "--tracking-uri", form], tmp_path if form != "mlruns" else work, env)
        assert r.returncode == 0, (form, r.stderr[-2000:])
    with mlflow_server(tmp_path / "server") as uri:
        r = _cli(["protect", "digits", *FAST, "--source", str(src), "--out", str(tmp_path / "p2"), "--tracking-uri", uri],
                 tmp_path, env)
        assert r.returncode == 0, r.stderr[-2000:]
        r = _cli(["attack", "digits", *FAST, "--model", "models:/sophon-digits@candidate", "--recipe", "lr=0.01",
                  "--tracking-uri", uri], tmp_path, env)
        assert r.returncode == 0, r.stderr[-2000:]
    assert not (tmp_path / "mlflow.db").exists()
