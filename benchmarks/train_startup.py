"""Ray Train start-up with and without Ray's prestarted idle workers, interleaved A/B.

    .venv/bin/python benchmarks/train_startup.py [--workers 2] [--repeats 3] [--iterations 4]

Each run is a real `protect_distributed` on digits (E=2, a few iterations) that starts its own
local Ray, once with `prestart=True` (Ray's default: the raylet starts one idle worker process
per CPU when the driver connects) and once with `prestart=False` (sophon-ray's default for
protection: Ray Train V2's controller and worker actors carry their own runtime env and never
use those processes, which only compete for the CPUs while Train starts). The two modes
alternate, the order flipping every repeat. Start-up = wall time minus the training loop
(first to last iteration), i.e. everything a user waits for besides training. Prints the
per-run rows, the medians per mode (with the phases of `startup_timings`), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sophon_ray import jobs  # noqa: E402


def one_run(cfg, source: Path, out: Path, workers: int, prestart: bool) -> dict:
    from sophon_ray.train.driver import protect_distributed

    t0 = time.perf_counter()
    d = protect_distributed(cfg, source, out, workers=workers, cpus_per_worker=1, report_every=1,
                            checkpoint_every=cfg.protect.iterations, log=lambda m: None, prestart=prestart)
    wall = time.perf_counter() - t0
    timings = json.loads((d / "metrics.json").read_text())["timings"]
    return {"prestart": prestart, "wall_s": round(wall, 2), "startup_s": round(wall - timings["loop"], 2), **timings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = jobs.get_pipeline("digits", overrides=[f"protect.iterations={args.iterations}", "protect.guard_every=1000",
                                                 "protect.envs_per_step=2"])
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        source = jobs.pretrain(jobs.get_pipeline("digits", smoke=True), out / "source", log=lambda m: None)
        for rep in range(args.repeats):
            for prestart in ((True, False) if rep % 2 == 0 else (False, True)):
                runs.append(one_run(cfg, source, out / f"run-{rep}-{prestart}", args.workers, prestart))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    keys = [k for k in runs[0] if k != "prestart"]
    med = {p: {k: round(statistics.median(r[k] for r in runs if r["prestart"] == p), 2) for k in keys}
           for p in (True, False)}
    print(f"{'prestart':>8} " + " ".join(f"{k:>14s}" for k in keys))
    for p in (True, False):
        print(f"{str(p):>8} " + " ".join(f"{med[p][k]:>14.2f}" for k in keys))
    diff = med[True]["startup_s"] - med[False]["startup_s"]
    print(f"{args.workers} worker(s), medians of {args.repeats}: start-up {med[True]['startup_s']:.2f} s with "
          f"prestarted workers, {med[False]['startup_s']:.2f} s without ({diff:+.2f} s saved); "
          f"load average {os.getloadavg()[0]:.1f}")
    print(json.dumps({"benchmark": "train_startup", "workers": args.workers, "repeats": args.repeats,
                      "iterations": args.iterations, "runs": runs,
                      "median": {"prestart": med[True], "no_prestart": med[False]},
                      "load_average_1m": round(os.getloadavg()[0], 2)}))


if __name__ == "__main__":
    main()
