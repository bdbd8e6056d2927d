"""Batched (vmapped) vs sequential FTS environments, and bf16 / channels-last inner passes, on CPU.

For each model (cnn-small at the digits pipeline's sizes, ResNet-20 width 8 at the MNIST
pipelines' sizes) and E = 1, 2, 4, 8 environments of K inner steps (one support batch size,
optimizer families cycling sgd, momentum, adam, rmsprop, adagrad, adadelta; no head re-init,
no head-only: every environment does the full work), one round times:

- sequential: `first_order_meta_grad` per environment (what protect.py's fts_step runs), and
- batched: `core.batched.meta_grads` with every environment in one vmapped group (at E=1 too,
  forced, to show the vmap overhead; the library itself runs a group of one sequentially),

alternating which goes first, plus (E=1, sequential) fp32 / bf16 autocast / channels-last /
both, rotating the order. Each figure is the median over repeats of paired per-round ratios.
The meta-gradient difference of each variant is ||g - g_fp32|| / ||g_fp32|| on the same inputs.

Usage:
    .venv/bin/python benchmarks/env_batch.py                 # ~5-8 min on a loaded 2-core VM
    .venv/bin/python benchmarks/env_batch.py --quick         # 1 repeat, K=2, E=1,2
Prints a markdown table and writes JSON (default /tmp/vmap/env_batch.json); progress on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

import torch

from sophon_ray.config import ArchSpec, EnvSpace
from sophon_ray.core.batched import Group, Job, meta_grads, plan_batches
from sophon_ray.core.inner import Environment, first_order_meta_grad, sample_environments
from sophon_ray.core.losses import get_loss
from sophon_ray.core.objectives import ClassificationObjective
from sophon_ray.core.protect import LazyBatches
from sophon_ray.models import build_classifier

HEAD = ("head.weight", "head.bias")
FAMILIES = [("sgd", 1e-2), ("momentum", 1e-2), ("adam", 1e-3), ("rmsprop", 1e-4), ("adagrad", 1e-2), ("adadelta", 1.0)]
# (label, arch, kwargs, channels, size, classes, support batch, query batch): the pipelines' sizes.
MODELS = [
    ("cnn-small (digits: 1x16x16, S=32, Q=64)", "cnn-small", {}, 1, 16, 5, 32, 64),
    ("resnet20 w8 (mnist: 1x28x28, S=32, Q=64)", "resnet20", {"width": 8}, 1, 28, 5, 32, 64),
]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _CL:
    """A batch sequence whose images are channels-last (the inner passes' input layout)."""

    def __init__(self, seq):
        self.seq = seq

    def __len__(self):
        return len(self.seq)

    def __getitem__(self, i):
        x, y = self.seq[i]
        return x.contiguous(memory_format=torch.channels_last), y


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.float().flatten() for g in grads.values()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def bench_model(spec, envs_list, K: int, repeats: int, only: tuple[str, ...] = ()) -> dict:
    label, arch, kwargs, c, s, classes, S, Q = spec
    torch.manual_seed(0)
    model = build_classifier(ArchSpec(arch, kwargs), classes, c, s).train()
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(1)
    pool = (torch.randn(512, c, s, s, generator=g), torch.randint(classes, (512,), generator=g))
    obj = ClassificationObjective(get_loss("klu"))
    ident = lambda b, g: b  # noqa: E731

    def jobs(E: int) -> list[Job]:
        out = []
        for i in range(E):
            name, lr = FAMILIES[i % len(FAMILIES)]
            env = Environment(name, lr, S, K, False)
            out.append(Job(env, LazyBatches(pool, S, K, (E, i, 0), ident), LazyBatches(pool, Q, K, (E, i, 1), ident)))
        return out

    def seq(js, cl=False, bf16=False):
        p = {k: (v.detach().contiguous(memory_format=torch.channels_last) if cl and v.dim() == 4 else v) for k, v in params.items()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return [first_order_meta_grad(model, p, j.env, _CL(j.support) if cl else j.support,
                                          _CL(j.query) if cl else j.query, obj, HEAD, j.generator) for j in js]

    def bat(js, bf16=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return meta_grads(model, params, js, obj, HEAD, plan=[Group(tuple(range(len(js))), True, "bench")])

    def timed(fn):
        t = time.perf_counter()
        r = fn()
        return time.perf_counter() - t, r

    js = {E: jobs(E) for E in envs_list}
    variants = {"fp32": dict(), "bf16": dict(bf16=True), "channels_last": dict(cl=True), "bf16+channels_last": dict(cl=True, bf16=True)}
    variants = {k: v for k, v in variants.items() if not only or k in only or k == "fp32"}
    # Accuracy (and warm-up): meta-gradients of each path / variant against sequential fp32.
    ref = {E: seq(js[E]) for E in envs_list}
    acc = {"batched_vs_sequential_fp32": {E: max(_rel(_flat(b[0]), _flat(r[0])) for b, r in zip(bat(js[E]), ref[E])) for E in envs_list}}
    # fp32 error of each path against a float64 run of the same weights and batches (the truth).
    import copy
    E = envs_list[-1]
    m64 = copy.deepcopy(model).double()
    p64 = dict(m64.named_parameters())
    pool64 = (pool[0].double(), pool[1])
    truth = [first_order_meta_grad(m64, p64, j.env, LazyBatches(pool64, S, K, j.support.key, ident),
                                   LazyBatches(pool64, Q, K, j.query.key, ident), obj, HEAD) for j in js[E]]
    acc["fp32_error_vs_fp64_E%d" % E] = {
        "sequential": max(_rel(_flat(a[0]), _flat(t[0])) for a, t in zip(ref[E], truth)),
        "batched": max(_rel(_flat(b[0]), _flat(t[0])) for b, t in zip(bat(js[E]), truth)),
    }
    one = js[envs_list[0]][:1]
    for name, kw in variants.items():
        acc[name] = _rel(_flat(seq(one, **kw)[0][0]), _flat(ref[envs_list[0]][0][0]))
    try:
        if "bf16" not in variants:
            raise RuntimeError("skipped (--variants)")
        acc["batched_bf16_E%d" % envs_list[-1]] = max(_rel(_flat(b[0]), _flat(r[0])) for b, r in zip(bat(js[envs_list[-1]], bf16=True), ref[envs_list[-1]]))
        batched_bf16 = True
    except Exception as e:  # noqa: BLE001 - reported, not hidden
        acc["batched_bf16_error"] = f"{type(e).__name__}: {e}"[:300]
        batched_bf16 = False
    _log(f"[env_batch] {label}: accuracy {acc}")

    times = {E: {"sequential": [], "batched": []} for E in envs_list}
    vt = {name: [] for name in variants}
    bb = []
    for r in range(repeats):
        for E in envs_list:
            order = ["sequential", "batched"] if (r + E) % 2 == 0 else ["batched", "sequential"]
            for path in order:
                t, _ = timed((lambda: seq(js[E])) if path == "sequential" else (lambda: bat(js[E])))
                times[E][path].append(t)
            _log(f"[env_batch] {label} repeat {r + 1}/{repeats} E={E}: sequential {times[E]['sequential'][-1]:.2f} s, "
                 f"batched {times[E]['batched'][-1]:.2f} s")
        names = list(variants)
        names = names[r % len(names):] + names[: r % len(names)]  # rotate the order each round
        for name in names:
            vt[name].append(timed(lambda: seq(one, **variants[name]))[0])
        if batched_bf16:
            E = envs_list[-1]
            bb.append((timed(lambda: bat(js[E], bf16=True))[0], timed(lambda: bat(js[E]))[0]))
        _log(f"[env_batch] {label} repeat {r + 1}/{repeats} variants: " + ", ".join(f"{n} {vt[n][-1]:.2f} s" for n in variants))

    med = statistics.median
    rows = []
    for E in envs_list:
        sq, bt = times[E]["sequential"], times[E]["batched"]
        rows.append({
            "E": E, "sequential_s": sq, "batched_s": bt,
            "sequential_per_env_s": med(sq) / E, "batched_per_env_s": med(bt) / E,
            "ratio_batched_over_sequential": med(b / q for b, q in zip(bt, sq)),
            "grad_rel_diff_batched_vs_sequential": acc["batched_vs_sequential_fp32"][E],
        })
    base = vt["fp32"]
    var_rows = [{"variant": n, "s": vt[n], "median_s": med(vt[n]),
                 "ratio_vs_fp32": med(a / b for a, b in zip(vt[n], base)), "grad_rel_diff_vs_fp32": acc[n]}
                for n in variants]
    out = {"label": label, "arch": arch, "kwargs": kwargs, "input": [c, s, s], "support_batch": S, "query_batch": Q,
           "inner_steps": K, "params": sum(p.numel() for p in params.values()), "rows": rows, "variants": var_rows,
           "accuracy": {k: v for k, v in acc.items()}}
    if bb:
        out["batched_bf16"] = {"E": envs_list[-1], "ratio_vs_batched_fp32": med(a / b for a, b in bb),
                               "grad_rel_diff_vs_sequential_fp32": acc.get("batched_bf16_E%d" % envs_list[-1])}
    return out


def group_stats(envs_per_step: tuple[int, ...], draws: int = 2000) -> list[dict]:
    """With the default EnvSpace, how many of a step's environments land in a batched group."""
    space, rows = EnvSpace(), []
    obj = ClassificationObjective(get_loss("klu"))
    model = torch.nn.Linear(1, 1)  # only the plan is computed: any vmap-safe module
    for E in envs_per_step:
        rng, shared, passes = random.Random(0), 0, 0
        for _ in range(draws):
            envs = sample_environments(E, 1, space.optimizers, space.lr, space.batch_sizes, space.reinit_head_prob, rng,
                                       space.head_only_prob)
            fake = [Job(e, [(torch.empty(e.batch_size),)], [(torch.empty(64),)]) for e in envs]
            plan = plan_batches(model, fake, obj)
            shared += sum(len(g.jobs) for g in plan if g.batched)
            passes += len(plan)
        rows.append({"E": E, "share_of_envs_batched": shared / (E * draws), "mean_groups_per_step": passes / draws})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--envs", default="1,2,4,8")
    p.add_argument("--inner-steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", default="0,1", help="indices into MODELS")
    p.add_argument("--variants", default="", help="comma list of inner-pass variants besides fp32 (default: all)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default="/tmp/vmap/env_batch.json")
    a = p.parse_args(argv)
    if a.quick:
        a.envs, a.inner_steps, a.repeats = "1,2", 2, 1
    torch.set_num_threads(a.threads)
    envs_list = [int(x) for x in a.envs.split(",")]
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    results = [bench_model(MODELS[int(i)], envs_list, a.inner_steps, a.repeats,
                           tuple(x for x in a.variants.split(",") if x)) for i in a.models.split(",")]
    groups = group_stats((2, 4, 8))
    summary = {"benchmark": "env_batch", "argv": sys.argv[1:], "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpus": os.cpu_count(), "python": platform.python_version(), "models": results, "default_env_space_groups": groups,
               "loadavg_1min_start_end": [load0, os.getloadavg()[0]], "total_wall_s": time.perf_counter() - t0}
    os.makedirs(os.path.dirname(a.json) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(summary, f, indent=1)

    print(f"Batched vs sequential FTS environments, K={a.inner_steps}, torch {torch.__version__}, {a.threads} thread(s), "
          f"{a.repeats} repeats, load {load0:.1f}->{os.getloadavg()[0]:.1f}\n")
    print("| model | E | sequential s/env | batched s/env | batched/sequential | grad rel diff |")
    print("|---|---|---|---|---|---|")
    for m in results:
        for r in m["rows"]:
            print(f"| {m['label']} | {r['E']} | {r['sequential_per_env_s']:.3f} | {r['batched_per_env_s']:.3f} | "
                  f"{r['ratio_batched_over_sequential']:.3f}x | {r['grad_rel_diff_batched_vs_sequential']:.1e} |")
    print("\nfp32 meta-gradient error against a float64 run (max over the largest E's environments):")
    for m in results:
        for k, v in m["accuracy"].items():
            if k.startswith("fp32_error_vs_fp64"):
                print(f"- {m['label']}: sequential {v['sequential']:.1e}, batched {v['batched']:.1e}")
    print("\n| model | inner passes (sequential, E=1) | time vs fp32 | meta-grad rel diff vs fp32 |")
    print("|---|---|---|---|")
    for m in results:
        for v in m["variants"]:
            print(f"| {m['label']} | {v['variant']} | {v['ratio_vs_fp32']:.3f}x | {v['grad_rel_diff_vs_fp32']:.1e} |")
        if "batched_bf16" in m:
            b = m["batched_bf16"]
            print(f"| {m['label']} | batched + autocast bf16, E={b['E']} (vs batched fp32; see diff) | {b['ratio_vs_batched_fp32']:.3f}x | "
                  f"{b['grad_rel_diff_vs_sequential_fp32']:.1e} |")
        elif "skipped" not in m["accuracy"].get("batched_bf16_error", "skipped"):
            print(f"| {m['label']} | batched bf16 | failed: {m['accuracy']['batched_bf16_error'][:80]} | |")
    print("\nDefault EnvSpace (3 batch sizes, head-only p=0.25): share of a step's environments that land in a batched group")
    print("| E | share batched | groups per step |")
    print("|---|---|---|")
    for g in groups:
        print(f"| {g['E']} | {g['share_of_envs_batched']:.2f} | {g['mean_groups_per_step']:.2f} |")
    print(f"\ntotal wall {summary['total_wall_s']:.0f} s; JSON: {a.json}")


if __name__ == "__main__":
    main()
