"""The jobs with MLflow around them: every pretrain, protect and audit is one tracked run.

The driver (this process) is the only MLflow writer: per-iteration protection metrics come
from the in-process loop or, on Ray Train, from rank 0's progress reports read by the driver;
audit trials reach MLflow through a Tune callback on the driver. The store and experiment are
created before any Ray worker or trial starts. Registration happens only after a run
succeeded: protect registers a new version with alias `candidate`; an audit of that exact
sha256 tags it and, if it passed, sets alias `audited`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from sophon_ray import jobs
from sophon_ray.card import read_card
from sophon_ray.config import PipelineConfig, to_dict

Log = Callable[[str], None]


def default_model_name(cfg: PipelineConfig) -> str:
    return f"sophon-{cfg.name}"


def pretrain(cfg: PipelineConfig, out: Path, log: Log) -> Path:
    from sophon_ray import tracking

    tracking.ensure_store()
    with tracking.Tracker.start("pretrain", cfg.name, to_dict(cfg)) as run:
        d = jobs.pretrain(cfg, out, log=log, on_metrics=lambda step, m: run.log_metrics(m, step))
        run.log_metrics(_final_metrics(d))
        run.log_model_dir(d)
    return d


def protect(cfg: PipelineConfig, source: str, out: Path, log: Log, *, model_name: str | None = None,
            workers: int = 0, **distributed: Any) -> tuple[Path, int]:
    """Protect (in-process when `workers == 0`, else on Ray Train), log, register as `candidate`.

    Returns:
        (protected model directory, registered version).
    """
    from sophon_ray import tracking

    tracking.ensure_store()
    options = {"workers": workers, "source": str(source)}
    with tracking.Tracker.start("protect", cfg.name, {**to_dict(cfg), "run": options},
                                tags={"source_model": str(source)}) as run:
        record = lambda step, m: run.log_metrics(m, step)  # noqa: E731
        if workers > 0:
            from sophon_ray.train.driver import protect_distributed

            d = protect_distributed(cfg, source, out, workers=workers, log=log, on_metrics=record, **distributed)
        else:
            d = jobs.protect(cfg, source, out, log=log, on_metrics=record)
        run.log_metrics(_final_metrics(d))
        run.log_model_dir(d)
        card = read_card(d)
        version = tracking.register_protected(d, model_name or default_model_name(cfg), run.run_id, source=str(source),
                                              domains=card.get("domains"))
        run.set_tags({"registered_model": model_name or default_model_name(cfg), "registered_version": version})
    log(f"registered {model_name or default_model_name(cfg)} version {version} (alias candidate)")
    return d, version


def audit(cfg: PipelineConfig, model: str, out: Path, log: Log, *, model_name: str | None = None,
          version: int | None = None, **options: Any) -> dict[str, Any]:
    """Run the Ray Tune audit as one parent MLflow run with one child run per trial, then record
    the verdict on the registered version holding these exact weights (when there is one)."""
    from sophon_ray import tracking
    from sophon_ray.audit.driver import run_audit

    uri = tracking.ensure_store()
    with tracking.Tracker.start("audit", cfg.name, {**to_dict(cfg), "run": {"model": str(model), **_plain(options)}},
                                tags={"audited_model": str(model)}) as run:
        result = run_audit(cfg, model, out=out, log=log, callbacks=[tracking.AuditCallback(run.run_id, uri)], **options)
        run.log_audit(result, out)
        targets = tracking.versions_with_sha256(result["model"]["sha256"])
        if model_name is not None and version is not None:
            targets = sorted(set(targets) | {(model_name, int(version))})
        for name, ver in targets:
            passed = tracking.record_audit(name, ver, result, run.run_id)
            log(f"registry: {name} version {ver} audit {'passed -> alias audited' if passed else 'failed (not promoted)'}")
    return result


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool, type(None), list, tuple))}


def _final_metrics(model_dir: Path) -> dict[str, Any]:
    import json

    m = json.loads((Path(model_dir) / "metrics.json").read_text())
    return {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
