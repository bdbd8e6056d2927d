"""The per-worker loop of distributed protection (runs inside Ray Train workers).

Every worker builds the same `Protection` from the run's shared storage (Parquet data + the
source model directory), simulates its share of the FTS environments and its share of every
NTR batch, and all-reduces gradients through torch.distributed (gloo on CPU, nccl on GPU)
before each optimizer step, so all workers hold identical weights. Rank 0 alone writes
checkpoints, progress lines and reports metrics with checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sophon_ray.train.checkpoint import load_checkpoint, save_checkpoint

FAULT_MARKER = "fault-injected"


def _allreduce_fn(device: torch.device):
    import torch.distributed as dist

    def allreduce(tensors: list[torch.Tensor]) -> None:
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1).to(device, torch.float32) for t in tensors])  # (sum numel,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
            offset += n

    return allreduce


def _device() -> torch.device:
    """This worker's device: its GPU when Ray Train gave it one (`--gpus-per-worker`), else the CPU."""
    import ray

    if ray.get_gpu_ids() and torch.cuda.is_available():
        import ray.train.torch

        return ray.train.torch.get_device()
    return torch.device("cpu")


def _to_device(t: Any, device: torch.device) -> Any:
    """The run's tensors on `device` (unchanged on the CPU)."""
    if device.type == "cpu":
        return t
    import dataclasses

    splits = ("original_train", "original_test", "restricted_train", "restricted_test")
    return dataclasses.replace(t, **{k: tuple(x.to(device) for x in getattr(t, k)) for k in splits})


def _tensors_from_storage(cfg: Any, run_dir: Path):
    from sophon_ray.data import preprocess, read_parquet
    from sophon_ray.tasks import Tensors

    data = {k: preprocess(read_parquet(run_dir / "data" / f"{k}.parquet"), cfg.input) for k in
            ("original_train", "original_test", "restricted_train", "restricted_test")}
    names = json.loads((run_dir / "data" / "names.json").read_text())
    return Tensors(num_classes=names.pop("num_classes"), names=names, **data)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. `config`: cfg (PipelineConfig, either kind), run_dir, report_every,
    checkpoint_every, threads, fault (None or {"iteration": i, "rank": r}), source_value (the
    source model's original test metric: accuracy, or MSE for diffusion), start (True: the weights
    start from `<run_dir>/start` instead of the source's).

    `tasks.of(cfg).build_protection` serves every kind, so the same loop protects a classifier or a
    UNet; the reported `sim_metric` / `orig_metric` are then accuracies or MSEs."""
    entered = time.time()
    import ray.train

    from sophon_ray import modeldir, tasks
    from sophon_ray.outputs import write_json_atomic

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(int(config["threads"]))
    cfg, run_dir = config["cfg"], Path(config["run_dir"])
    device = _device()
    t = _to_device(_tensors_from_storage(cfg, run_dir), device)
    model, _ = tasks.load_model(run_dir / "source")
    model.to(device)
    prot = tasks.of(cfg).build_protection(
        model, t, float(config["source_value"]), rank=rank, world=world, allreduce=_allreduce_fn(device)
    )
    if config.get("start"):  # continue from another model's weights (the hardening loop's previous round)
        model.load_state_dict(tasks.load_model(run_dir / "start")[0].state_dict())
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            load_checkpoint(prot, Path(d))
    ready = time.time()
    if rank == 0:  # where start-up time goes (read by the driver into the run's timings.json)
        _write_timings(run_dir, entered, ready)
        write_json_atomic(run_dir / "environment.json", modeldir.environment())  # -> the card's lineage
    fault = config.get("fault")
    progress = run_dir / "progress.jsonl"
    window: dict[str, list[float]] = {}
    start = time.perf_counter()
    while prot.iteration < cfg.protect.iterations:
        if fault and prot.iteration == fault["iteration"] and rank == fault["rank"]:
            marker = run_dir / FAULT_MARKER
            if not marker.exists():  # test-only: die once, as a crashed worker would
                marker.write_text(str(prot.iteration))
                os._exit(1)
        metrics = prot.step()
        for k, v in metrics.items():
            window.setdefault(k, []).append(v)
        it = prot.iteration
        done = it == cfg.protect.iterations
        if it % config["report_every"] == 0 or done or it % config["checkpoint_every"] == 0:
            summary = {k: _mean(v) for k, v in window.items()}
            summary.update(iteration=it, seconds=time.perf_counter() - start, world=world,
                           rss_peak_mib=_peak_rss_mib())  # this worker's peak memory so far
            window = {}
            _report(prot, summary, rank, progress, it % config["checkpoint_every"] == 0 or done)
    if rank == 0:
        _write_timings(run_dir, entered, ready, time.time())


def _mean(values: list[float]) -> float:
    """Mean of the finite values (a skipped FTS step reports NaN), NaN if there are none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (`ru_maxrss`: KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _process_start() -> float | None:
    """Epoch seconds at which this process started (Linux /proc; None elsewhere)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(int(x.split()[1]) for x in Path("/proc/stat").read_text().splitlines() if x.startswith("btime"))
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _write_timings(run_dir: Path, entered: float, ready: float, loop_exit: float | None = None) -> None:
    stamps = {"process_start": _process_start(), "loop_entered": entered, "ready": ready, "loop_exit": loop_exit}
    tmp = run_dir / "worker_timings.json.tmp"
    tmp.write_text(json.dumps(stamps))
    tmp.replace(run_dir / "worker_timings.json")


def _report(prot: Any, metrics: dict[str, float], rank: int, progress: Path, with_checkpoint: bool) -> None:
    import ray.train

    if rank == 0:
        with progress.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
    if not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_checkpoint(prot, Path(tmp))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
