"""Driver of distributed protection on Ray Train (V2, TorchTrainer).

The driver validates everything before Ray starts work, materialises the run's data once as
Parquet plus a copy of the source model directory in `<storage_path>/<run name>/`, starts the
TorchTrainer, shows a concise progress line per report, and writes the protected model
directory from the final checkpoint. Run names are `protect-<pipeline>-<config hash>` (no
timestamps): `--resume` reuses the name on purpose and Ray Train continues from the latest
checkpoint; without `--resume` an old run of the same name is removed first.

On a multi-node cluster `storage_path` must be shared storage (NFS mount or s3://...) that
every node can read: workers read the Parquet data and the source model from it and Ray
Train writes checkpoints to it.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

from sophon_ray.modeldir import lineage_path
from sophon_ray.outputs import write_json_atomic
from sophon_ray.runtime import interrupts, ray_local
from sophon_ray.runtime.ray_local import check_address
from sophon_ray.config import PipelineConfig, config_hash, to_dict
from sophon_ray.errors import UserError

QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",  # else every report costs ~2 s (environment.md)
}


def quiet_ray_env(verbose: bool = False) -> None:
    """Set Ray's environment switches (before ray.init) unless the user set them already."""
    for k, v in QUIET_ENV.items():
        if verbose and k in ("RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_AIR_NEW_OUTPUT"):
            continue
        os.environ.setdefault(k, v)


def init_ray(address: str | None, verbose: bool = False, prestart: bool = True) -> bool:
    """Connect to (or start) Ray quietly; returns True when this call started it. `prestart`:
    see `ray_local.local_init_kwargs` (False for an instance that only runs Ray Train)."""
    import logging

    import ray

    check_address(address)  # even when this process is already connected: a wrong address is a user error
    if ray.is_initialized():
        return False
    quiet_ray_env(verbose)
    extra = {}
    if not address and not os.environ.get("RAY_ADDRESS"):
        address = "local"  # a fresh local instance, never whichever `ray start` head happens to run here
        extra = ray_local.local_init_kwargs(prestart)
    ray.init(
        address=address, include_dashboard=False, logging_level=logging.INFO if verbose else logging.WARNING,
        log_to_driver=verbose, configure_logging=True, **extra,
    )
    interrupts.install()  # ray.init replaced the SIGTERM handler with sys.exit(15)
    return True


def check_resources(workers: int, cpus: float, gpus: float, have: dict[str, float] | None = None) -> None:
    """Refuse a scaling config the cluster (or `have`) cannot ever satisfy, instead of hanging."""
    import ray

    have = have if have is not None else ray.cluster_resources()
    need_cpu, need_gpu = workers * cpus, workers * gpus
    if need_cpu > have.get("CPU", 0) or need_gpu > have.get("GPU", 0):
        raise UserError(
            f"--workers {workers} needs {need_cpu:g} CPUs and {need_gpu:g} GPUs but the cluster has "
            f"{have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs; lower --workers/--gpus-per-worker"
        )


LEAN_RAY_VERSIONS = ("2.60.",)  # Ray releases whose Train V2 internals `lean_trainer_class` was measured on


def lean_trainer_class(own_instance: bool) -> type:
    """`TorchTrainer`, minus two per-run helper actors Ray Train V2 starts that this job never uses.

    Train V2 adds default callbacks that each start a Python process per run: `DatasetsCallback`
    (a `DatasetManager` actor, needed only for `datasets=`, which this trainer never gets: its data
    is Parquet in the run's storage) and `PlacementGroupCleanerCallback` (a detached actor that
    frees the placement group should the controller die; on a local instance this process started
    and will stop, `ray.shutdown` frees everything anyway, so it is dropped only there). On a 2-core
    machine their start-up competes with the workers': 2-worker start-up 13.1 s vs 15.9 s, medians
    of 3 interleaved pairs (docs/history/benchmarks-2026-11-29-to-12-03.md).

    These are private Ray classes, so the lean trainer is used only on the Ray releases it was
    measured on (`LEAN_RAY_VERSIONS`) and only while the override point exists; anything else,
    including an error inside the override, gets the plain `TorchTrainer`'s callbacks.
    """
    import ray
    from ray.train.torch import TorchTrainer

    if not ray.__version__.startswith(LEAN_RAY_VERSIONS) or not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer
    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return TorchTrainer

    class LeanTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            callbacks = super()._create_default_callbacks()
            try:
                return [c for c in callbacks
                        if not (isinstance(c, DatasetsCallback) and not self.datasets)
                        and not (isinstance(c, PlacementGroupCleanerCallback) and own_instance)]
            except Exception:  # a changed internal: keep Ray's own callbacks
                return callbacks

    return LeanTorchTrainer


def run_name(cfg: PipelineConfig, source_sha: str, workers: int, start_sha: str | None = None) -> str:
    start = f"-from{start_sha[:8]}" if start_sha else ""
    return f"protect-{cfg.name}-{config_hash(cfg)}-{source_sha[:8]}-w{workers}{start}"


def _materialise(cfg: PipelineConfig, source: Path, run_dir: Path, start: Path | None = None) -> None:
    """Write the run's data (Parquet, raw uint8) and a copy of the source model (and of the model
    protection starts from, `start`), once: names.json last, so a half-written run is redone."""
    from sophon_ray.data import load_domain, write_parquet

    if (run_dir / "data" / "names.json").exists() and (run_dir / "source").exists():
        return
    orig, restr = load_domain(cfg.original), load_domain(cfg.restricted[0])
    (run_dir / "data").mkdir(parents=True, exist_ok=True)
    for name, images in (("original_train", orig.train), ("original_test", orig.test),
                         ("restricted_train", restr.train), ("restricted_test", restr.test)):
        write_parquet(images, run_dir / "data" / f"{name}.parquet")
    shutil.copytree(source, run_dir / "source", dirs_exist_ok=True)
    if start is not None:
        shutil.copytree(start, run_dir / "start", dirs_exist_ok=True)
    names = {"original": orig.name, "restricted": [restr.name], "num_classes": orig.num_classes}
    (run_dir / "data" / "names.json").write_text(json.dumps(names))


def _tail_progress(path: Path, total: int, stop: threading.Event, log: Callable[[str], None],
                   on_metrics: Callable[[int, dict[str, float]], None], metric: Any) -> None:
    seen = 0
    label, f = metric.label, f".{metric.digits}f"
    while True:
        final = stop.is_set()  # read once more after the run ended, so no line is lost
        if path.exists():
            lines = path.read_text().splitlines()
            for line in lines[seen:]:
                m = json.loads(line)
                on_metrics(int(m["iteration"]), m)
                orig = f" orig_{label} {m['orig_metric']:{f}}" if "orig_metric" in m else ""
                fts = f" fts_loss {m['fts_loss']:{f}} sim_{label} {m['sim_metric']:{f}}" if "fts_loss" in m else ""
                ntr = f" ntr_loss {m['ntr_loss']:{f}}" if "ntr_loss" in m else ""
                rss = f", worker peak RSS {m['rss_peak_mib']:.0f} MiB" if "rss_peak_mib" in m else ""
                log(f"protect {m['iteration']}/{total}{fts}{ntr}{orig} ({m['seconds']:.1f}s, {m['world']} workers{rss})")
            seen = len(lines)
        if final:
            return
        stop.wait(0.5)


def protect_distributed(
    cfg: PipelineConfig,
    source: str | Path,
    out: str | Path,
    workers: int,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: int = 1,
    ray_address: str | None = None,
    storage_path: str | Path | None = None,
    resume: bool = False,
    checkpoint_every: int | None = None,
    report_every: int | None = None,
    max_failures: int = 2,
    fault: dict[str, int] | None = None,
    verbose: bool = False,
    log: Callable[[str], None] = print,
    on_metrics: Callable[[int, dict[str, float]], None] = lambda step, m: None,
    prestart: bool = False,
    start: str | Path | None = None,
    fed_by: dict[str, Any] | None = None,
) -> Path:
    """Run SOPHON protection on `workers` Ray Train workers and write the protected model dir.

    Args:
        cfg: the pipeline config; source: the source model dir; out: the output model dir.
        workers, gpus_per_worker, cpus_per_worker: the scaling config (gloo on CPU, nccl on GPU).
        ray_address: an existing cluster (None starts a local one).
        storage_path: where data, checkpoints and results go (shared storage on a real cluster);
            default `<out>/../.ray`.
        resume: continue a stopped run of the same name from its latest checkpoint.
        checkpoint_every, report_every: iteration cadences (defaults: iterations/10, /20).
        max_failures: worker-failure restarts from the last checkpoint.
        fault: test-only fault injection {"iteration": i, "rank": r}: that worker exits once.
        on_metrics: receives (iteration, metrics) for every report, on the driver (for MLflow).
        prestart: when this call starts a local Ray, let it prestart idle workers (Ray's default;
            Train never uses them, so off: `ray_local.local_init_kwargs`).
        start: a model directory whose weights protection starts from instead of the source's
            (`Task.start_from`; the hardening loop's previous round); the source stays the teacher,
            the guard's reference and the lineage's source. Part of the run name.
        fed_by: the audit (mode, attack seed) whose recipes a hardening round trained on (card lineage).
    Returns:
        The protected model directory.
    """
    stamps = {"begin": time.time()}
    from sophon_ray import modeldir, tasks
    from sophon_ray.tasks.base import guard_note, guard_record
    from sophon_ray.core.protect import validate_config

    if workers < 1:
        raise UserError("--workers must be >= 1 for Ray Train (use --workers 0 for the in-process path)")
    validate_config(cfg.protect, cfg.kind)
    stamps["imported"] = time.time()
    task = tasks.of(cfg)
    t = task.load_tensors()
    source_model, src_card = task.load_for(source, t)
    source_value = task.original_metric(source_model, t)  # the guard's reference (accuracy or MSE)
    start_sha = task.load_for(start, t)[1]["sha256"] if start is not None else None
    out = Path(out)
    storage = Path(storage_path) if storage_path else out.parent / ".ray"
    storage = storage.resolve()
    name = run_name(cfg, src_card["sha256"], workers, start_sha)
    run_dir = storage / name
    import ray

    if ray_address is None and not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        check_resources(workers, cpus_per_worker, gpus_per_worker, {"CPU": os.cpu_count() or 1})  # before starting Ray
    stamps["prepared"] = time.time()
    # Ray Train's import (~0.7 s) runs while ray.init waits for its GCS and raylet to come up.
    importer = threading.Thread(target=importlib.import_module, args=("ray.train.torch",), daemon=True)
    importer.start()
    try:
        started = init_ray(ray_address, verbose, prestart)
    finally:
        importer.join()
    import ray.train

    TorchTrainer = lean_trainer_class(own_instance=ray_local.owns_instance())
    stamps["ray_ready"] = time.time()
    try:
        check_resources(workers, cpus_per_worker, gpus_per_worker)
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        _materialise(cfg, Path(source), run_dir, Path(start) if start is not None else None)
        (run_dir / "progress.jsonl").unlink(missing_ok=True)
        (run_dir / "worker_timings.json").unlink(missing_ok=True)
        (run_dir / "environment.json").unlink(missing_ok=True)
        (run_dir / TIMINGS).unlink(missing_ok=True)
        iters = cfg.protect.iterations
        loop_config = {
            "cfg": cfg, "run_dir": str(run_dir), "source_value": source_value, "threads": cpus_per_worker,
            "report_every": report_every or max(iters // 20, 1),
            "checkpoint_every": checkpoint_every or max(iters // 10, 1), "fault": fault, "start": start is not None,
        }
        trainer = TorchTrainer(
            train_loop_per_worker=_entry,
            train_loop_config=loop_config,
            scaling_config=ray.train.ScalingConfig(
                num_workers=workers, use_gpu=gpus_per_worker > 0,
                resources_per_worker={"CPU": cpus_per_worker, **({"GPU": gpus_per_worker} if gpus_per_worker else {})},
            ),
            run_config=ray.train.RunConfig(
                name=name, storage_path=str(storage),
                failure_config=ray.train.FailureConfig(max_failures=max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            ),
        )
        log(f"protect on Ray Train: {workers} worker(s), run {name}, storage {storage}")
        stop = threading.Event()
        tail = threading.Thread(target=_tail_progress, daemon=True,
                                args=(run_dir / "progress.jsonl", iters, stop, log, on_metrics, task.metric))
        tail.start()
        began = time.perf_counter()
        stamps["fit_start"] = time.time()
        try:
            result = trainer.fit()
        finally:
            stop.set()
            tail.join()
        interrupts.check()  # a signal that arrived during fit ends the job without an output
        stamps["fit_end"] = time.time()
        if result.checkpoint is None:
            raise RuntimeError(f"Ray Train run {name} finished without a checkpoint: {result.error}")
        model = task.new_model(t.num_classes, 0)
        prot = task.build_protection(model, t, source_value)
        from sophon_ray.train.checkpoint import load_checkpoint

        with result.checkpoint.as_directory() as d:
            load_checkpoint(prot, Path(d))
        final = task.model_metrics(model, t)
        key = f"original_test_{task.metric.name}"
        metrics = {
            **final, f"source_{key}": source_value,
            "guard_rollbacks": prot.guard.rollbacks, "iterations": prot.iteration, "workers": workers, "ray_run": name,
            **prot.guard.summary(),
        }
        guard_note(prot.guard, task.metric, source_value, log)
        env_file = run_dir / "environment.json"  # rank 0's: the workers did the arithmetic, not this driver
        lineage = {"source": {"path": lineage_path(source), "sha256": src_card["sha256"]},
                   **({"start": {"path": lineage_path(start), "sha256": start_sha}} if start is not None else {}),
                   **({"fed_by": dict(fed_by)} if fed_by else {}), "guard": guard_record(prot.guard),
                   "environment": json.loads(env_file.read_text()) if env_file.exists() else None,
                   "protect": {**to_dict(cfg.protect), "ray_run": name, "storage": str(storage), "workers": workers},
                   "stage_hash": task.protect_stage_hash(src_card["sha256"], workers, start_sha)}
        log(f"protect done: original test {task.metric.name} {final[key]:.4f} (source {source_value:.4f}), "
            f"iterations {prot.iteration} ({time.perf_counter() - began:.1f}s)")
        saved = modeldir.save_model_dir(out, model, task.make_card(t, "protected", lineage), metrics)
        stamps["written"] = time.time()
        write_json_atomic(run_dir / TIMINGS, startup_timings(stamps, run_dir))  # for benchmarks, not the model
        return saved
    finally:
        if started:
            ray_local.shutdown()


TIMINGS = "timings.json"  # in the Ray Train run directory: where a protection's wall time went


def timings_of(model_dir: str | Path) -> dict[str, float]:
    """The start-up timings of a model protected on Ray Train (`startup_timings`), read from its
    run directory (named in the card's lineage); {} when the run directory is gone."""
    from sophon_ray.modeldir import read_card

    p = read_card(model_dir).get("lineage", {}).get("protect", {})
    path = Path(p.get("storage", "")) / p.get("ray_run", "") / TIMINGS
    return json.loads(path.read_text()) if p.get("ray_run") and path.is_file() else {}


def startup_timings(stamps: dict[str, float], run_dir: Path) -> dict[str, float]:
    """Where the wall time of a Ray Train protection went, in seconds per phase.

    imports: sophon-ray's tasks and torch on the driver; prepare: load data, source model and its
    metric; ray_init: start/connect Ray, with Ray Train imported alongside; materialise_and_trainer: Parquet + source copy,
    TorchTrainer built; to_worker_process: fit() until rank 0's process existed (Train
    controller, placement group, worker process spawn); worker_boot: process start until the
    loop function ran (Ray worker start-up, torch.distributed set-up, importing the loop);
    worker_setup: Parquet read, Protection build, checkpoint restore; loop: first to last
    iteration; final_report: the last report with the final checkpoint; shutdown: the loop
    function's return until fit() returned (worker group and controller shutdown); finish:
    final checkpoint load, evaluation and model write on the driver. Worker stamps are wall
    clocks of the same machine (process start from /proc, 1 s resolution of boot time).
    """
    out = {"imports": stamps["imported"] - stamps["begin"], "prepare": stamps["prepared"] - stamps["imported"],
           "ray_init": stamps["ray_ready"] - stamps["prepared"]}
    try:
        w = json.loads((run_dir / "worker_timings.json").read_text())
        last = json.loads((run_dir / "progress.jsonl").read_text().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        w, last = None, None
    if w is not None and w.get("process_start") and last is not None:
        loop_end = w["ready"] + float(last["seconds"])  # the worker's clock starts at "ready"
        proc = max(w["process_start"], stamps["fit_start"])  # a pooled process Ray started earlier: 0 s spawn
        out.update(
            materialise_and_trainer=stamps["fit_start"] - stamps["ray_ready"],
            to_worker_process=proc - stamps["fit_start"],
            worker_boot=w["loop_entered"] - proc,
            worker_setup=w["ready"] - w["loop_entered"],
            loop=loop_end - w["ready"],
        )
        if w.get("loop_exit"):  # the last report (with the final checkpoint) returned at loop_exit
            out.update(final_report=w["loop_exit"] - loop_end, shutdown=stamps["fit_end"] - w["loop_exit"])
        else:
            out["teardown"] = stamps["fit_end"] - loop_end
    else:  # resumed runs report only what the driver saw
        out["fit"] = stamps["fit_end"] - stamps["fit_start"]
    out["finish"] = stamps["written"] - stamps["fit_end"]
    return {k: round(v, 2) for k, v in out.items()}


def _entry(config: dict[str, Any]) -> None:
    from sophon_ray.train.worker import train_loop_per_worker

    train_loop_per_worker(config)
