"""Probe: can Ray Train V2's actors start on the raylet's prestarted idle workers?

    .venv/bin/python benchmarks/train_runtime_env_probe.py [REPEATS=3]

Train V2 gives its controller and workers a runtime env with environment variables, so they never
match the job's (empty) runtime env and always start new worker processes. Mode "match" starts
the local Ray with a job-level runtime env equal to the controller's env vars (what Train
propagates plus RAY_WARN_BLOCKING_GET_INSIDE_ASYNC=0), so that the merged env of Train's actors
can equal the job's; mode "none" is Ray's default. 2-worker protection on digits (E=2, 4
iterations), modes interleaved, order flipped every repeat; prints one JSON line per run and
the medians. Start-up = wall time (ray.init included) minus the training loop.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sophon_ray import jobs, ray_local  # noqa: E402
from sophon_ray.train.driver import protect_distributed, quiet_ray_env  # noqa: E402


def one(cfg, source: Path, out: Path, mode: str) -> dict:
    """One 2-worker protection on a fresh local Ray started in `mode`; its start-up phases."""
    import ray

    quiet_ray_env()
    from ray.train.v2._internal.constants import get_env_vars_to_propagate
    env = get_env_vars_to_propagate()
    env.setdefault("RAY_WARN_BLOCKING_GET_INSIDE_ASYNC", "0")
    t0 = time.perf_counter()
    kw = {"runtime_env": {"env_vars": env}} if mode == "match" else {}
    ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             **ray_local.local_init_kwargs(), **kw)
    try:
        d = protect_distributed(cfg, source, out, workers=2, cpus_per_worker=1, report_every=1,
                                checkpoint_every=cfg.protect.iterations, log=lambda m: None)
    finally:
        ray_local.shutdown()
    wall = time.perf_counter() - t0
    t = json.loads((d / "metrics.json").read_text())["timings"]
    return {"mode": mode, "startup_s": round(wall - t["loop"], 2), **t}


cfg = jobs.get_pipeline("digits", overrides=["protect.iterations=4", "protect.guard_every=1000", "protect.envs_per_step=2"])
rows = []
with tempfile.TemporaryDirectory() as tmp:
    out = Path(tmp)
    source = jobs.pretrain(jobs.get_pipeline("digits", smoke=True), out / "source", log=lambda m: None)
    for rep in range(int(sys.argv[1]) if len(sys.argv) > 1 else 3):
        for mode in (("match", "none") if rep % 2 == 0 else ("none", "match")):
            rows.append(one(cfg, source, out / f"r{rep}{mode}", mode))
            print(json.dumps(rows[-1]), flush=True)
for mode in ("match", "none"):
    rs = [r for r in rows if r["mode"] == mode]
    print(mode, {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0] if k != "mode"})
