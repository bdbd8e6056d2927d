"""Audit throughput: trials per minute at concurrency 1 vs 2, and per-trial overhead with actor reuse.

Runs the real `run_audit` (planner, Tune function trainable, reuse_actors=True) on digits with
tiny trials (smoke models, budgets 5,10) and exactly 32 trials per run: suite quick-v1 (16
recipes) x 2 subjects (protected, scratch; the source model is removed so there is no
"original" baseline) and no re-runs (top_k=0). Every run starts its own local Ray inside
`run_audit` (num_cpus = this machine's CPUs), as `sophon-ray audit` does, so each run pays its own
worker start-up. The concurrencies alternate, `--repeats` times; figures are medians over the
repeats.

Measured per run, from a Tune callback in the driver (steady state: from the C-th trial
completion, when every trial actor has started, to the last; the rest of the wall time is the
fixed cost of starting the C trial actors, which import torch and load the data once):
- wall: from the Tuner's start (callback `setup`) to the last trial's completion;
- command: the whole `run_audit` call (Ray start, plan, Tuner, verdict, report, Ray shutdown);
- compute: the sum over trials of `compute_s`, the seconds each trial spent fine-tuning and
  evaluating, measured inside the trial;
- rate = trials / wall (per minute); efficiency = rate(C=2) / (2 x rate(C=1));
- overhead per trial = (C x wall - compute) / trials: the slot time a trial costs beyond its
  own compute (actor start/reuse, data and model loading, scheduling, reports). At C=1 this
  is exactly (wall - compute) / trials.

Machine ceiling (same run, after the Ray runs): the same 32 trial computations (same recipes,
subjects, seeds and budgets, via the trial's own functions) in 1 vs 2 plain Python processes,
no Ray: each process loads data and model first, waits at a barrier, then runs its share;
wall = last end - first start (CLOCK_MONOTONIC, one clock for all processes). Its efficiency is
what this machine's two cores give two independent compute-bound processes, so the audit's
steady-state efficiency can be read against it.

Usage:
    .venv/bin/python benchmarks/audit_throughput.py [--trials-budgets 5,10] [--repeats 2] [--suite quick-v1]

`--suite default-v1` runs 96 trials per run instead of 32: the same measurement at a size nearer
the hundreds of trials a real audit plans, where the fixed actor start-up weighs less.

Prints a table, then (last line of stdout) one JSON object with every number; progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGET_EFFICIENCY = 0.85
TARGET_OVERHEAD_S = 0.5


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_model(root: Path) -> Path:
    """Smoke source + protected models; the source is then removed (no 'original' subject)."""
    from sophon_ray.app.cli import main

    fast = ["--smoke", "--set", "pretrain.steps=30", "--set", "protect.iterations=3"]
    assert main(["pretrain", "digits", *fast, "--out", str(root / "source")]) == 0
    assert main(["protect", "digits", *fast, "--source", str(root / "source"), "--out", str(root / "protected")]) == 0
    shutil.rmtree(root / "source")
    return root / "protected"


def _recorder():
    from ray import tune

    class Recorder(tune.Callback):
        def setup(self, **info):
            self.start, self.end, self.compute, self.n = time.perf_counter(), None, 0.0, 0
            self.done_at: list[float] = []

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.end = time.perf_counter()
            self.done_at.append(self.end)
            self.compute += float((trial.last_result or {}).get("compute_s", 0.0))
            self.n += 1

    return Recorder()


def run_once(model: Path, budgets: tuple[int, ...], concurrency: int, out: Path, suite: str = "quick-v1") -> dict:
    from sophon_ray import tasks
    from sophon_ray.audit.driver import run_audit

    cfg = tasks.get_pipeline("digits", smoke=True)
    rec = _recorder()
    t0 = time.perf_counter()
    audit = run_audit(cfg, str(model), out=out, suite=suite, budgets=budgets, concurrency=concurrency,
                      seeds=1, top_k=0, log=lambda m: None, callbacks=[rec])
    command = time.perf_counter() - t0
    trials = len(audit["trials"])
    assert trials == rec.n and all(t["status"] == "ok" for t in audit["trials"]), "every trial must succeed"
    wall = rec.end - rec.start
    # Steady state: from the C-th completion (every actor has started and finished a trial) to
    # the last; what remains of the wall time is the fixed cost of starting the trial actors.
    first = rec.done_at[concurrency - 1]
    steady_rate = (trials - concurrency) / (rec.end - first)
    return {
        "concurrency": concurrency, "trials": trials, "command_s": round(command, 2),
        "wall_s": round(wall, 2), "compute_s": round(rec.compute, 2),
        "trials_per_min": round(60.0 * trials / wall, 2),
        "overhead_per_trial_s": round((concurrency * wall - rec.compute) / trials, 3),
        "steady_trials_per_min": round(60.0 * steady_rate, 2),
        "fixed_startup_s": round(wall - trials / steady_rate, 2),
    }


def _plain_init(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def _plain_share(model: str, budgets: tuple[int, ...], jobs_: list[tuple[str, dict, int]]) -> tuple[float, float, float]:
    """Run trial computations as the Tune trial does (cached tensors, loaded model, finetune)
    after a barrier; returns (monotonic start, monotonic end, compute seconds)."""
    import torch

    torch.set_num_threads(1)  # what Ray gives a 1-CPU trial (OMP_NUM_THREADS=1)
    from sophon_ray import tasks
    from sophon_ray.audit.trial import cached_tensors, subject_model
    from sophon_ray.config import Recipe
    from sophon_ray.core import finetune

    cfg = tasks.get_pipeline("digits", smoke=True, overrides=[f"attack.budgets={list(budgets)}"])
    task = tasks.of(cfg)
    t = cached_tensors(cfg)
    subject_model(cfg, model, t, 0, "cpu")  # load once, as a reused trial actor does
    warm = subject_model(cfg, None, t, 0, "cpu")
    finetune(warm, Recipe(), budgets=(1,), seed=0, on_budget=lambda s, v: None,
             **task.finetune_kwargs(t, warm, 0))  # first torch.optim use (imports torch._dynamo)
    _BARRIER.wait()
    start = time.monotonic()
    compute = 0.0
    for subject, recipe, seed in jobs_:
        m = subject_model(cfg, model if subject == "protected" else None, t, seed, "cpu")
        torch.manual_seed(seed)
        c0 = time.perf_counter()
        finetune(m, Recipe(**recipe), budgets=cfg.attack.budgets, seed=seed, on_budget=lambda s, v: None,
                 **task.finetune_kwargs(t, m, seed))
        compute += time.perf_counter() - c0
    return start, time.monotonic(), compute


def plain_ceiling(model: Path, budgets: tuple[int, ...], trials: list[tuple[str, dict, int]]) -> dict:
    """The same trial computations in 1 and 2 plain processes (no Ray): the machine's ceiling."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    out = {}
    for c in (1, 2):
        barrier = ctx.Barrier(c)
        with ProcessPoolExecutor(c, mp_context=ctx, initializer=_plain_init, initargs=(barrier,)) as pool:
            parts = list(pool.map(_plain_share, [str(model)] * c, [budgets] * c, [trials[i::c] for i in range(c)]))
        wall = max(p[1] for p in parts) - min(p[0] for p in parts)
        out[c] = {"concurrency": c, "trials": len(trials), "wall_s": round(wall, 2),
                  "compute_s": round(sum(p[2] for p in parts), 2), "trials_per_min": round(60.0 * len(trials) / wall, 2)}
        _err(f"  plain processes, concurrency {c}: {out[c]}")
    out["efficiency"] = round(out[2]["trials_per_min"] / (2 * out[1]["trials_per_min"]), 3)
    return out


def _median_run(runs: list[dict], c: int) -> dict:
    """Per-field medians of the runs at one concurrency."""
    rows = [r for r in runs if r["concurrency"] == c]
    keys = ("command_s", "wall_s", "compute_s", "trials_per_min", "overhead_per_trial_s", "steady_trials_per_min",
            "fixed_startup_s")
    return {"concurrency": c, "trials": rows[0]["trials"], "repeats": len(rows),
            **{k: round(statistics.median(r[k] for r in rows), 3) for k in keys}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials-budgets", default="5,10", help="step budgets of each trial")
    ap.add_argument("--repeats", type=int, default=2, help="runs per concurrency (medians reported)")
    ap.add_argument("--no-ceiling", action="store_true", help="skip the plain-process (no Ray) ceiling")
    ap.add_argument("--suite", default="quick-v1",
                    help="attack suite: trials = 2 x its recipes (quick-v1: the issue's 32; default-v1: 96)")
    args = ap.parse_args()
    budgets = tuple(int(b) for b in args.trials_budgets.split(","))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    root = Path(tempfile.mkdtemp(prefix="audit-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root}/mlflow.db"  # never the user's ./mlruns registry
    try:
        model = make_model(root)
        runs = []
        for rep in range(args.repeats):
            for c in (1, 2):
                _err(f"repeat {rep + 1}/{args.repeats}, concurrency {c} ...")
                runs.append(run_once(model, budgets, c, root / f"audit-c{c}-{rep}", args.suite))
                _err(f"  {runs[-1]}")
        ceiling = None
        if not args.no_ceiling:
            audit = json.loads((root / "audit-c1-0" / "audit.json").read_text())
            planned = [(t["subject"], t["recipe"], t["seed"]) for t in audit["trials"]]
            _err("machine ceiling: the same trials in plain processes ...")
            ceiling = plain_ceiling(model, budgets, planned)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    med = {c: _median_run(runs, c) for c in (1, 2)}
    eff = med[2]["trials_per_min"] / (2 * med[1]["trials_per_min"])
    steady_eff = med[2]["steady_trials_per_min"] / (2 * med[1]["steady_trials_per_min"])
    command_eff = med[1]["command_s"] / (2 * med[2]["command_s"])
    load = os.getloadavg()
    print(f"{'C':>2} {'trials':>6} {'command s':>9} {'wall s':>7} {'compute s':>9} {'trials/min':>10} "
          f"{'overhead s/trial':>16} {'steady/min':>10} {'fixed s':>7}")
    for c in (1, 2):
        r = med[c]
        print(f"{c:>2} {r['trials']:>6} {r['command_s']:>9.1f} {r['wall_s']:>7.1f} {r['compute_s']:>9.1f} "
              f"{r['trials_per_min']:>10.1f} {r['overhead_per_trial_s']:>16.3f} {r['steady_trials_per_min']:>10.1f} "
              f"{r['fixed_startup_s']:>7.2f}")
    print(f"parallel efficiency {eff:.1%} end to end (Tuner start to last trial), {steady_eff:.1%} in steady state, "
          f"{command_eff:.1%} over the whole command (target >= {TARGET_EFFICIENCY:.0%}); overhead at C=1 "
          f"{med[1]['overhead_per_trial_s']:.3f} s/trial (target < {TARGET_OVERHEAD_S} s); medians of "
          f"{args.repeats} repeat(s); load average {load[0]:.1f}")
    if ceiling:
        print(f"machine ceiling (same trials, 2 vs 1 plain processes, no Ray): {ceiling['efficiency']:.1%} "
              f"({ceiling[1]['trials_per_min']:.1f} vs {ceiling[2]['trials_per_min']:.1f} trials/min)")
    print(json.dumps({
        "benchmark": "audit_throughput", "suite": args.suite, "budgets": list(budgets), "repeats": args.repeats, "runs": runs,
        "median_runs": med, "parallel_efficiency": round(eff, 3), "steady_parallel_efficiency": round(steady_eff, 3),
        "command_parallel_efficiency": round(command_eff, 3), "plain_process_ceiling": ceiling,
        "overhead_per_trial_s": med[1]["overhead_per_trial_s"],
        "targets": {"efficiency": TARGET_EFFICIENCY, "overhead_s": TARGET_OVERHEAD_S}, "cpus": os.cpu_count(),
        "load_average_1m": round(load[0], 2), "python": platform.python_version(), "machine": platform.machine(),
    }))


if __name__ == "__main__":
    main()
