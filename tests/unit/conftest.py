"""Unit tests are pure: none may leave a Ray instance running in this process. They run torch on
one thread (restored afterwards): their tensors are tiny, and a second thread spin-waiting on a
busy 2-core machine made single tests 5-10x slower."""

from __future__ import annotations

import sys

import pytest

from tests.support import one_thread


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(autouse=True)
def _no_ray():
    yield
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized(), "a unit test started Ray; move it to tests/integration"
