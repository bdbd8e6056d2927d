"""Ray Train overhead: the same N outer iterations on digits in-process vs 1 vs 2 Ray workers.

    .venv/bin/python benchmarks/train_overhead.py [--iterations 20] [--threads 1]

In-process runs with `--threads` torch threads; each Ray worker gets `--threads` CPUs and as
many torch threads, so 1 worker and in-process do the same work on the same cores. Per-iteration
time is the steady state (iterations 5..N, from per-iteration timestamps); start-up is the
wall time minus N steady iterations, and "wall-loop" the wall time minus the loop (first to
last iteration, measured from the point where the protection was ready: robust when the median
iteration is noisy). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from sophon_ray import jobs  # noqa: E402


def in_process(cfg, source: Path, threads: int) -> dict:
    from sophon_ray.core import accuracy

    torch.set_num_threads(threads)
    start = time.perf_counter()
    t = jobs.load_tensors(cfg)
    model, _ = jobs.load_for(cfg, source, t)
    prot = jobs.build_protection(cfg, model, t, accuracy(model, *t.original_test))
    ready = time.perf_counter()  # like a Ray worker's progress clock: iteration stamps count from here
    stamps = []
    while prot.iteration < cfg.protect.iterations:
        prot.step()
        stamps.append(time.perf_counter())
    return {"wall": time.perf_counter() - start, "stamps": [s - ready for s in stamps]}


def on_ray(cfg, source: Path, workers: int, threads: int, out: Path) -> dict:
    from sophon_ray.train.driver import protect_distributed

    start = time.perf_counter()
    d = protect_distributed(cfg, source, out / f"w{workers}", workers=workers, cpus_per_worker=threads,
                            report_every=1, checkpoint_every=cfg.protect.iterations, log=lambda m: None)
    wall = time.perf_counter() - start
    metrics = json.loads((d / "metrics.json").read_text())
    lines = (out / ".ray" / metrics["ray_run"] / "progress.jsonl").read_text().splitlines()
    return {"wall": wall, "stamps": [json.loads(x)["seconds"] for x in lines], "timings": metrics["timings"]}


def steady(stamps: list[float], skip: int = 5) -> float:
    steps = [b - a for a, b in zip(stamps[skip - 1 :], stamps[skip:])]
    return statistics.median(steps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra digits config overrides, e.g. protect.envs_per_step=2")
    args = ap.parse_args()
    cfg = jobs.get_pipeline("digits", overrides=[f"protect.iterations={args.iterations}", "protect.guard_every=1000",
                                                 *args.set])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        source = jobs.pretrain(jobs.get_pipeline("digits", smoke=True), out / "source", log=lambda m: None)
        rows = {"in-process": in_process(cfg, source, args.threads)}
        for w in (1, 2):
            rows[f"ray {w} worker{'s' if w > 1 else ''}"] = on_ray(cfg, source, w, args.threads, out)
    base = steady(rows["in-process"]["stamps"])
    result = {}
    print(f"{'path':14s} {'wall s':>8s} {'per-iter s':>11s} {'vs in-proc':>10s} {'start-up s':>11s} {'wall-loop s':>11s}")
    for name, r in rows.items():
        per = steady(r["stamps"])
        startup = r["wall"] - per * args.iterations
        # Everything but the loop itself (first to last iteration, warm-up included): does not
        # depend on the median iteration, which E>2 environments of mixed cost make noisy.
        outside = r["wall"] - r["stamps"][-1]
        result[name] = {"wall_s": round(r["wall"], 2), "per_iteration_s": round(per, 4),
                        "ratio_vs_in_process": round(per / base, 3), "startup_s": round(startup, 2),
                        "wall_minus_loop_s": round(outside, 2), "timings_s": r.get("timings")}
        print(f"{name:14s} {r['wall']:8.2f} {per:11.4f} {per / base:10.3f} {startup:11.2f} {outside:11.2f}")
    print("where the Ray rows' wall time went (s; Train's metrics.json 'timings'):")
    for name, r in rows.items():
        if r.get("timings"):
            print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["timings"].items()))
    print(json.dumps({"benchmark": "train_overhead", "iterations": args.iterations, "threads": args.threads,
                      "overrides": args.set, "envs_per_step": cfg.protect.envs_per_step,
                      "torch": torch.__version__, "results": result}))


if __name__ == "__main__":
    main()
