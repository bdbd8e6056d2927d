"""Starting Ray ourselves, without starting it: the State API address we set is ours alone."""

from __future__ import annotations

import os


def test_local_shutdown_drops_our_state_api_address(monkeypatch):
    """A stopped local instance's dashboard address must not leak into later Ray use (it made the
    e2e test's `ray job list` against another head hang in a full test run)."""
    from sophon_ray.runtime import ray_local

    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    port = ray_local.local_init_kwargs()["dashboard_port"]
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{port}"
    ray_local.shutdown()  # no Ray running here: ray.shutdown() is a no-op
    assert "RAY_API_SERVER_ADDRESS" not in os.environ
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://10.0.0.1:8265")  # the user's own: kept
    ray_local.local_init_kwargs()
    ray_local.shutdown()
    assert os.environ["RAY_API_SERVER_ADDRESS"] == "http://10.0.0.1:8265"
