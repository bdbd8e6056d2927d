"""Ray Train overhead: the same N outer iterations on digits in-process vs 1 vs 2 Ray workers.

    .venv/bin/python benchmarks/train_overhead.py [--iterations 20] [--threads 1] [--report-every 1]

In-process runs with `--threads` torch threads; each Ray worker gets `--threads` CPUs and as
many torch threads, so 1 worker and in-process do the same work on the same cores. Per-iteration
time is the steady state (iterations 5..N, from per-iteration timestamps); start-up is the
wall time minus N steady iterations, and "wall-loop" the wall time minus the loop (first to
last iteration, measured from the point where the protection was ready: robust when the median
iteration is noisy). With `--repeats N` the three rows run N times, in reversed order every
other repeat (the machine's speed drifts by ~10% over minutes), and the table shows medians; the
ratio to in-process is the median of the per-repeat ratios. The Ray rows call `ray.train.report` every `--report-every` iterations
(default 1, the cadence `protect` itself uses for runs of up to 39 iterations; it reports every
iterations // 20 beyond); per-iteration time is then the median over report intervals divided
by their length. Prints a table, then one JSON line.

Long-horizon mode (issue 29: "s / iteration of the long-horizon protection on 2 Ray workers,
memory flat in K"):

    .venv/bin/python benchmarks/train_overhead.py --ks 10,40,160 --pipeline mnist-to-digits --iterations 6
        [--repeats 1] [--source DIR]

Each K runs `protect_distributed` (2 workers, 1 CPU and 1 torch thread each, the guard pushed
out) with the suppression loss after every max(K // 10, 1)-th inner step (`protect.query_every`,
the sparse queries of the compute curve), so an iteration costs E * (K + K / q) forward+backward
passes. Per-iteration time is the steady median (iterations 2..N, rank 0's progress stamps); "per
pass" divides it by those passes (flat = cost linear in K). Peak memory is rank 0's `ru_maxrss`
from its reports (first order keeps nothing across inner steps, so it should not grow with K).
Rows in the order given, reversed every other repeat; medians over repeats; a table, then one
JSON line. Without --source the source is the pipeline's, pretrained 50 steps by the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from sophon_ray import tasks  # noqa: E402


def in_process(cfg, source: Path, threads: int) -> dict:
    from sophon_ray.core import accuracy

    torch.set_num_threads(threads)
    start = time.perf_counter()
    task = tasks.of(cfg)
    t = task.load_tensors()
    model, _ = task.load_for(source, t)
    prot = task.build_protection(model, t, accuracy(model, *t.original_test))
    ready = time.perf_counter()  # like a Ray worker's progress clock: iteration stamps count from here
    stamps = []
    while prot.iteration < cfg.protect.iterations:
        prot.step()
        stamps.append((prot.iteration, time.perf_counter() - ready))
    return {"wall": time.perf_counter() - start, "stamps": stamps}


def on_ray(cfg, source: Path, workers: int, threads: int, out: Path, report_every: int = 1) -> dict:
    from sophon_ray.train.driver import protect_distributed, timings_of

    start = time.perf_counter()
    d = protect_distributed(cfg, source, out / f"w{workers}", workers=workers, cpus_per_worker=threads,
                            report_every=report_every, checkpoint_every=cfg.protect.iterations, log=lambda m: None)
    wall = time.perf_counter() - start
    metrics = json.loads((d / "metrics.json").read_text())
    lines = [json.loads(x) for x in (out / ".ray" / metrics["ray_run"] / "progress.jsonl").read_text().splitlines()]
    return {"wall": wall, "stamps": [(int(x["iteration"]), float(x["seconds"])) for x in lines],
            "timings": timings_of(d)}


def steady(stamps: list[tuple[int, float]], skip: int = 5) -> float:
    """Median seconds per iteration over the intervals between (iteration, seconds) stamps that
    start at iteration `skip` or later (the first iterations warm up)."""
    steps = [(b - a) / (j - i) for (i, a), (j, b) in zip(stamps, stamps[1:]) if i >= skip]
    return statistics.median(steps)


def run_k(pipeline: str, source: Path, k: int, iterations: int, out: Path) -> dict:
    from sophon_ray.train.driver import protect_distributed

    q = max(k // 10, 1)
    cfg = tasks.get_pipeline(pipeline, overrides=[f"protect.iterations={iterations}", "protect.guard_every=100000",
                                                  f"protect.inner_steps={k}", f"protect.query_every={q}"])
    start = time.perf_counter()
    d = protect_distributed(cfg, source, out, workers=2, cpus_per_worker=1, report_every=1,
                            checkpoint_every=iterations, log=lambda m: None)
    wall = time.perf_counter() - start
    run = json.loads((d / "metrics.json").read_text())["ray_run"]
    lines = [json.loads(x) for x in (out.parent / ".ray" / run / "progress.jsonl").read_text().splitlines()]
    stamps = [(int(x["iteration"]), float(x["seconds"])) for x in lines]
    per = statistics.median((b - a) / (j - i) for (i, a), (j, b) in zip(stamps, stamps[1:]) if i >= 2)
    passes = cfg.protect.envs_per_step * (k + -(-k // q))
    return {"k": k, "query_every": q, "per_iteration_s": round(per, 3), "passes": passes,
            "per_pass_ms": round(1000 * per / passes, 2), "rss_peak_mib": round(max(x["rss_peak_mib"] for x in lines)),
            "wall_s": round(wall, 1)}


def long_horizon(args) -> None:
    ks = [int(x) for x in args.ks.split(",")]
    rows: dict[int, list[dict]] = {k: [] for k in ks}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        source = args.source or tasks.of(tasks.get_pipeline(args.pipeline, overrides=["pretrain.steps=50"])).pretrain(
            out / "source", log=lambda m: None)
        for rep in range(args.repeats):
            for k in ks if rep % 2 == 0 else ks[::-1]:
                rows[k].append(run_k(args.pipeline, Path(source), k, args.iterations, out / f"r{rep}-k{k}"))
                print(f"  repeat {rep + 1}/{args.repeats} K={k}: {rows[k][-1]}", file=sys.stderr, flush=True)
    med = statistics.median
    result = {str(k): {key: med(r[key] for r in rs) if isinstance(rs[0][key], (int, float)) else rs[0][key]
                       for key in rs[0]} for k, rs in rows.items()}
    ref = result[str(ks[0])]
    print(f"{'K':>5s} {'q':>3s} {'s / iteration':>14s} {'passes':>7s} {'ms / pass':>10s} {'peak RSS MiB':>13s} {'vs K=' + str(ks[0]):>10s}")
    for k in ks:
        r = result[str(k)]
        print(f"{k:5d} {r['query_every']:3d} {r['per_iteration_s']:14.3f} {r['passes']:7d} {r['per_pass_ms']:10.2f} "
              f"{r['rss_peak_mib']:13.0f} {r['rss_peak_mib'] / ref['rss_peak_mib']:9.3f}x")
    print(json.dumps({"pipeline": args.pipeline, "iterations": args.iterations, "repeats": args.repeats, "rows": result}))



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report-every", type=int, default=1, help="Ray rows: ray.train.report every N iterations")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the three rows N times, order reversed every other repeat; medians reported")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config overrides, e.g. protect.envs_per_step=2")
    ap.add_argument("--pipeline", default="digits", help="pipeline (the source is pretrained 50 steps)")
    ap.add_argument("--batched", action="store_true",
                    help="add an in-process row with protect.env_batching=auto (vmap over environments)")
    ap.add_argument("--ks", default=None, help="long-horizon mode: these K on 2 Ray workers, e.g. 10,40,160")
    ap.add_argument("--source", type=Path, default=None, help="long-horizon mode: the source model")
    args = ap.parse_args()
    if args.ks:
        return long_horizon(args)
    cfg = tasks.get_pipeline(args.pipeline, overrides=[f"protect.iterations={args.iterations}",
                                                       "protect.guard_every=1000", *args.set])
    names = ["in-process", "ray 1 worker", "ray 2 workers"] + (["in-process batched"] if args.batched else [])
    batched_cfg = dataclasses.replace(cfg, protect=dataclasses.replace(cfg.protect, env_batching="auto"))
    runs: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        source = tasks.of(tasks.get_pipeline(args.pipeline, overrides=["pretrain.steps=50"])).pretrain(
            out / "source", log=lambda m: None)
        for rep in range(args.repeats):
            for name in names if rep % 2 == 0 else names[::-1]:
                if name.startswith("in-process"):
                    r = in_process(batched_cfg if name.endswith("batched") else cfg, source, args.threads)
                else:
                    r = on_ray(cfg, source, int(name.split()[1]), args.threads, out / f"rep{rep}", args.report_every)
                per = steady(r["stamps"])
                # Everything but the loop itself (first to last iteration, warm-up included): does not
                # depend on the median iteration, which E>2 environments of mixed cost make noisy.
                runs[name].append({"wall_s": round(r["wall"], 2), "per_iteration_s": round(per, 4),
                                   "startup_s": round(r["wall"] - per * args.iterations, 2),
                                   "wall_minus_loop_s": round(r["wall"] - r["stamps"][-1][1], 2),
                                   "timings_s": r.get("timings")})
                print(f"  repeat {rep + 1}/{args.repeats} {name}: {runs[name][-1]}", file=sys.stderr, flush=True)
    med = statistics.median
    result = {}
    print(f"{'path':14s} {'wall s':>8s} {'per-iter s':>11s} {'vs in-proc':>10s} {'start-up s':>11s} {'wall-loop s':>11s}"
          f"   (medians of {args.repeats}; ratio = median of the per-repeat ratios)")
    for name in names:
        rs = runs[name]
        ratios = [r["per_iteration_s"] / b["per_iteration_s"] for r, b in zip(rs, runs["in-process"])]
        row = {k: round(med(r[k] for r in rs), 4) for k in ("wall_s", "per_iteration_s", "startup_s", "wall_minus_loop_s")}
        row["ratio_vs_in_process"] = round(med(ratios), 3)
        row["ratios"] = [round(x, 3) for x in ratios]
        row["startups_s"] = [r["startup_s"] for r in rs]
        timings = [r["timings_s"] for r in rs if r["timings_s"]]
        row["timings_s"] = {k: round(med(t[k] for t in timings), 2) for k in timings[0]} if timings else None
        row["runs"] = rs
        result[name] = row
        print(f"{name:14s} {row['wall_s']:8.2f} {row['per_iteration_s']:11.4f} {row['ratio_vs_in_process']:10.3f} "
              f"{row['startup_s']:11.2f} {row['wall_minus_loop_s']:11.2f}")
    print("where the Ray rows' wall time went (s, medians; the Train run's timings.json):")
    for name, row in result.items():
        if row["timings_s"]:
            print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in row["timings_s"].items()))
    print(json.dumps({"benchmark": "train_overhead", "iterations": args.iterations, "threads": args.threads,
                      "report_every": args.report_every, "repeats": args.repeats,
                      "overrides": args.set, "envs_per_step": cfg.protect.envs_per_step,
                      "torch": torch.__version__, "load_average_1m": round(os.getloadavg()[0], 2), "results": result}))


if __name__ == "__main__":
    main()
