"""Ray Train start-up with sophon-ray's lean trainer vs Ray's default callbacks, interleaved A/B.

    .venv/bin/python benchmarks/train_lean_ab.py [--workers 2] [--repeats 3] [--iterations 4]

`protect_distributed` builds its trainer with `lean_trainer_class` (TorchTrainer without the
per-run `DatasetManager` and, on a local instance it started itself, `PlacementGroupCleaner`
actors). Mode "default" swaps in the plain `TorchTrainer` (Ray Train V2's default callbacks).
Each run is a real protection on digits (E=2) on its own local Ray; modes alternate, the order
flipping every repeat. Start-up = wall time (ray.init included) minus the training loop.
Prints one JSON line per run, the medians per mode, then one JSON line with everything.
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
from sophon_ray.train import driver  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from ray.train.torch import TorchTrainer

    lean = driver.lean_trainer_class
    cfg = jobs.get_pipeline("digits", overrides=[f"protect.iterations={args.iterations}", "protect.guard_every=1000",
                                                 "protect.envs_per_step=2"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        source = jobs.pretrain(jobs.get_pipeline("digits", smoke=True), out / "source", log=lambda m: None)
        for rep in range(args.repeats):
            for mode in (("lean", "default") if rep % 2 == 0 else ("default", "lean")):
                driver.lean_trainer_class = lean if mode == "lean" else (lambda own_instance: TorchTrainer)
                t0 = time.perf_counter()
                d = driver.protect_distributed(cfg, source, out / f"r{rep}-{mode}", workers=args.workers,
                                               cpus_per_worker=1, report_every=1, checkpoint_every=args.iterations,
                                               log=lambda m: None)
                wall = time.perf_counter() - t0
                t = json.loads((d / "metrics.json").read_text())["timings"]
                rows.append({"mode": mode, "startup_s": round(wall - t["loop"], 2), **t})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    driver.lean_trainer_class = lean
    med = {}
    for mode in ("lean", "default"):
        rs = [r for r in rows if r["mode"] == mode]
        med[mode] = {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0] if k != "mode"}
        print(mode, "medians:", {k: med[mode][k] for k in ("startup_s", "ray_init", "to_worker_process", "worker_boot",
                                                           "shutdown")})
    pairs = [(rows[i], rows[i + 1]) for i in range(0, len(rows), 2)]
    diffs = [round((a if a["mode"] == "default" else b)["startup_s"] - (a if a["mode"] == "lean" else b)["startup_s"], 2)
             for a, b in pairs]
    print(f"start-up, {args.workers} worker(s): lean {med['lean']['startup_s']} s vs default {med['default']['startup_s']} s; "
          f"default - lean per pair: {diffs}")
    print(json.dumps({"benchmark": "train_lean_ab", "workers": args.workers, "iterations": args.iterations,
                      "repeats": args.repeats, "load_average_1m": round(os.getloadavg()[0], 2), "medians": med,
                      "pair_differences_s": diffs, "runs": rows}))


if __name__ == "__main__":
    main()
