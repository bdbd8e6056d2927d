"""MLflow tracking and registry for sophon-ray: the only package that imports mlflow.

Importing `sophon_ray.tracking` imports neither mlflow nor ray: mlflow is imported by the
functions that need it, ray only by `AuditCallback` (resolved lazily on first access).

Store (store.py)
    `ensure_store(uri=None) -> str`: call in the driver before any Ray worker or trial starts.
    Default: SQLite `./mlruns/mlflow.db` with artifacts in `./mlruns/artifacts` (absolute paths,
    so Ray workers elsewhere reach them); `--tracking-uri` / $MLFLOW_TRACKING_URI for a server
    (checked with GET /health, 3 s timeout: an unreachable server is a one-line UserError before
    any work starts), another `sqlite:///...` file, or a directory. Experiment: "sophon-ray"
    (or $MLFLOW_EXPERIMENT_NAME). Returns the resolved URI to pass on.

Runs (runs.py)
    `Tracker.start(kind, pipeline, config_dict, tags=None, parent_run_id=None, tracking_uri=None,
    resume=False)` -> a context manager; run name `<kind>-<pipeline>-<config hash8>`; logs the
    config as flattened params and `config.json`, tags kind/pipeline/config_hash/git_commit/
    ray_job_submission_id. Methods: `log_metrics(dict, step)`, `log_artifacts(path, artifact_path)`,
    `log_model_dir(dir, artifact_path="model") -> "runs:/<id>/model"`, `log_audit(audit, out_dir)`,
    `set_tags(dict)`, `end(status)`; attributes `run_id`, `run_name`, `uri`. Ends FINISHED, FAILED
    on an exception (tag `error`), KILLED on Ctrl-C.

Audit trials (callback.py)
    `AuditCallback(parent_run_id, tracking_uri)`: a `ray.tune.Callback`; one child run per trial,
    every numeric result key at step `result["steps"]`; written only by the Tune driver.

Registry (registry.py, download.py)
    `register_protected(model_dir, name, run_id, source=None, domains=None, tracking_uri=None) -> version`
    (alias `candidate`; tags weights_sha256, card_sha256, source_model, domains, protect_run_id),
    `record_audit(name, version, audit, audit_run_id) -> passed` (alias `audited` only for a pass of
    the version's exact sha256), `promote(name, version, alias)` (refuses `audited` without such a
    pass), `list_models() -> rows`, `show("name" | "name@alias" | "name/3") -> dict`,
    `version_rows(show(...)) -> rows`, `format_table(rows) -> str`,
    `versions_with_sha256(sha) -> [(name, version)]` (which versions hold exactly these weights),
    `download_model("models:/NAME@ALIAS" | "models:/NAME/VERSION" | "runs:/RUN_ID/PATH") -> Path`
    (registry downloads are verified against the weights_sha256 / card_sha256 tags).

Why plain artifacts and not an MLflow pyfunc model: a registered version points at the protect
run's model-directory artifacts (model.safetensors + model.json + metrics.json) exactly as
`sophon_ray.load_model` reads them. A pyfunc `python_model` is stored with cloudpickle (or, as
"models from code", as a Python file executed at load time), either way code runs when a model
is loaded; `log_model` also costs seconds per call and writes a second copy of the weights.
Plain artifacts keep one copy, no code and no pickle, and a version can be verified by hash.
"""

from __future__ import annotations

from typing import Any

from sophon_ray.tracking.download import cache_root, download_model, resolve_model
from sophon_ray.tracking.registry import (
    format_table,
    list_models,
    promote,
    record_audit,
    register_protected,
    show,
    version_rows,
    versions_with_sha256,
)
from sophon_ray.tracking.runs import Tracker, run_name
from sophon_ray.tracking.store import ensure_store, resolve_uri

__all__ = [
    "AuditCallback", "Tracker", "cache_root", "download_model", "ensure_store", "format_table", "list_models",
    "promote", "record_audit", "register_protected", "resolve_model", "resolve_uri", "run_name", "show", "version_rows",
    "versions_with_sha256",
]


def __getattr__(name: str) -> Any:
    if name == "AuditCallback":  # imports ray: only when asked for
        from sophon_ray.tracking.callback import AuditCallback

        return AuditCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
