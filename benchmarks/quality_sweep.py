"""Protection-quality sweep on digits: protect in-process with config overrides, then attack.

    .venv/bin/python benchmarks/quality_sweep.py NAME [--set key.path=value ...] [--out DIR]

Used to choose the digits protection settings (docs/results.md, "How the settings were
chosen"). The source model is pretrained once into `DIR/source`; the scratch reference (every
recipe of suites default-v1 + quick-v1, 51 distinct, on a random init with seeds 0 and 1,
budgets 10/25/50/100) is computed once into `DIR/scratch.json`. Each call protects the source
in-process (1 torch thread) with the overrides, attacks the protected model with the same 102
runs, and appends one JSON line to `DIR/results.jsonl`: best protected accuracy per budget, the
same for scratch, their difference (the verdict's margin), the mean over runs, and the worst
recipes. This is the serial core path (no Ray): the audit of record is `sophon-ray audit`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

BUDGETS = (10, 25, 50, 100)
SEEDS = (0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default="out/quality-sweep")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from sophon_ray import modeldir, tasks
    from sophon_ray.config import recipe_label
    from sophon_ray.tasks.classifier.suites import DEFAULT_V1, QUICK_V1
    from sophon_ray.core import run

    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    cfg = tasks.get_pipeline("digits", overrides=[f"attack.budgets={list(BUDGETS)}", *args.set])
    task = tasks.of(cfg)
    t = task.load_tensors()
    src = root / "source"
    if not src.exists():
        task.pretrain(src, log=lambda s: None)
    recipes = list(dict.fromkeys(DEFAULT_V1 + QUICK_V1))

    def curves(model_src: Path | None) -> dict[str, dict[int, float]]:
        return {f"{recipe_label(r)}|{s}": task.attack(model_src, r, seed=s, t=t) for r in recipes for s in SEEDS}

    def best(c: dict[str, dict[int, float]]) -> dict[int, float]:
        return {b: max(v[b] for v in c.values()) for b in BUDGETS}

    ref = root / "scratch.json"
    if not ref.exists():
        ref.write_text(json.dumps(curves(None)))
    scratch = {k: {int(b): v for b, v in d.items()} for k, d in json.loads(ref.read_text()).items()}
    start = time.perf_counter()
    model, _ = task.load_for(src, t)
    source_acc = task.original_metric(model, t)
    prot = task.build_protection(model, t, source_acc)
    run(prot, lambda it, m: print(args.name, it, {k: round(v, 3) for k, v in m.items()}, flush=True)
        if it % 25 == 0 else None)
    seconds = time.perf_counter() - start
    out = root / args.name
    shutil.rmtree(out, ignore_errors=True)
    modeldir.save_model_dir(out, model, task.make_card(t, "protected", {}), {})
    pc = curves(out)
    (root / f"{args.name}.curves.json").write_text(json.dumps(pc))  # per run, e.g. for per-suite margins
    pb, sb = best(pc), best(scratch)
    res = {
        "name": args.name, "overrides": args.set, "protect_s": round(seconds), "orig": task.original_metric(model, t),
        "source_orig": source_acc, "rollbacks": prot.guard.rollbacks, "protected": pb, "scratch": sb,
        "margin": {b: round(pb[b] - sb[b], 3) for b in BUDGETS},
        "mean": {b: round(sum(v[b] for v in pc.values()) / len(pc), 3) for b in BUDGETS},
        "scratch_mean": {b: round(sum(v[b] for v in scratch.values()) / len(scratch), 3) for b in BUDGETS},
        "worst": {b: sorted(((v[b], k) for k, v in pc.items()), reverse=True)[:4] for b in (10, 25)},
    }
    print(f"{'budget':>6} {'protected':>9} {'scratch':>8} {'margin':>7}")
    for b in BUDGETS:
        print(f"{b:>6} {pb[b]:>9.3f} {sb[b]:>8.3f} {pb[b] - sb[b]:>+7.3f}")
    with (root / "results.jsonl").open("a") as f:
        f.write(json.dumps(res) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
