"""Starting a local Ray instance of our own, with its State API pinned to it.

Ray's State API (used inside Ray Train V2 by the placement-group cleaner, which asks whether
the Train controller is alive) finds its server through `RAY_API_SERVER_ADDRESS`, else
`RAY_ADDRESS`, else the address file `/tmp/ray/ray_current_cluster` that `ray start` writes.
A head that was killed instead of `ray stop`-ped leaves that file behind, and every State API
call then waits on a dead GCS: each Ray Train `fit()` took 12 s longer to return (the cleaner's
stop timeout), measured in `docs/benchmarks.md`. For an instance we start ourselves we choose
the dashboard port and point `RAY_API_SERVER_ADDRESS` at it before `ray.init`, so the raylet and
every worker inherit an address that belongs to this instance (answering, or refusing at once
when the dashboard is off). A value the user set is never overridden.

A local instance listens on 127.0.0.1 only. Ray 2.60 binds its gRPC servers (GCS, raylet,
workers) to the node's IP, or to all interfaces, unless that IP is the loopback address; it
resolves "127.0.0.1" to the machine's external IP unless `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`,
a setting Ray reads once, when it is imported. `loopback_env()` sets it before Ray is imported
(the CLI does this first thing; tests in conftest.py); `local_init_kwargs` passes
`_node_ip_address="127.0.0.1"` and, should Ray have been imported before (a notebook), turns the
already-read setting off for this process. `ss -ltn` during a local audit then shows every Ray
socket on 127.0.0.1 (tests/integration/test_runtime.py checks it). Connecting to a cluster changes nothing.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from sophon_ray.errors import UserError

_ENV = "RAY_API_SERVER_ADDRESS"
LOOPBACK = "127.0.0.1"
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray keeps a local node on the loopback address
_ours: dict[str, Any] = {"value": None, "instance": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env() -> None:
    """Before Ray is imported: make a local Ray instance this process starts listen on 127.0.0.1
    only (a value the user set is kept)."""
    os.environ.setdefault(_CLUSTER_ENV, "0")


def _loopback_node() -> dict[str, Any]:
    from ray._private import ray_constants

    if os.environ.get(_CLUSTER_ENV, "0") in ("1", "true", "True"):
        return {}  # the user asked for an externally reachable node
    loopback_env()
    ray_constants.ENABLE_RAY_CLUSTER = False  # read at import; Ray was imported before loopback_env()
    return {"_node_ip_address": LOOPBACK}


def quiet_token_notice() -> None:
    """Ray 2.60 prints a WARNING on every start that token authentication is on (the default, kept
    as it is); the notice is noise for our own local instance (`--verbose` shows it)."""
    import logging

    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def local_init_kwargs(prestart: bool = True) -> dict[str, Any]:
    """Extra `ray.init(address="local", ...)` arguments for a fresh local instance.

    Args:
        prestart: let the raylet start one idle worker process per CPU when the driver connects
            (Ray's default). Plain actors and tasks (Ray Tune trials) start on them; Ray Train
            V2's controller and workers never do (they carry their own runtime env), so for an
            instance that only runs Ray Train they are processes competing for the CPUs while
            Train starts (`prestart_worker_first_driver`, measured in docs/benchmarks.md).
    Returns:
        {"dashboard_port": port, "_node_ip_address": "127.0.0.1"} (and `_system_config` without
        prestart);
        `RAY_API_SERVER_ADDRESS` is set to that port on 127.0.0.1 unless the user set it.
    """
    port = _free_port()
    _ours["instance"] = True
    quiet_token_notice()
    current = os.environ.get(_ENV)
    if current is None or current == _ours["value"]:
        _ours["value"] = os.environ[_ENV] = f"http://127.0.0.1:{port}"
    extra: dict[str, Any] = {"dashboard_port": port, **_loopback_node()}
    if not prestart:
        extra["_system_config"] = {"prestart_worker_first_driver": False}
    return extra


def owns_instance() -> bool:
    """Whether this process runs a local Ray instance it started itself (with `local_init_kwargs`),
    i.e. one no other job shares and that `shutdown` will stop. Instances started here must be
    stopped with `shutdown` (not bare `ray.shutdown`), or a later connection to a shared cluster
    would still count as ours."""
    import ray

    return bool(_ours["instance"]) and ray.is_initialized()


def shutdown() -> None:
    """`ray.shutdown()`, then drop the `RAY_API_SERVER_ADDRESS` that `local_init_kwargs` set, so
    that nothing later in this process (or a subprocess it starts, e.g. `ray job submit` to another
    cluster) asks the stopped instance's dashboard port."""
    import ray

    ray.shutdown()
    _ours["instance"] = False
    if _ours["value"] is not None and os.environ.get(_ENV) == _ours["value"]:
        del os.environ[_ENV]
    _ours["value"] = None


def check_address(address: str | None) -> None:
    """Fail fast with one line when an explicit `host:port` Ray address is unreachable."""
    if not address or address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address {address!r}: expected host:port (e.g. 127.0.0.1:6379) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError:
        raise UserError(f"Ray cluster at {address} is unreachable; start it (ray start --head) or fix --ray-address") from None
