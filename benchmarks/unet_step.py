"""Where a `digits-diffusion` run's time goes, and whether the UNet step has a cheap speed-up.

Times one attack step (ε-prediction loss, forward + backward + Adam step) of the pipeline's
unet-small at the audit's batch sizes, and one audit evaluation (restricted test MSE over the
10-timestep grid + t = 1), in one process with a fixed thread count, for these variants of the
same model and data, measured round-robin (so machine noise hits all of them):

- `default`: what the audit runs;
- `channels_last`: model and input in channels-last memory format;
- `no-mkldnn`: torch's native convolution instead of oneDNN;
- `compile` (with `--compile`): `torch.compile(model)` (inductor; needs a C++ compiler), its
  compile time reported separately.

Then the floor of the audit's trial compute: the pipeline's suite run on three subjects to the
largest budget, plus the re-runs of the best recipes (`--reruns`, 24 in the full run), at the
measured per-step and per-evaluation costs, divided by the concurrency. It is a floor: no Tune
scheduling, data or model loading, reports, or machine load.

Usage:
    .venv/bin/python benchmarks/unet_step.py [--threads 1] [--steps 20] [--rounds 3] [--compile]

Prints a table, then (last line of stdout) one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (an audit trial has 1)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="round-robin rounds (median reported)")
    ap.add_argument("--concurrency", type=int, default=2, help="trials at once, for the floor")
    ap.add_argument("--reruns", type=int, default=24, help="re-run trials, for the floor (the run had 24)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sophon_ray import pipelines, tasks
    from sophon_ray.core.attack import make_optimizer

    cfg = pipelines.load("digits-diffusion")
    task = tasks.of(cfg)
    t = task.load_tensors()
    batch_sizes = sorted({r.batch_size for r in task.suites()["diffusion-v1"]} | {64})

    def variant(name: str):
        model = task.new_model(t.num_classes, 0)
        fmt = None
        if name == "channels_last":
            fmt = torch.channels_last
            model = model.to(memory_format=fmt)
        run_model = torch.compile(model) if name == "compile" else model
        kw = task.finetune_kwargs(t, run_model, 0, {})
        opt = make_optimizer("adam", list(model.parameters()), 1e-3, 0.0)
        return {"model": run_model, "fmt": fmt, "kw": kw, "opt": opt, "mkldnn": name != "no-mkldnn"}

    def timed_steps(v: dict, bs: int, n: int) -> float:
        torch.backends.mkldnn.enabled = v["mkldnn"]
        x = t.restricted_train[0][:bs]
        if v["fmt"] is not None:
            x = x.contiguous(memory_format=v["fmt"])
        start = time.perf_counter()
        for _ in range(n):
            loss = v["kw"]["loss_fn"](v["model"], (x,))
            v["opt"].zero_grad(set_to_none=True)
            loss.backward()
            v["opt"].step()
        torch.backends.mkldnn.enabled = True
        return (time.perf_counter() - start) / n

    names = ["default", "channels_last", "no-mkldnn"] + (["compile"] if args.compile else [])
    variants, compile_s = {}, {}
    for name in names:
        start = time.perf_counter()
        variants[name] = variant(name)
        for bs in batch_sizes:
            timed_steps(variants[name], bs, 2)  # warm-up (and compilation, per batch size)
        compile_s[name] = time.perf_counter() - start
    step_ms: dict[str, dict[int, list[float]]] = {n: {bs: [] for bs in batch_sizes} for n in names}
    eval_ms: list[float] = []
    for _ in range(args.rounds):
        for name in names:
            for bs in batch_sizes:
                step_ms[name][bs].append(1000 * timed_steps(variants[name], bs, args.steps))
        start = time.perf_counter()
        variants["default"]["kw"]["evaluate"](variants["default"]["model"])
        eval_ms.append(1000 * (time.perf_counter() - start))

    med = {n: {bs: statistics.median(v) for bs, v in d.items()} for n, d in step_ms.items()}
    print(f"unet-small step (fwd+bwd+Adam), {args.threads} thread(s), median of {args.rounds} x {args.steps} steps")
    print("| variant | " + " | ".join(f"batch {bs} ms" for bs in batch_sizes) + " | vs default (batch 16) | set-up s |")
    print("|---|" + "---|" * len(batch_sizes) + "---|---|")
    for name in names:
        cells = " | ".join(f"{med[name][bs]:.1f}" for bs in batch_sizes)
        print(f"| {name} | {cells} | {med[name][16] / med['default'][16]:.2f}x | {compile_s[name]:.1f} |")
    ev = statistics.median(eval_ms)
    print(f"audit evaluation (restricted test, {len(t.restricted_test[0])} images x 11 timesteps): {ev:.0f} ms")

    suite = task.suites()["diffusion-v1"]
    budgets = cfg.attack.budgets
    per_trial = [budgets[-1] * med["default"][r.batch_size] / 1000 + len(budgets) * ev / 1000 for r in suite]
    primary = 3 * sum(per_trial)  # protected, original, scratch
    # Re-runs: the top 3 recipes by protected and by scratch (deduplicated), on all three subjects,
    # with seeds 1..seeds; `sophon-ray run digits-diffusion` (seeds 2) re-ran 4 recipes: 24 trials.
    reruns = args.reruns * statistics.median(per_trial)
    floor = (primary + reruns) / args.concurrency
    print(f"audit trial compute floor (diffusion-v1, 3 x {len(suite)} + {args.reruns} re-runs, to {budgets[-1]} steps, "
          f"concurrency {args.concurrency}): {floor:.0f} s = {floor / 60:.1f} min")
    print(json.dumps({"threads": args.threads, "steps": args.steps, "rounds": args.rounds, "step_ms": med,
                      "setup_s": compile_s, "eval_ms": ev, "trial_s": per_trial, "audit_floor_s": floor}))


if __name__ == "__main__":
    main()
