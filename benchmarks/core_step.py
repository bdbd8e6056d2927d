"""Time and memory of one SOPHON outer iteration against its compute floor.

One outer iteration is `Protection.step()` with ml_loop=1, nl_loop=1: one FTS step (E
simulated fine-tuning environments of K inner steps each, first-order meta-gradient) and one
NTR step. The guard is pushed out of the timed iterations (guard_every huge; the iteration-0
snapshot is taken before timing).

The FLOOR is the forward+backward work that iteration cannot avoid, measured in the same
process and interleaved with every repeat (alternating order, so drift and noise from other
processes hit both alike): E*K support-batch passes + E*K query-batch passes + one NTR-batch
pass, each a plain `torch.autograd.grad` of cross-entropy w.r.t. the parameters, model in train
mode, same batch sizes and model. ratio = iteration / floor (target <= 1.10 for first order).

Every setting runs in a FRESH child process (this script re-invoked with `--child`), which
reports its peak RSS (`ru_maxrss`, MiB) at the end, so peak memory at K=50 and K=10 is
comparable (target: K=50 <= 1.10x K=10). The parent never imports torch, so its own memory
cannot leak into a child's `ru_maxrss` across fork/exec; `/proc/self/status` VmHWM (peak of the
child's own address space) is reported alongside as a cross-check.

Usage:
    .venv/bin/python benchmarks/core_step.py            # full run (~9-10 min on an idle 2-core CPU)
    .venv/bin/python benchmarks/core_step.py --quick    # cnn-small only, K=5, 1 repeat (seconds)

Prints a table, then (last line of stdout) one JSON object with every number. Progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

TARGET_RATIO = 1.10  # iteration <= 1.10 x floor (first order)
TARGET_RSS = 1.10  # peak RSS at K=main <= 1.10 x peak RSS at K=ref
POOL = 512  # samples in each random pool (restricted, original)
CLASSES = 5


# ------------------------------------------------------------------------------------------
# child: one setting, fresh process
# ------------------------------------------------------------------------------------------


def _status_mib(field: str) -> float | None:
    """A `/proc/self/status` memory field (e.g. VmHWM, VmRSS) in MiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_child(spec: dict) -> dict:
    """Build the model and a Protection for `spec`, time iteration vs floor, report peak RSS."""
    import resource

    import torch
    import torch.nn.functional as F

    from sophon_ray.config import ArchSpec, EnvSpace, ProtectConfig
    from sophon_ray.core.losses import get_loss
    from sophon_ray.core.objectives import ClassificationObjective
    from sophon_ray.core.protect import Protection, ProtectData
    from sophon_ray.models import build_classifier

    load_start = os.getloadavg()[0]
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    c, s = spec["channels"], spec["size"]
    K, E = spec["inner_steps"], spec["envs"]
    S, Q, N = spec["support_batch"], spec["query_batch"], spec["ntr_batch"]

    model = build_classifier(ArchSpec(spec["arch"]), CLASSES, c, s)
    g = torch.Generator().manual_seed(1)
    data = ProtectData(
        original=(torch.randn(POOL, c, s, s, generator=g), torch.randint(CLASSES, (POOL,), generator=g)),
        restricted=(torch.randn(POOL, c, s, s, generator=g), torch.randint(CLASSES, (POOL,), generator=g)),
    )
    cfg = ProtectConfig(
        iterations=10**9,  # never reached: no end-of-run guard inside the timed iterations
        ml_loop=1,
        nl_loop=1,
        envs_per_step=E,
        inner_steps=K,
        order=spec["order"],
        query_batch=Q,
        ntr_batch=N,
        guard_every=10**9,
        env=EnvSpace(optimizers=("sgd",), lr={"sgd": (1e-3, 1e-3)}, batch_sizes=(S,), reinit_head_prob=0.0,
                     head_only_prob=0.0),  # every iteration does the full work the floor counts
    )
    objective = ClassificationObjective(get_loss(cfg.loss))
    prot = Protection(
        model, cfg, data, objective,
        evaluate_original=lambda: 1.0, source_value=1.0,  # guard always passes (and is not timed)
        head_keys=("head.weight", "head.bias"),
    )
    prot.check_guard()  # the iteration-0 snapshot step() would take; done here, untimed

    # Floor batches: drawn once from the same pools and reused (compute does not depend on the
    # values); one tensor per kind so the floor's own memory does not grow with K.
    def draw(pool, n):
        idx = torch.randint(len(pool[0]), (n,), generator=g)
        return pool[0][idx], pool[1][idx]

    sup_b, qry_b, ntr_b = draw(data.restricted, S), draw(data.restricted, Q), draw(data.original, N)
    params = list(model.parameters())

    def floor_pass(n_env: int, k: int) -> None:
        model.train()
        for _ in range(n_env):
            for _ in range(k):
                for x, y in (sup_b, qry_b):
                    torch.autograd.grad(F.cross_entropy(model(x), y), params)
        x, y = ntr_b
        torch.autograd.grad(F.cross_entropy(model(x), y), params)

    def timed(fn) -> tuple[float, float]:
        w, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w, time.process_time() - cpu

    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    hwm_setup = _status_mib("VmHWM")

    # Kernel warm-up: one short floor (every batch shape once), then `warmup` untimed iterations.
    floor_pass(1, 1)
    for i in range(spec["warmup"]):
        w, _ = timed(prot.step)
        _log(f"    [{spec['label']}] warm-up iteration {i + 1}/{spec['warmup']}: {w:.2f} s")

    it_wall, it_cpu, fl_wall, fl_cpu, ratios, rss_rep = [], [], [], [], [], []
    for r in range(spec["repeats"]):
        if r % 2 == 0:  # alternate the order so slow drift hits both sides alike
            iw, ic = timed(prot.step)
            fw, fc = timed(lambda: floor_pass(E, K))
        else:
            fw, fc = timed(lambda: floor_pass(E, K))
            iw, ic = timed(prot.step)
        it_wall.append(iw), it_cpu.append(ic), fl_wall.append(fw), fl_cpu.append(fc), ratios.append(iw / fw)
        rss_rep.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
        _log(f"    [{spec['label']}] repeat {r + 1}/{spec['repeats']}: iteration {iw:.3f} s, floor {fw:.3f} s, ratio {iw / fw:.3f}")

    med = statistics.median
    return {
        **spec,
        "passes_in_floor": 2 * E * K + 1,
        "iteration_s": it_wall,
        "floor_s": fl_wall,
        "iteration_cpu_s": it_cpu,
        "floor_cpu_s": fl_cpu,
        "ratio_per_repeat": ratios,
        "iteration_s_median": med(it_wall),
        "floor_s_median": med(fl_wall),
        "ratio_median": med(ratios),  # median of the paired per-repeat ratios (headline)
        "ratio_of_medians": med(it_wall) / med(fl_wall),
        "cpu_ratio_median": med(i / f for i, f in zip(it_cpu, fl_cpu)),
        "peak_rss_per_repeat_mib": rss_rep,  # high-water mark after each timed pair
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "vm_hwm_mib": _status_mib("VmHWM"),
        "peak_rss_after_setup_mib": rss_setup,
        "vm_hwm_after_setup_mib": hwm_setup,
        "params": sum(p.numel() for p in params),
        "loadavg_1min_start_end": [load_start, os.getloadavg()[0]],  # other processes on the machine
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------
# parent: plan the settings, run each in a fresh child, print the table and the JSON line
# ------------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> list[dict]:
    """The settings to run, each a dict handed to a child."""
    main = {
        "arch": args.arch, "channels": args.channels, "size": args.size,
        "support_batch": args.support_batch, "query_batch": args.query_batch, "ntr_batch": args.ntr_batch,
        "inner_steps": args.inner_steps, "envs": args.envs, "order": "first",
        "threads": args.threads, "warmup": args.warmup, "repeats": args.repeats,
    }
    small = {
        **main, "arch": "cnn-small", "channels": 1, "size": 16, "support_batch": 32, "query_batch": 64,
        "ntr_batch": 64, "inner_steps": 10, "envs": 1, "repeats": args.small_repeats,
    }
    if args.quick:
        small = {**small, "inner_steps": 5, "repeats": 1, "warmup": 1}
        return [
            {**small, "role": "main", "label": "cnn-small K=5 E=1"},
            {**small, "role": "envs", "envs": 4, "label": "cnn-small K=5 E=4"},
            {**small, "role": "second", "order": "second", "label": "cnn-small K=5 E=1 second-order"},
        ]
    rows = [
        {**main, "role": "main", "label": f"{args.arch} K={args.inner_steps} E={args.envs}"},
        # Memory reference (fresh process, same everything but K) and a second timing point.
        {**main, "role": "ref", "inner_steps": args.ref_steps, "repeats": args.ref_repeats,
         "label": f"{args.arch} K={args.ref_steps} E={args.envs}"},
        # E=4 environments per FTS step at K=10 (K=50 would take ~4 min per iteration here).
        {**main, "role": "envs", "inner_steps": args.ref_steps, "envs": 4, "warmup": args.envs_warmup,
         "repeats": args.envs_repeats, "label": f"{args.arch} K={args.ref_steps} E=4"},
        {**small, "role": "small", "label": "cnn-small K=10 E=1"},
        {**small, "role": "second", "order": "second", "label": "cnn-small K=10 E=1 second-order"},
    ]
    if args.rows:
        want = set(args.rows.split(","))
        unknown = want - {r["role"] for r in rows}
        if unknown:
            raise SystemExit(f"[core_step] unknown --rows {sorted(unknown)}; use main, ref, envs, small, second")
        rows = [r for r in rows if r["role"] in want]
    return rows


def run_parent(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    results = []
    for spec in plan(args):
        _log(f"[core_step] {spec['label']}: warm-up {spec['warmup']}, repeats {spec['repeats']}, "
             f"threads {spec['threads']} (fresh process)")
        t = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
            stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        if proc.returncode != 0:
            raise SystemExit(f"[core_step] child for {spec['label']!r} failed with exit code {proc.returncode}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["child_wall_s"] = time.perf_counter() - t
        results.append(res)
        _log(f"[core_step] {spec['label']}: done in {res['child_wall_s']:.0f} s")

    for r in results:
        r["target_ratio"] = None if r["order"] == "second" else TARGET_RATIO
        r["ratio_met"] = None if r["target_ratio"] is None else r["ratio_median"] <= TARGET_RATIO
    by_role = {r["role"]: r for r in results}
    rss = None
    if "main" in by_role and "ref" in by_role:
        m, f = by_role["main"], by_role["ref"]
        rss = {
            "k_main": m["inner_steps"], "k_ref": f["inner_steps"],
            "peak_rss_main_mib": m["peak_rss_mib"], "peak_rss_ref_mib": f["peak_rss_mib"],
            "ratio": m["peak_rss_mib"] / f["peak_rss_mib"],
            "vm_hwm_ratio": (m["vm_hwm_mib"] / f["vm_hwm_mib"]) if m["vm_hwm_mib"] and f["vm_hwm_mib"] else None,
            "growth_above_setup_main_mib": m["peak_rss_mib"] - m["peak_rss_after_setup_mib"],
            "growth_above_setup_ref_mib": f["peak_rss_mib"] - f["peak_rss_after_setup_mib"],
            "target": TARGET_RSS,
        }
        rss["met"] = rss["ratio"] <= TARGET_RSS

    first = results[0]
    print(f"SOPHON outer iteration (1 FTS + 1 NTR step) vs floor; torch {first['torch']}, "
          f"{first['torch_threads']} threads, {os.cpu_count()} CPUs, {platform.machine()}")
    print("floor = E*K support + E*K query + 1 NTR forward+backward passes (plain autograd.grad of CE)")
    head = f"{'setting':<32} {'order':<6} {'S/Q/N':<10} {'rep':>3} {'iter s':>9} {'floor s':>9} {'ratio':>6} {'target':>11} {'peak RSS':>10} {'load1m':>9}"
    print(head)
    print("-" * len(head))
    for r in results:
        tgt = "info" if r["target_ratio"] is None else ("<=1.10 " + ("ok" if r["ratio_met"] else "MISS"))
        bs = f"{r['support_batch']}/{r['query_batch']}/{r['ntr_batch']}"
        print(f"{r['label']:<32} {r['order']:<6} {bs:<10} {r['repeats']:>3} {r['iteration_s_median']:>9.3f} "
              f"{r['floor_s_median']:>9.3f} {r['ratio_median']:>6.3f} {tgt:>11} {r['peak_rss_mib']:>6.0f} MiB "
              f"{r['loadavg_1min_start_end'][0]:>4.1f}/{r['loadavg_1min_start_end'][1]:<4.1f}")
    if rss:
        print(f"peak RSS K={rss['k_main']} vs K={rss['k_ref']}: {rss['peak_rss_main_mib']:.0f} MiB vs "
              f"{rss['peak_rss_ref_mib']:.0f} MiB, ratio {rss['ratio']:.3f} (target <= {TARGET_RSS:.2f}: "
              f"{'ok' if rss['met'] else 'MISS'}); growth above post-setup peak "
              f"{rss['growth_above_setup_main_mib']:.0f} vs {rss['growth_above_setup_ref_mib']:.0f} MiB")
    print(f"total wall time {time.perf_counter() - t0:.0f} s; medians over 'rep' timed pairs; ratio = median of per-repeat "
          "iteration/floor; load1m = 1-min load average at child start/end (2 threads of ours included at the end)")
    summary = {
        "benchmark": "core_step",
        "argv": sys.argv[1:],
        "torch": first["torch"],
        "threads": first["torch_threads"],
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "target_ratio": TARGET_RATIO,
        "rows": results,
        "rss_k_comparison": rss,
        "total_wall_s": time.perf_counter() - t0,
    }
    print(json.dumps(summary, sort_keys=True))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--support-batch", type=int, default=50)
    p.add_argument("--query-batch", type=int, default=14)
    p.add_argument("--ntr-batch", type=int, default=64)
    p.add_argument("--inner-steps", type=int, default=50, help="K of the main row")
    p.add_argument("--envs", type=int, default=1, help="E of the main row")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child")
    p.add_argument("--repeats", type=int, default=3, help="timed (iteration, floor) pairs of the main row")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations before timing (main, ref, cnn-small rows)")
    p.add_argument("--ref-steps", type=int, default=10, help="K of the memory-reference row and of the E=4 row")
    p.add_argument("--ref-repeats", type=int, default=1, help="timed pairs of the memory-reference row")
    p.add_argument("--envs-repeats", type=int, default=1, help="timed pairs of the E=4 row")
    p.add_argument("--envs-warmup", type=int, default=0, help="untimed iterations of the E=4 row (a one-pass kernel warm-up always runs)")
    p.add_argument("--small-repeats", type=int, default=9, help="timed pairs of the cnn-small rows")
    p.add_argument("--rows", default="", help="comma list of the rows to run (main,ref,envs,small,second); default all")
    p.add_argument("--quick", action="store_true", help="fast sanity run: cnn-small only, K=5, 1 repeat")
    p.add_argument("--child", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
