"""Where runs go: resolve the tracking URI, check a server is up, create the store and experiment.

The embedded default is a SQLite database plus a local artifact folder under the working
directory (`./mlruns/mlflow.db`, `./mlruns/artifacts`). `--tracking-uri` / `MLFLOW_TRACKING_URI`
selects a server (`http(s)://...`), another SQLite file (`sqlite:///path/x.db`, artifacts in
the `artifacts` folder beside it) or a directory (becomes `<dir>/mlflow.db` + `<dir>/artifacts`).

`ensure_store` must run in the driver before any Ray worker or trial starts: creating the
SQLite schema from several processes at once fails (alembic races), so it is created once
here, under a file lock. Every client this package builds gets the URI explicitly: MLflow's
own default (a `mlflow.db` in whatever directory a process happens to run in) is never used.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from sophon_ray.errors import UserError

DEFAULT_DIR = "mlruns"
DB_NAME = "mlflow.db"
ARTIFACTS = "artifacts"
DEFAULT_EXPERIMENT = "sophon-ray"
HEALTH_TIMEOUT_S = 3.0

_READY: dict[tuple[str, str], str] = {}  # (uri, experiment name) -> experiment id, per process
_CLIENTS: dict[str, Any] = {}


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI to use: `uri`, else $MLFLOW_TRACKING_URI, else `sqlite:///<cwd>/mlruns/mlflow.db`.

    A bare path (no scheme) names a directory holding `mlflow.db` and `artifacts/`. SQLite paths
    are made absolute, so Ray workers with another working directory reach the same file.
    """
    uri = (uri or os.environ.get("MLFLOW_TRACKING_URI") or "").strip()
    if not uri:
        return f"sqlite:///{(Path.cwd() / DEFAULT_DIR / DB_NAME).resolve()}"
    scheme = urlparse(uri).scheme
    if not scheme:
        return f"sqlite:///{(Path(uri).expanduser() / DB_NAME).resolve()}"
    if scheme == "sqlite":
        path = _sqlite_path(uri)
        return f"sqlite:///{path.resolve()}" if path is not None else uri
    return uri.rstrip("/") if scheme in ("http", "https") else uri


def experiment_name() -> str:
    """$MLFLOW_EXPERIMENT_NAME, else "sophon-ray"."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def _sqlite_path(uri: str) -> Path | None:
    rest = uri[len("sqlite://"):]
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        return None
    return Path(unquote(rest[1:]) if rest.startswith("//") else unquote(rest))


def check_server(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> None:
    """GET <uri>/health; UserError in one line when the server does not answer OK within `timeout`."""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as resp:
            if resp.status == 200:
                return
            why = f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        why = f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        why = str(getattr(e, "reason", e))
    raise UserError(
        f"MLflow tracking server at {uri} is unreachable; start it or drop --tracking-uri to log locally to ./{DEFAULT_DIR} ({why})"
    )


def client(uri: str) -> Any:
    """An `MlflowClient` bound to `uri` for both tracking and registry (cached per process)."""
    if uri not in _CLIENTS:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow import MlflowClient

        _CLIENTS[uri] = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return _CLIENTS[uri]


def ensure_store(uri: str | None = None, experiment: str | None = None) -> str:
    """Make the tracking store ready before any run, worker or trial starts; return its URI.

    Resolves the URI (see `resolve_uri`); for a server, checks `/health` (3 s timeout); for
    SQLite, creates the folder, the database schema and the artifact folder under a file lock;
    then creates (or restores) the experiment. Idempotent.

    Args:
        uri: tracking URI or None for $MLFLOW_TRACKING_URI / the local default.
        experiment: experiment name (default $MLFLOW_EXPERIMENT_NAME or "sophon-ray").
    Returns:
        The resolved tracking URI, to pass to `Tracker.start`, `AuditCallback` and the registry calls.
    Raises:
        UserError: the server is unreachable, or the store cannot be created.
    """
    uri = resolve_uri(uri)
    if urlparse(uri).scheme in ("http", "https"):
        check_server(uri)
    _experiment_id(uri, experiment or experiment_name(), fresh=True)
    return uri


def experiment_id(uri: str, experiment: str | None = None) -> str:
    """The experiment id in a store made ready by `ensure_store` (done once per process)."""
    return _experiment_id(uri, experiment or experiment_name(), fresh=False)


def _experiment_id(uri: str, name: str, fresh: bool) -> str:
    key = (uri, name)
    if key in _READY and not fresh:
        return _READY[key]
    db = _sqlite_path(uri) if uri.startswith("sqlite:") else None
    if db is None:
        _READY[key] = _get_or_create(client(uri), name, None)
        return _READY[key]
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        (db.parent / ARTIFACTS).mkdir(exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the MLflow store at {db.parent} ({e.strerror}); pass a writable --tracking-uri") from None
    import fcntl

    import logging

    import mlflow  # noqa: F401 - configures its loggers first

    quiet = logging.getLogger("mlflow.store.db.utils")  # "Creating initial MLflow database tables..."
    level = quiet.level
    with open(db.parent / f".{db.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one process creates the schema; the others wait
        quiet.setLevel(logging.WARNING)
        try:
            _READY[key] = _get_or_create(client(uri), name, (db.parent / ARTIFACTS).as_uri())
        finally:
            quiet.setLevel(level)
    return _READY[key]


def _get_or_create(c: Any, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = c.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
    return exp.experiment_id


def open_existing(uri: str | None = None) -> tuple[str, Any]:
    """(resolved URI, client) of a store that must already exist (reading, the registry).

    Never creates a database as a side effect: a missing SQLite file or an unreachable server
    is a UserError naming the fix.
    """
    uri = resolve_uri(uri)
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        check_server(uri)
    elif scheme == "sqlite":
        db = _sqlite_path(uri)
        if db is not None and not db.is_file():
            raise UserError(f"no MLflow store at {db}; run pretrain/protect first or pass --tracking-uri of an existing store")
    return uri, client(uri)
