"""Time and peak memory of one SOPHON outer iteration on the digits UNet, against its floor.

The diffusion counterpart of `core_step.py`: the `digits-diffusion` pipeline's model (unet-small
at the pipeline's input: 1x8x8 since 2026-12-03, the 2026-11-29 row was measured at 1x16x16; DDPM
ε-prediction) and protection settings (batch sizes, MSE-ascent suppression, first-order
meta-gradient), with E environments of K inner steps. One outer iteration is
`Protection.step()` with ml_loop = nl_loop = 1 and the guard pushed out of the timed iterations.

FLOOR = E*K support + E*K query + 1 NTR forward+backward passes of the plain ε-prediction MSE
(`torch.autograd.grad`), same model, batch sizes and timestep range, interleaved with the
iterations in alternating order (so machine noise hits both). ratio = iteration / floor.

Each setting runs in a fresh child process that reports its peak RSS (`ru_maxrss`), so K=20 vs
K=5 shows whether memory grows with K (first order: it must not).

Usage:
    .venv/bin/python benchmarks/diffusion_step.py [--repeats 5] [--threads 2]

Prints a table, then (last line of stdout) one JSON object with every number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_child(spec: dict) -> dict:
    import dataclasses
    import resource

    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from sophon_ray import pipelines, tasks
    from sophon_ray.core.protect import Protection, ProtectData
    from sophon_ray.models import build_diffusion

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    cfg = pipelines.load("digits-diffusion")
    E, K = spec["envs"], spec["inner_steps"]
    bs = cfg.protect.env.batch_sizes[0]
    pc = dataclasses.replace(
        cfg.protect, iterations=10**9, ml_loop=1, nl_loop=1, envs_per_step=E, inner_steps=K, guard_every=10**9,
        env=dataclasses.replace(cfg.protect.env, optimizers=("sgd",), lr={"sgd": (1e-3, 1e-3)}, batch_sizes=(bs,)),
    )
    model, sched = build_diffusion(cfg.arch, cfg.input.channels, cfg.input.size)
    s = cfg.input.size
    g = torch.Generator().manual_seed(1)
    pool = 512
    data = ProtectData(
        original=(torch.randn(pool, 1, s, s, generator=g), torch.zeros(pool, dtype=torch.long)),
        restricted=(torch.randn(pool, 1, s, s, generator=g), torch.zeros(pool, dtype=torch.long)),
    )
    obj = tasks.of(cfg).objective(sched.alphas_cumprod, protection=True)
    prot = Protection(model, pc, data, obj, evaluate_original=lambda: 1.0, source_value=1.0,
                      higher_is_better=False, head_keys=(), make_batch=obj.make_batch)
    prot.check_guard()
    params = list(model.parameters())

    def draw(x, n):
        return obj.make_batch((x[torch.randint(len(x), (n,), generator=g)],), g)

    sup, qry, ntr = draw(data.restricted[0], bs), draw(data.restricted[0], pc.query_batch), draw(data.original[0], pc.ntr_batch)

    def floor_pass() -> None:
        model.train()
        for _ in range(E * K):
            for b in (sup, qry):
                torch.autograd.grad(obj.train_loss(model, b), params)
        torch.autograd.grad(obj.train_loss(model, ntr), params)

    def timed(fn) -> float:
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    rss_setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    floor_pass()  # kernel warm-up
    prot.step()  # untimed warm-up iteration
    its, fls = [], []
    for r in range(spec["repeats"]):
        if r % 2 == 0:
            its.append(timed(prot.step)); fls.append(timed(floor_pass))  # noqa: E702
        else:
            fls.append(timed(floor_pass)); its.append(timed(prot.step))  # noqa: E702
    med = statistics.median
    return {
        **spec, "arch": cfg.arch.name, "params": sum(p.numel() for p in params),
        "batches": [bs, pc.query_batch, pc.ntr_batch], "iteration_s": its, "floor_s": fls,
        "iteration_s_median": med(its), "floor_s_median": med(fls),
        "ratio_median": med(i / f for i, f in zip(its, fls)),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "peak_rss_after_setup_mib": rss_setup, "load1m": os.getloadavg()[0], "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    rows = []
    for envs, k in ((1, 5), (1, 20), (2, 5)):
        spec = {"envs": envs, "inner_steps": k, "repeats": args.repeats, "threads": args.threads}
        print(f"[diffusion_step] E={envs} K={k} (fresh process) ...", file=sys.stderr, flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                             text=True, check=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'setting':<22} {'iter s':>8} {'floor s':>8} {'ratio':>6} {'peak RSS':>10}")
    for r in rows:
        print(f"{r['arch'] + ' E=%d K=%d' % (r['envs'], r['inner_steps']):<22} {r['iteration_s_median']:>8.3f} "
              f"{r['floor_s_median']:>8.3f} {r['ratio_median']:>6.3f} {r['peak_rss_mib']:>6.0f} MiB")
    k5, k20 = rows[0], rows[1]
    print(f"peak RSS K=20 / K=5: {k20['peak_rss_mib'] / k5['peak_rss_mib']:.3f}")
    print(json.dumps({"benchmark": "diffusion_step", "threads": args.threads, "cpus": os.cpu_count(), "rows": rows}))


if __name__ == "__main__":
    main()
