"""Where an audit trial actor's fixed start-up goes: the phases of a first trial in a fresh Ray worker.

    .venv/bin/python benchmarks/actor_startup.py [--repeats 3]

Starts a local Ray (num_cpus=2), pretrains a smoke digits model, then runs a 1-CPU Ray task that
does what the first trial of a fresh audit actor does, timing each phase: import torch, import
ray.tune (the Tune function trainable's module), import the trial module, load the pipeline
tensors, load the model, one 1-step fine-tuning attack (the first `torch.optim` optimizer
imports `torch._dynamo`), then the same attack again (what a reused actor pays). Each repeat is
a new worker process (`max_calls=1`). Prints a table of medians, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

PHASES = ("import torch", "import ray.tune", "import trial module", "load tensors", "load model",
          "first attack step", "second attack step")


def phases(model: str) -> dict[str, float]:
    out, t = {}, time.perf_counter()

    def mark(k: str) -> None:
        nonlocal t
        now = time.perf_counter()
        out[k], t = now - t, now

    import torch  # noqa: F401

    mark("import torch")
    import ray.tune  # noqa: F401

    mark("import ray.tune")
    from sophon_ray import jobs
    from sophon_ray.audit.trial import cached_tensors, subject_model
    from sophon_ray.config import Recipe
    from sophon_ray.core import finetune

    mark("import trial module")
    cfg = jobs.get_pipeline("digits", smoke=True)
    t_ = cached_tensors(cfg)
    mark("load tensors")
    m = subject_model(cfg, model, t_, 0, "cpu")
    mark("load model")
    for k in ("first attack step", "second attack step"):
        finetune(m, Recipe(), budgets=(1,), seed=0, on_budget=lambda s, v: None, **jobs.finetune_kwargs(cfg, t_, m, 0))
        mark(k)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    from sophon_ray import jobs
    from sophon_ray.ray_local import local_init_kwargs, shutdown

    with tempfile.TemporaryDirectory() as tmp:
        model = jobs.pretrain(jobs.get_pipeline("digits", smoke=True), f"{tmp}/source", log=lambda m: None)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                 **local_init_kwargs())
        try:
            task = ray.remote(num_cpus=1, max_calls=1)(phases)
            runs = [ray.get(task.remote(str(model))) for _ in range(args.repeats)]
        finally:
            shutdown()
    med = {k: round(statistics.median(r[k] for r in runs), 3) for k in PHASES}
    total = sum(v for k, v in med.items() if k != "second attack step")
    for k in PHASES:
        print(f"{k:22s} {med[k]:7.3f} s")
    print(f"{'first trial, total':22s} {total:7.3f} s (medians of {args.repeats}; second attack step = a reused actor)")
    print(json.dumps({"benchmark": "actor_startup", "repeats": args.repeats, "median_s": med,
                      "first_trial_total_s": round(total, 3), "runs": runs}))


if __name__ == "__main__":
    main()
