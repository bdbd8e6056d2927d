"""Long-horizon protection on 2 Ray Train workers: seconds per outer iteration and worker peak
memory as the simulated horizon K grows (issue 29: "s / iteration of the long-horizon protection
on 2 Ray workers, memory flat in K").

    .venv/bin/python benchmarks/long_horizon.py [--pipeline mnist-to-digits] [--ks 10,40,160]
        [--iterations 6] [--repeats 1] [--source DIR]

Each K runs `protect_distributed` (2 workers, 1 CPU and 1 torch thread each, the guard pushed out)
with the suppression loss after every max(K // 10, 1)-th inner step (`protect.query_every`, the
sparse queries the compute curve uses), so an iteration costs E * (K + K / q) forward+backward
passes. Per-iteration time is the steady median (iterations 2..N, from rank 0's progress stamps);
"per pass" divides it by those passes, so a flat column means the cost is linear in K. Peak memory
is rank 0's `ru_maxrss` as its last report gives it (first order: nothing is kept across inner
steps, so it should not grow with K). Rows run in the order given, reversed every other repeat;
medians over repeats. Prints a table, then one JSON line. Without --source the source is the
pipeline's, pretrained 50 steps by the script.
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

from sophon_ray import tasks  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pipeline", default="mnist-to-digits")
    ap.add_argument("--ks", default="10,40,160")
    ap.add_argument("--iterations", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--source", type=Path, default=None)
    args = ap.parse_args()
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


if __name__ == "__main__":
    main()
