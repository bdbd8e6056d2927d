"""Where Ray Train's start-up goes: per-process CPU, CPU use per second, and Ray's task timeline.

    .venv/bin/python benchmarks/train_startup_anatomy.py [--workers 2] [--iterations 8]

One real `protect_distributed` on digits (E=2) on a local Ray this script starts (the same
`init_ray` as `sophon-ray protect`). While it runs, a sampler reads /proc once a second: the CPU
seconds every process used (Train's controller, workers and helper actors, Ray's own daemons;
each process's last 1-s reading, so a process that exits misses up to a second)
and the machine's total CPU use per second, which shows when both cores are busy and when the
start-up is a serial chain on one. After the run it prints Ray's timeline (`ray.timeline()`) of
the actor-creation and long tasks, seconds from the start of `protect_distributed`. Linux only.
Prints tables, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sophon_ray import jobs, ray_local  # noqa: E402


def snapshot() -> dict[int, tuple[float, str]]:
    """{pid: (CPU seconds so far, command line)} for every process."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        out[int(p)] = ((int(fields[11]) + int(fields[12])) / tick, cmd or stat[stat.find("(") + 1: stat.rfind(")")])
    return out


def label(cmd: str) -> str:
    if cmd.startswith("ray::"):
        return cmd.split()[0]
    for name in ("gcs_server", "raylet", "dashboard.py", "log_monitor.py", "monitor.py", "runtime_env", "agent"):
        if name in cmd:
            return name
    return cmd[:40]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=8)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    import ray.train.torch  # noqa: F401  (the driver's own import is not the subject)
    from sophon_ray.train.driver import init_ray, protect_distributed

    cfg = jobs.get_pipeline("digits", overrides=[f"protect.iterations={args.iterations}", "protect.guard_every=1000",
                                                 "protect.envs_per_step=2"])
    samples: list[tuple[float, dict]] = []
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            samples.append((time.time(), snapshot()))
            time.sleep(1.0)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        source = jobs.pretrain(jobs.get_pipeline("digits", smoke=True), out / "source", log=lambda m: None)
        before = snapshot()
        t0 = time.time()
        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        try:
            init_ray(None, prestart=False)
            t1 = time.time()
            d = protect_distributed(cfg, source, out / "run", workers=args.workers, cpus_per_worker=1,
                                    report_every=1, checkpoint_every=args.iterations, log=lambda m: None,
                                    prestart=False)
            t2 = time.time()
            samples.append((time.time(), snapshot()))  # every Ray process still alive
            events = ray.timeline()
        finally:
            stop.set()
            th.join()
            ray_local.shutdown()
        timings = json.loads((d / "metrics.json").read_text())["timings"]
    last: dict[int, tuple[float, str]] = {}
    for _, snap in samples:  # each process's last reading (workers exit before the run returns)
        last.update(snap)
    per_proc: dict[str, float] = {}
    for pid, (cpu, cmd) in last.items():
        used = cpu - before.get(pid, (0.0, ""))[0]
        if used > 0.05:
            per_proc[label(cmd)] = round(per_proc.get(label(cmd), 0.0) + used, 2)
    rows = sorted(per_proc.items(), key=lambda kv: -kv[1])
    print(f"ray.init {t1 - t0:.2f} s, protect_distributed {t2 - t1:.2f} s, loop {timings['loop']:.2f} s; "
          f"start-up (wall - loop, ray.init included) {t2 - t0 - timings['loop']:.2f} s")
    print("CPU seconds per process (summed by name):")
    for name, cpu in rows:
        print(f"  {cpu:6.2f}  {name}")
    print(f"  {sum(per_proc.values()):6.2f}  total")
    per_second = []
    prev = before
    for ts, snap in samples[:-1]:
        used = sum(max(c - prev.get(p, (0.0, ""))[0], 0.0) for p, (c, _) in snap.items())
        per_second.append((round(ts - t0, 1), round(used, 2)))
        prev = snap
    print("machine CPU use per ~1-s sample (s from start: CPU s):", " ".join(f"{a}:{b}" for a, b in per_second))
    timeline = sorted((round(e["ts"] / 1e6 - t1, 2), round(e["dur"] / 1e6, 2), e.get("name"), e.get("tid", "")[-6:])
                      for e in events if e.get("ph") == "X")
    shown = [r for r in timeline if r[1] >= 0.1 or r[2] == "__init__"]
    print("Ray timeline (s from protect_distributed's start, duration, task, worker):")
    for start, dur, name, worker in shown:
        print(f"  {start:7.2f} +{dur:6.2f}  {name}  {worker}")
    print(json.dumps({"benchmark": "train_startup_anatomy", "workers": args.workers, "iterations": args.iterations,
                      "ray_init_s": round(t1 - t0, 2), "protect_s": round(t2 - t1, 2), "timings_s": timings,
                      "cpu_s_per_process": dict(rows), "cpu_per_second": per_second, "timeline": shown}))


if __name__ == "__main__":
    main()
