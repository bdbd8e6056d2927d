"""Run logging: one MLflow run per pretrain / protect / audit, named deterministically.

A `Tracker` wraps one run through `MlflowClient` only (no fluent API, no global active run),
so it is safe in a thread and never touches MLflow's default store. Run names are
`<kind>-<pipeline>-<8 hex of the config hash>` (never timestamps). At start a run gets the
resolved config as flattened params (values cut to MLflow's 6000 characters, logged in batches
of 100) and as the `config.json` artifact, and the tags `kind`, `pipeline`, `config_hash`,
`git_commit` (+ MLflow's `mlflow.source.git.commit`) and, inside a `ray job submit` job,
`ray_job_submission_id`. Used as a context manager the run ends FINISHED, or FAILED (with an
`error` tag, the exception's first line) when the block raises, KILLED on Ctrl-C.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sophon_ray.errors import UserError
from sophon_ray.tracking import store

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
MAX_TAG_VALUE = 8000  # MLflow's limit on a run tag value
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000


def config_digest(config: dict[str, Any], n: int = 8) -> str:
    """Short stable hash of a JSON-able config dict."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def run_name(kind: str, pipeline: str, config: dict[str, Any]) -> str:
    """Deterministic run name, e.g. `protect-digits-1a2b3c4d`."""
    return f"{kind}-{pipeline}-{config_digest(config)}"


def _text(value: Any, limit: int) -> str:
    s = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def params_of(config: dict[str, Any]) -> dict[str, str]:
    """Flattened `a.b.c` params with string values within MLflow's limits."""
    from sophon_ray.config import flatten

    return {k[:250]: _text(v, MAX_PARAM_VALUE) for k, v in flatten(config).items()}


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric entries of a dict as floats (bools as 0/1); strings, dicts, lists, None dropped."""
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (bool, int, float)):
            out[str(k)] = float(v)
        elif type(v).__module__ == "numpy" and hasattr(v, "item") and getattr(v, "size", 0) == 1:
            out[str(k)] = float(v.item())
    return out


def log_params(client: Any, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in sorted(params.items())]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[i : i + PARAMS_PER_BATCH])


def log_metrics(client: Any, run_id: str, metrics: dict[str, Any], step: int | None) -> int:
    """Log the numeric entries of `metrics` at `step` in batches; returns how many were logged."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    items = [Metric(k, v, now, int(step or 0)) for k, v in numeric(metrics).items()]
    for i in range(0, len(items), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=items[i : i + METRICS_PER_BATCH])
    return len(items)


def set_tags(client: Any, run_id: str, tags: dict[str, Any]) -> None:
    from mlflow.entities import RunTag

    items = [RunTag(str(k)[:250], _text(v, MAX_TAG_VALUE)) for k, v in tags.items() if v is not None]
    for i in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, tags=items[i : i + PARAMS_PER_BATCH])


def git_commit(cwd: str | Path | None = None) -> str | None:
    """`git rev-parse HEAD` of the working directory, or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) >= 40 else None


def ray_tags() -> dict[str, str]:
    """`ray_job_submission_id` inside a `ray job submit` driver; `ray_job_id` when Ray is initialised.

    The Jobs API passes the submission id (e.g. `raysubmit_...`) to the entrypoint in the JSON of
    $RAY_JOB_CONFIG_JSON_ENV_VAR (metadata.job_submission_id); `get_runtime_context().get_job_id()`
    is a different id (the driver's hex job id), recorded separately when available.
    """
    tags: dict[str, str] = {}
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw:
        try:
            sub = (json.loads(raw).get("metadata") or {}).get("job_submission_id")
        except (ValueError, AttributeError):
            sub = None
        if sub:
            tags["ray_job_submission_id"] = str(sub)
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        try:
            tags["ray_job_id"] = ray.get_runtime_context().get_job_id()
        except Exception:  # noqa: BLE001 - best-effort tag only
            pass
    return tags


def _find_resumable(client: Any, exp_id: str, name: str) -> str | None:
    runs = client.search_runs(
        [exp_id], filter_string=f"attributes.run_name = '{name}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if runs and runs[0].info.status != "FINISHED":
        return runs[0].info.run_id
    return None


class Tracker:
    """One MLflow run (a context manager): params, metrics, artifacts, the model directory.

    Create with `Tracker.start(...)`; `run_id`, `run_name`, `uri` identify it.
    """

    def __init__(self, uri: str, run_id: str, run_name: str) -> None:
        self.uri, self.run_id, self.run_name = uri, run_id, run_name
        self.client = store.client(uri)
        self._ended = False

    @classmethod
    def start(cls, kind: str, pipeline: str, config: dict[str, Any], tags: dict[str, Any] | None = None,
              parent_run_id: str | None = None, tracking_uri: str | None = None, resume: bool = False) -> "Tracker":
        """Start (or with `resume`, continue) the run `<kind>-<pipeline>-<config hash>`.

        Args:
            kind: "pretrain" | "protect" | "audit" | ...; pipeline: the pipeline name.
            config: the resolved config as a JSON-able dict (`sophon_ray.config.to_dict(cfg)`,
                plus any run options that change the result).
            tags: extra tags (non-string values are stored as JSON, e.g. lineage dicts).
            parent_run_id: makes this a nested run (tag `mlflow.parentRunId`).
            tracking_uri: tracking URI (None: resolved as in `ensure_store`; the store is made ready
                once per process if the driver has not done so).
            resume: continue the latest unfinished run of the same name instead of starting a new one.
        Returns:
            The running Tracker.
        """
        uri = store.resolve_uri(tracking_uri)
        exp_id = store.experiment_id(uri)
        client = store.client(uri)
        name = run_name(kind, pipeline, config)
        run_id = _find_resumable(client, exp_id, name) if resume else None
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(exp_id, run_name=name).info.run_id
        tracker = cls(uri, run_id, name)
        commit = git_commit()
        system = {"kind": kind, "pipeline": pipeline, "config_hash": config_digest(config), "git_commit": commit,
                  "mlflow.source.git.commit": commit, "mlflow.parentRunId": parent_run_id, **ray_tags()}
        set_tags(client, run_id, {**system, **(tags or {})})
        log_params(client, run_id, params_of(config))
        client.log_dict(run_id, config, "config.json")
        return tracker

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if exc_type is None:
            self.end("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.end("KILLED")
        else:
            first = (str(exc).strip().splitlines() or [""])[0]
            set_tags(self.client, self.run_id, {"error": f"{exc_type.__name__}: {first}"[:500]})
            self.end("FAILED")
        return False

    def end(self, status: str = "FINISHED") -> None:
        """End the run with `status` (FINISHED | FAILED | KILLED); a second call does nothing."""
        if not self._ended:
            self.client.set_terminated(self.run_id, status=status)
            self._ended = True

    def set_tags(self, tags: dict[str, Any]) -> None:
        set_tags(self.client, self.run_id, tags)

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        """Log every numeric entry of `metrics` at `step` (other entries are skipped)."""
        log_metrics(self.client, self.run_id, metrics, step)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Log a file, or a directory's contents, under `artifact_path`.

        Top-level entries of a directory whose names start with "." (e.g. Tune's `.tune/`,
        temporary files) are skipped.
        """
        path = Path(path)
        if path.is_file():
            self.client.log_artifact(self.run_id, str(path), artifact_path)
            return
        if not path.is_dir():
            raise UserError(f"cannot log {path} as an artifact: no such file or directory")
        for entry in sorted(path.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                sub = f"{artifact_path}/{entry.name}" if artifact_path else entry.name
                self.client.log_artifacts(self.run_id, str(entry), sub)
            else:
                self.client.log_artifact(self.run_id, str(entry), artifact_path)

    def log_model_dir(self, model_dir: str | Path, artifact_path: str = "model") -> str:
        """Log a model directory (weights verified against the card) as plain artifacts.

        Tags the run with `model_sha256`, `model_role` and `lineage` (the card's, as JSON).
        Returns:
            `runs:/<run_id>/<artifact_path>`, loadable with `sophon_ray.load_model`.
        """
        from sophon_ray.modeldir import CARD, METRICS, WEIGHTS, read_card, sha256_file

        d = Path(model_dir)
        card = read_card(d)
        if sha256_file(d / WEIGHTS) != card["sha256"]:
            raise UserError(f"{d / WEIGHTS} does not match the sha256 in its {CARD}; re-create the model before logging it")
        for name in (WEIGHTS, CARD, METRICS):
            if (d / name).is_file():
                self.client.log_artifact(self.run_id, str(d / name), artifact_path)
        self.set_tags({"model_sha256": card["sha256"], "model_role": card.get("role"), "lineage": card.get("lineage")})
        return f"runs:/{self.run_id}/{artifact_path}"

    def log_audit(self, audit: dict[str, Any], out_dir: str | Path | None = None) -> None:
        """Log an audit.json dict: verdict metrics, worst case per subject at step = budget, artifacts.

        Metrics, each name for one figure only: the verdict's own figures once (step 0) as
        `verdict_margin`, `verdict_epsilon`, `verdict_control_gap`, `verdict_min_gap`,
        `verdict_passed` (0/1), `verdict_failed_trials`, and `trials` (records in audit.json);
        per budget (step = budget) `worst_<subject>_<metric>` (e.g. `worst_protected_mse`), per
        part of a breakdown `worst_<subject>_<metric>_<part>` (diffusion: `worst_protected_mse_t1`),
        and the control's `budget_gap`, `budget_residual`, `budget_removed` (audit.json's verdict
        `gap`, `residual`, `removed`). Tags: `audit_status`
        (passed | inconclusive | failed), `audit_reason`, `audit_certifies`, `audit_passed`,
        `model_sha256`, `audit_metric`, `attacker_goal`. With `out_dir`,
        its files (audit.json, report.html, PNG plots; hidden entries such as `.tune/` skipped).
        """
        v = audit.get("verdict") or {}
        cert = audit.get("certification") or {}
        self.log_metrics({"verdict_margin": v.get("margin"), "verdict_epsilon": v.get("epsilon"),
                          "verdict_passed": bool(v.get("passed")), "verdict_failed_trials": v.get("failed_trials"),
                          "trials": len(audit.get("trials") or []), "verdict_control_gap": v.get("control_gap"),
                          "verdict_min_gap": v.get("min_gap")}, step=0)
        metric = audit.get("metric", "accuracy")
        for subject, curve in (audit.get("worst_case") or {}).items():
            for budget, value in sorted((curve or {}).items(), key=lambda kv: int(kv[0])):
                self.log_metrics({f"worst_{subject}_{metric}": value}, step=int(budget))
        for subject, parts in (audit.get("worst_case_detail") or {}).items():  # e.g. diffusion timestep buckets
            for part, curve in parts.items():
                if part == "overall":
                    continue
                for budget, value in sorted((curve or {}).items(), key=lambda kv: int(kv[0])):
                    self.log_metrics({f"worst_{subject}_{metric}_{part}": value}, step=int(budget))
        for name in ("gap", "residual", "removed"):  # the control, per budget
            for budget, value in sorted((v.get(name) or {}).items(), key=lambda kv: int(kv[0])):
                self.log_metrics({f"budget_{name}": value}, step=int(budget))
        self.set_tags({"audit_status": str(v.get("status") or ("passed" if v.get("passed") else "failed")),
                       "audit_reason": str(v.get("reason") or ""),
                       "audit_certifies": "true" if cert.get("certifies") else "false",
                       "audit_passed": "true" if v.get("passed") else "false",
                       "model_sha256": (audit.get("model") or {}).get("sha256"),
                       "audit_metric": metric, "attacker_goal": audit.get("attacker_goal", "max")})
        if out_dir is not None:
            self.log_artifacts(out_dir)
