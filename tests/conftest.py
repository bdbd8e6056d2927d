"""Shared fixtures: MLflow isolated per session, one local Ray instance per module that asks for
it, and the small digits / digits-diffusion models several folders attack.

Layout: `unit/` (pure: no Ray, no MLflow server, under a minute), `integration/` (a real local
Ray instance, a real MLflow SQLite store or `mlflow server`), `e2e/` (the console script and
`ray job submit` as a user runs them, real signals). Helpers live in `tests/support.py`.
"""

from __future__ import annotations

import os

import pytest

from sophon_ray.runtime import ray_local as _ray_local

from tests.support import FAST, one_thread

_ray_local.loopback_env()  # before any test imports Ray: local instances listen on 127.0.0.1 only


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


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance of our own (2 CPUs, quiet, on 127.0.0.1) for one test module; shut
    down (and its State API address dropped) when the module is done, so tests that need no Ray
    running (or start their own) see none."""
    import ray

    from sophon_ray.train.driver import quiet_ray_env

    quiet_ray_env()
    assert not ray.is_initialized(), "a Ray instance is already running in this process"
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             **_ray_local.local_init_kwargs())
    yield
    _ray_local.shutdown()


@pytest.fixture(scope="session")
def digits_models(tmp_path_factory):
    """digits source and protected model directories (FAST settings) made by the console script
    in this process: `<root>/source`, `<root>/protected`."""
    from sophon_ray.app.cli import main

    root = tmp_path_factory.mktemp("digits-models")
    with one_thread():
        assert main(["pretrain", "digits", *FAST, "--out", str(root / "source")]) == 0
        assert main(["protect", "digits", *FAST, "--source", str(root / "source"), "--out", str(root / "protected")]) == 0
    return root


@pytest.fixture(scope="session")
def diffusion_models(tmp_path_factory):
    """digits-diffusion smoke models made by the console script in this process (protection
    in-process, `--local`): `<root>/source`, `<root>/protected`."""
    from sophon_ray.app.cli import main

    root = tmp_path_factory.mktemp("dd-models")
    with one_thread():
        assert main(["pretrain", "digits-diffusion", "--smoke", "--out", str(root / "source")]) == 0
        assert main(["protect", "digits-diffusion", "--smoke", "--local", "--source", str(root / "source"),
                     "--out", str(root / "protected")]) == 0
    return root
