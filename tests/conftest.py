"""Test-wide isolation: MLflow writes to a per-session SQLite store, never ./mlruns."""

from __future__ import annotations

import os

import pytest

from sophon_ray import ray_local

ray_local.loopback_env()  # before any test imports Ray: local instances listen on 127.0.0.1 only


@pytest.fixture(scope="session", autouse=True)
def _isolated_mlflow(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlruns")
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    yield
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
