"""`sophon-ray run`: pretrain -> protect (Ray Train) -> audit (Ray Tune) -> register -> report.

Resumable stage by stage: a stage whose output exists and was made from the same config (and
the same input model) is skipped, so re-running after a failure or Ctrl-C continues where it
stopped. One Ray instance serves protection and the audit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from sophon_ray import tasks
from sophon_ray.app import tracked
from sophon_ray.config import PipelineConfig, config_hash, extensions
from sophon_ray.modeldir import read_card
from sophon_ray.outputs import write_json_atomic

Log = Callable[[str], None]


def _card_or_none(d: Path) -> dict[str, Any] | None:
    try:
        return read_card(d)
    except Exception:
        return None


def run_pipeline(
    cfg: PipelineConfig,
    root: Path,
    *,
    workers: int = 2,
    suite: str | None = None,
    search: int | None = None,
    seeds: int = 2,
    concurrency: int | None = None,
    epsilon: float | None = None,
    min_gap: float | None = None,
    smoke: bool = False,
    samples: bool = True,
    model_name: str | None = None,
    ray_address: str | None = None,
    storage_path: str | None = None,
    gpus_per_worker: float = 0.0,
    verbose: bool = False,
    log: Log = print,
    source: str | Path | None = None,
    standard_cfg: PipelineConfig | None = None,
    rounds: int | None = None,
    feedback: int = 3,
    force: bool = False,
) -> dict[str, Any]:
    """Run every stage (skipping those already done for this config); returns a summary dict.

    `suite` (None: the kind's `run_suite`) or `search` (starting from `suite` if given) picks the
    audit's attacks; `epsilon` / `min_gap` None are the kind's defaults (min_gap: attack.min_gap
    first); `smoke` is recorded in the audit (a smoke audit never certifies); `samples` lets a diffusion audit draw
    sample grids and judge them (judge cached in `root/judge`). `source`: a local model directory
    to protect instead of pretraining one (`sophon-ray run --source`; checked against the pipeline first).
    `standard_cfg`: the pipeline as written (not smoke, no overrides), the budget standard a
    certifying audit is held to (`audit.driver.standard_of`; the CLI passes it). `rounds`: protect
    and audit become the hardening loop in `root/harden` (`app.harden`, `feedback` recipes fed back
    per round; `force` as the CLI's --force); None: one protection, one audit."""
    from sophon_ray import tracking
    from sophon_ray.train.driver import init_ray

    task = tasks.of(cfg)
    if search is None:
        suite = suite or task.run_suite  # with --search, a suite is where the search starts
    epsilon = task.epsilon if epsilon is None else epsilon
    from sophon_ray.audit.driver import resolve_min_gap

    min_gap = resolve_min_gap(cfg, min_gap)
    if source is not None:  # refuse a model that does not fit before any Ray or MLflow work
        task.check_compatible(read_card(source), task.load_tensors().num_classes, str(source))
    tracking.ensure_store()  # fail fast on an unreachable server, before any work
    started = time.perf_counter()
    times: dict[str, float] = {}
    ray_started = init_ray(ray_address, verbose)
    try:
        t0 = time.perf_counter()
        if source is not None:
            source = Path(source)
            log(f"[1/3] pretrain: skipped, protecting the given source {source}")
        elif (card := _card_or_none(root / "source")) and card.get("lineage", {}).get("stage_hash") == task.source_stage_hash():
            source = root / "source"
            log(f"[1/3] pretrain: {source} is up to date, skipped")
        else:
            source = root / "source"
            log("[1/3] pretrain the unprotected source model")
            tracked.pretrain(cfg, source, log)
        source_sha = read_card(source)["sha256"]
        times["pretrain"] = time.perf_counter() - t0
        if rounds is not None:  # protect + audit become the hardening loop (app/harden.py)
            from sophon_ray.app.harden import harden

            t0 = time.perf_counter()
            h = harden(cfg, root / "harden", source=source, rounds=rounds, feedback=feedback, workers=workers,
                       suite=suite, search=search, seeds=seeds, concurrency=concurrency, epsilon=epsilon,
                       min_gap=min_gap, smoke=smoke, samples=samples, model_name=model_name, ray_address=ray_address,
                       storage_path=storage_path, gpus_per_worker=gpus_per_worker, verbose=verbose, force=force,
                       standard_cfg=standard_cfg, log=log)
            times["harden"] = time.perf_counter() - t0
            return {"audit": h["audit"], "metrics": json.loads((h["protected"] / "metrics.json").read_text()),
                    "times": times, "wall": time.perf_counter() - started, "harden": h,
                    "paths": {"source": source, "protected": h["protected"], "audit": h["audit_dir"]}}

        t0 = time.perf_counter()
        protected = root / "protected"
        stage = task.protect_stage_hash(source_sha, workers)
        card = _card_or_none(protected)
        version = None
        if card and card.get("lineage", {}).get("stage_hash") == stage:
            log(f"[2/3] protect: {protected} is up to date, skipped")
        else:
            log(f"[2/3] protect with SOPHON ({'in-process' if workers == 0 else f'{workers} Ray Train workers'})")
            extra = {"ray_address": ray_address, "storage_path": storage_path, "verbose": verbose,
                     "gpus_per_worker": gpus_per_worker} if workers else {}
            _, version = tracked.protect(cfg, str(source), protected, log, model_name=model_name, workers=workers, **extra)
        protected_sha = read_card(protected)["sha256"]
        times["protect"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        audit_dir = root / "audit"
        stage = config_hash((cfg.attack, *extensions(cfg))) + f"-{protected_sha[:8]}-{suite}-{search}-{seeds}-{epsilon}-{min_gap}-{samples}-{smoke}"
        done = audit_dir / "stage.json"
        if (audit_dir / "audit.json").exists() and done.exists() and json.loads(done.read_text()).get("stage") == stage:
            log(f"[3/3] audit: {audit_dir / 'audit.json'} is up to date, skipped")
            result = json.loads((audit_dir / "audit.json").read_text())
        else:
            log("[3/3] audit on Ray Tune: attacks on protected, scratch and original models")
            result = tracked.audit(cfg, str(protected), audit_dir, log, model_name=model_name, version=version,
                                   suite=suite, search=search, seeds=seeds, concurrency=concurrency, epsilon=epsilon,
                                   min_gap=min_gap, smoke=smoke,
                                   ray_address=ray_address, samples=samples, judge_dir=str(root / "judge"),
                                   standard_cfg=standard_cfg)
            write_json_atomic(done, {"stage": stage})
        times["audit"] = time.perf_counter() - t0
    finally:
        if ray_started:
            from sophon_ray.runtime import ray_local

            ray_local.shutdown()
    metrics = json.loads((protected / "metrics.json").read_text())
    return {"audit": result, "metrics": metrics, "times": times, "wall": time.perf_counter() - started,
            "paths": {"source": source, "protected": protected, "audit": audit_dir}}
