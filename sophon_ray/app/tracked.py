"""The jobs with MLflow around them: every pretrain, protect and audit is one tracked run.

The driver (this process) is the only MLflow writer: per-iteration protection metrics come
from the in-process loop or, on Ray Train, from rank 0's progress reports read by the driver;
audit trials reach MLflow through a Tune callback on the driver. The store and experiment are
created before any Ray worker or trial starts. Registration happens only after a run
succeeded: protect registers a new version with alias `candidate`; an audit of that exact
sha256 is recorded on it, and the alias `audited` is set only by an audit whose status is `passed`,
that meets the recorded minimum (`audit.certify.certification`) and that no earlier failed audit
of the same weights outdoes in any respect (`tracking.registry.decide`).

Metric names say what they measure: per-iteration protection metrics are logged as
`sim_<metric>` / `orig_<metric>` (e.g. `sim_mse`, `orig_accuracy`), final metrics come from the
model's metrics.json (`original_test_mse`, ...), the audit's worst case as `worst_<subject>_<metric>`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from sophon_ray import tasks
from sophon_ray.config import PipelineConfig, to_dict
from sophon_ray.errors import UserError
from sophon_ray.modeldir import read_card

Log = Callable[[str], None]


def default_model_name(cfg: PipelineConfig) -> str:
    return f"sophon-{cfg.name}"


def pretrain(cfg: PipelineConfig, out: Path, log: Log) -> Path:
    from sophon_ray import tracking

    tracking.ensure_store()
    with tracking.Tracker.start("pretrain", cfg.name, to_dict(cfg)) as run:
        d = tasks.of(cfg).pretrain(out, log=log, on_metrics=lambda step, m: run.log_metrics(m, step))
        run.log_metrics(_final_metrics(d))
        run.log_model_dir(d)
    return d


def import_model(cfg: PipelineConfig, weights: str | Path, out: Path, log: Log, *, new_head: bool = False) -> Path:
    """`Task.import_model` inside an MLflow run (params: the config and the weights' origin)."""
    from sophon_ray import tracking

    tracking.ensure_store()
    options = {"weights": str(weights), "new_head": new_head}
    with tracking.Tracker.start("import", cfg.name, {**to_dict(cfg), "run": options}) as run:
        d = tasks.of(cfg).import_model(weights, out, new_head=new_head, log=log)
        run.log_metrics(_final_metrics(d))
        run.log_model_dir(d)
    return d


def protect(cfg: PipelineConfig, source: str, out: Path, log: Log, *, model_name: str | None = None,
            workers: int = 0, source_ref: str | None = None, start: str | Path | None = None,
            parent_run_id: str | None = None, fed_by: dict[str, Any] | None = None,
            **distributed: Any) -> tuple[Path, int]:
    """Protect the local model directory `source` (in-process when `workers == 0`, else on Ray
    Train), log, register as `candidate`; `source_ref` is what the user named (an MLflow URI the
    CLI resolved to `source`), recorded as the run's tag. `start`: a model directory whose weights
    protection starts from (the hardening loop's previous round; tag `start_model`);
    `parent_run_id`: nest the run under it (the harden run); `fed_by`: the audit (mode, attack seed)
    whose recipes the round trained on (card lineage; an audit of that mode and seed cannot certify).
    The guard's outcome is logged on both paths: metric `guard_passed` (1/0), `guard_last_pass`.

    Returns:
        (protected model directory, registered version).
    """
    from sophon_ray import tracking

    tracking.ensure_store()
    task = tasks.of(cfg)
    options = {"workers": workers, "source": str(source_ref or source), **({"start": str(start)} if start else {})}
    with tracking.Tracker.start("protect", cfg.name, {**to_dict(cfg), "run": options}, parent_run_id=parent_run_id,
                                tags={"source_model": str(source_ref or source),
                                      **({"start_model": str(start)} if start else {})}) as run:
        record = lambda step, m: run.log_metrics(task.named_metrics(m), step)  # noqa: E731
        if workers > 0:
            from sophon_ray.train.driver import protect_distributed

            d = protect_distributed(cfg, source, out, workers=workers, log=log, on_metrics=record, start=start,
                                    fed_by=fed_by, **distributed)
        else:
            d = task.protect(source, out, log=log, on_metrics=record, start=start, fed_by=fed_by)
        final = _final_metrics(d)
        run.log_metrics(final)
        run.set_tags({"guard_passed": str(bool(final.get("guard_passed", 1.0))).lower()})
        run.log_model_dir(d)
        card = read_card(d)
        version = tracking.register_protected(d, model_name or default_model_name(cfg), run.run_id, source=str(source_ref or source),
                                              domains=card.get("domains"))
        run.set_tags({"registered_model": model_name or default_model_name(cfg), "registered_version": version})
    log(f"registered {model_name or default_model_name(cfg)} version {version} (alias candidate)")
    return d, version


def audit(cfg: PipelineConfig, model: str, out: Path, log: Log, *, model_name: str | None = None,
          version: int | None = None, model_ref: str | None = None, parent_run_id: str | None = None,
          **options: Any) -> dict[str, Any]:
    """Run the Ray Tune audit of the local model directory `model` as one parent MLflow run with
    one child run per trial, then record the verdict on the registered version holding these
    exact weights (when there is one); `model_ref` is what the user named (e.g. `models:/...`);
    `parent_run_id`: nest the audit run under it (the harden run)."""
    from sophon_ray import tracking
    from sophon_ray.audit.driver import run_audit

    uri = tracking.ensure_store()
    ref = str(model_ref or model)
    with tracking.Tracker.start("audit", cfg.name, {**to_dict(cfg), "run": {"model": ref, **_plain(options)}},
                                tags={"audited_model": ref}, parent_run_id=parent_run_id) as run:
        result = run_audit(cfg, model, out=out, log=log, callbacks=[tracking.AuditCallback(run.run_id, uri)],
                           model_ref=ref, **options)
        run.log_audit(result, out)
        run.log_metrics(_samples_metrics(Path(out)))
        targets = tracking.versions_with_sha256(result["model"]["sha256"])
        if model_name is not None and version is not None:
            targets = sorted(set(targets) | {(model_name, int(version))})
        for name, ver in targets:
            try:
                rec = tracking.record_audit(name, ver, result, run.run_id)
            except UserError as e:  # e.g. another pipeline's audit of the same weights: not this version's evidence
                log(f"registry: {name} version {ver}: audit not recorded: {e}")
                continue
            if rec.get("blocked_by") and not rec["audited"]:
                log(f"registry: {name} version {ver}: this audit passed and meets the minimum, but earlier failed "
                    f"audit(s) (run {', '.join(r[:12] for r in rec['blocked_by'])}) were stronger in some respect "
                    "(recipes, trials, largest budget or epsilon): alias audited not set; audit at least as strongly")
            elif rec["overridden_by"]:
                log(f"registry: {name} version {ver}: this audit ({rec['status']}) is recorded, but a stronger earlier "
                    f"audit (run {rec['overridden_by'][:12]}) decides: alias audited "
                    f"{'stays' if rec['audited'] else 'not set'}")
            elif rec["audited"]:
                log(f"registry: {name} version {ver} audit passed and certifies -> alias audited")
            else:
                log(f"registry: {name} version {ver} audit {rec['status']}"
                    f"{'' if rec['status'] != 'passed' else ' but too weak to certify'} (not promoted to audited)")
    return result


def _samples_metrics(out: Path) -> dict[str, float]:
    """`recognised_<subject>_<before|after>` (the judge metric) and `samples_mse_<subject>` from a
    diffusion audit's samples.json; {} when there is none."""
    path = out / "samples.json"
    info = json.loads(path.read_text()) if path.is_file() else {}
    metrics: dict[str, float] = {}
    for subject, row in (info.get("subjects") or {}).items():
        for when in ("before", "after"):
            if (row.get(when) or {}).get("recognised") is not None:
                metrics[f"recognised_{subject}_{when}"] = row[when]["recognised"]
            if (row.get(when) or {}).get("rejected") is not None:
                metrics[f"rejected_{subject}_{when}"] = row[when]["rejected"]
        if row.get("restricted_test_mse") is not None:
            metrics[f"samples_mse_{subject}"] = row["restricted_test_mse"]
    return metrics


def _plain(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if isinstance(v, (str, int, float, bool, type(None), list, tuple))}


def _final_metrics(model_dir: Path) -> dict[str, Any]:
    m = json.loads((Path(model_dir) / "metrics.json").read_text())
    out = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if isinstance(m.get("guard_passed"), bool):  # a flag in metrics.json, 1 / 0 as an MLflow metric
        out["guard_passed"] = float(m["guard_passed"])
    return out
