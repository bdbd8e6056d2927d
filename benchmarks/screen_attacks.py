"""Screen a model against a few strong attack recipes in-process (seed 0, one torch thread).

A fast look before a full audit: restricted test accuracy at each budget of the pipeline for
`direct-all sgd 1e-2`, `initFC-all adam 1e-3`, `direct-all adam 1e-3`, `initFC-all adadelta 1.0`
(the first N). Not a verdict: an audit runs many more recipes and seeds against scratch and the
source. Used for the screening table in docs/results.md.

    python benchmarks/screen_attacks.py mnist-to-digits out/m2d/protected [N] [--set k=v ...]
    python benchmarks/screen_attacks.py mnist-to-digits scratch 2
    python benchmarks/screen_attacks.py mnist-to-digits out/m2d/protected --adaptive --set attack.budgets=[10,25,50,100]

`--adaptive` screens with the four recipes that broke the default protection in its audit
(`direct-all adadelta 1`, `direct-all rmsprop 1e-3`, `direct-all adagrad 1e-2`, `initFC-all adadelta 1`).
"""

from __future__ import annotations

import json
import sys
import time

import torch


def main(argv: list[str]) -> None:
    from sophon_ray import tasks
    from sophon_ray.config import Recipe

    torch.set_num_threads(1)  # as in an audit trial
    pipe, model, *rest = argv
    n = int(rest[0]) if rest and not rest[0].startswith("--") else 4
    overrides = [rest[i + 1] for i, a in enumerate(rest) if a == "--set"]
    adaptive = "--adaptive" in rest
    task = tasks.of(tasks.get_pipeline(pipe, overrides=overrides))
    cfg, t = task.cfg, task.load_tensors()
    recipes = [Recipe("direct-all", "sgd", 1e-2, 32), Recipe("initFC-all", "adam", 1e-3, 32),
               Recipe("direct-all", "adam", 1e-3, 32), Recipe("initFC-all", "adadelta", 1.0, 32)][:n]
    if adaptive:
        recipes = [Recipe("direct-all", "adadelta", 1.0, 32), Recipe("direct-all", "rmsprop", 1e-3, 32),
                   Recipe("direct-all", "adagrad", 1e-2, 32), Recipe("initFC-all", "adadelta", 1.0, 32)][:n]
    rows = []
    for r in recipes:
        start = time.perf_counter()
        curve = task.attack(None if model == "scratch" else model, r, seed=0, t=t)
        rows.append({"recipe": f"{r.strategy} {r.optimizer} {r.lr:g}", "curve": curve,
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"{rows[-1]['recipe']:28s} " + " / ".join(f"{v:.3f}" for v in curve.values())
              + f"  ({rows[-1]['seconds']}s)", flush=True)
    print(json.dumps({"pipeline": pipe, "model": model, "budgets": list(cfg.attack.budgets), "rows": rows}))


if __name__ == "__main__":
    main(sys.argv[1:])
