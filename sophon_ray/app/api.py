"""The Python API: the CLI's jobs for notebooks and scripts, with the same outputs.

    import sophon_ray as sr

    cfg = sr.pipeline("mnist-to-digits", overrides=["protect.iterations=50"])   # or "my_pipeline.yaml"
    src = sr.import_model(cfg, "resnet.safetensors", "out/src", new_head=True)  # or sr.pretrain(cfg, "out/src")
    prot = sr.protect(cfg, src, "out/protected")                                # workers=2: Ray Train
    audit = sr.audit(cfg, prot, "out/audit", suite="quick-v3")                  # Ray Tune; audit["verdict"]

Every function is the CLI command's own code path (`app.tracked`, `app.workflow`): the same
model directories, audit.json, report.html, MLflow runs and registry versions; outputs are
claimed like the CLI's `--out` (a folder holding anything else is refused unless `force=True`);
models may be directories or MLflow `models:/` / `runs:/` URIs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from sophon_ray.config import PipelineConfig

Log = Callable[[str], None]


def _loopback() -> None:
    if not os.environ.get("RAY_ADDRESS"):
        from sophon_ray.runtime import ray_local

        ray_local.loopback_env()  # a local Ray started from here listens on 127.0.0.1 only


def _local(ref: str | Path) -> str:
    from sophon_ray.tracking import resolve_model

    return str(resolve_model(ref))


def _claim(out: str | Path, kind: str, force: bool) -> Path:
    from sophon_ray.outputs import claim

    return claim(Path(out), kind, force=force)


def pipeline(ref: str | Path, *, smoke: bool = False, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """The resolved, validated config of a bundled pipeline (name) or a pipeline file (.py / .yaml)."""
    from sophon_ray import tasks

    return tasks.get_pipeline(str(ref), smoke, overrides)


def import_model(cfg: PipelineConfig, weights: str | Path, out: str | Path, *, new_head: bool = False,
                 force: bool = False, log: Log = print) -> Path:
    """`sophon-ray import`: a source model directory from your own weights."""
    from sophon_ray.app import tracked

    return tracked.import_model(cfg, weights, _claim(out, "model", force), log, new_head=new_head)


def pretrain(cfg: PipelineConfig, out: str | Path, *, force: bool = False, log: Log = print) -> Path:
    """`sophon-ray pretrain`: the unprotected source model."""
    from sophon_ray.app import tracked

    return tracked.pretrain(cfg, _claim(out, "model", force), log)


def protect(cfg: PipelineConfig, source: str | Path, out: str | Path, *, workers: int = 0, force: bool = False,
            log: Log = print, **distributed: Any) -> Path:
    """`sophon-ray protect`: in-process (`workers=0`) or on Ray Train; registered as `candidate`.
    `distributed`: cpus_per_worker, gpus_per_worker, ray_address, storage_path, resume."""
    from sophon_ray.app import tracked

    _loopback()
    out_dir = _claim(out, "model", force)
    d, _ = tracked.protect(cfg, _local(source), out_dir, log, workers=workers, source_ref=str(source), **distributed)
    return d


def audit(cfg: PipelineConfig, model: str | Path, out: str | Path, *, force: bool = False, log: Log = print,
          **options: Any) -> dict[str, Any]:
    """`sophon-ray audit`: returns the audit.json dict. `options`: suite, search, budgets, seeds,
    concurrency, epsilon, min_gap, ray_address, samples, judge_dir, standard_cfg (as
    `audit.driver.run_audit`). To let the audit certify, pass `standard_cfg=pipeline(NAME_OR_FILE)`
    (the pipeline as written, no overrides) as the CLI does; without it only a bundled pipeline's
    name has a known budget standard."""
    from sophon_ray.app import tracked
    from sophon_ray.audit.driver import check_thresholds

    check_thresholds(cfg, options.get("epsilon"), options.get("min_gap"))
    _loopback()
    out_dir = _claim(out, "audit", force)
    return tracked.audit(cfg, _local(model), out_dir, log, model_ref=str(model), **options)


def run(cfg: PipelineConfig, out: str | Path, *, source: str | Path | None = None, force: bool = False,
        log: Log = print, **options: Any) -> dict[str, Any]:
    """`sophon-ray run`: pretrain (or protect `source`) -> protect -> audit; returns the summary
    (audit, metrics, times, paths). `options` as `app.workflow.run_pipeline` (including
    `standard_cfg`, as for `audit`)."""
    from sophon_ray.app.workflow import run_pipeline
    from sophon_ray.outputs import claim_run

    _loopback()
    root = claim_run(out, force=force)
    return run_pipeline(cfg, root, source=_local(source) if source is not None else None, log=log, force=force,
                        **options)
