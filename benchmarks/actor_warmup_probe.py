"""Probe: can trial actors start with torch / torch._dynamo / ray.tune already imported?

    .venv/bin/python benchmarks/actor_warmup_probe.py MODE [--wait S]

MODE none: plain local Ray (num_cpus=2; the raylet prestarts 2 bare workers). MODE hook: a
job-level `worker_process_setup_hook` imports the three in every worker process. MODE task:
two 1-CPU warm-up tasks that import them are submitted right after `ray.init`. MODE preload: the
local instance preloads them in every worker (`preload_python_modules`). Then the driver
waits S seconds (the driver's own work before the Tuner starts), creates two 1-CPU actors and
times creation + the actors' import of the three (0 s if already imported). Prints one line:
mode, ray.init seconds, actors-ready seconds, and per actor (pid, import seconds). Used for the
"Tried, did not help" paragraph of docs/benchmarks.md (audit throughput).
"""

from __future__ import annotations

import os
import sys
import time


def warm() -> None:
    import torch._dynamo  # noqa: F401
    import ray.tune  # noqa: F401


def main() -> None:
    mode = sys.argv[1]
    wait = float(sys.argv[sys.argv.index("--wait") + 1]) if "--wait" in sys.argv else 9.0
    os.environ["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__))  # workers import this module
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    kw = {"runtime_env": {"worker_process_setup_hook": "actor_warmup_probe.warm"}} if mode == "hook" else {}
    if mode == "preload":  # every worker imports them before accepting work (Ray's preload_python_modules)
        kw = {"_system_config": {"preload_python_modules": ["torch", "torch._dynamo", "ray.tune"]}}
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING", **kw)
    t1 = time.perf_counter()
    refs = [ray.remote(num_cpus=1)(lambda: (warm(), os.getpid())[1]).remote() for _ in range(2)] if mode == "task" else []
    time.sleep(wait)

    @ray.remote(num_cpus=1)
    class Actor:
        def go(self):
            t = time.perf_counter()
            warm()
            return os.getpid(), round(time.perf_counter() - t, 3)

    t2 = time.perf_counter()
    actors = [Actor.remote() for _ in range(2)]
    res = ray.get([a.go.remote() for a in actors])
    t3 = time.perf_counter()
    print(mode, f"warm-up task pids {ray.get(refs)}" if refs else "", f"init {t1 - t0:.2f} s, actors ready+import "
          f"{t3 - t2:.2f} s", res)
    ray.shutdown()


if __name__ == "__main__":
    main()
