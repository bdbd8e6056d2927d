"""`sophon-ray` console script: thin subcommands over `sophon_ray.jobs` and the layers.

Exit codes: 0 success, 1 the work ran and failed (e.g. a failed verdict with --strict),
2 bad input (one line on stderr naming what to fix).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from sophon_ray.errors import UserError


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--out", default=None, help="output directory (default: out/<pipeline>/<stage>)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    p.add_argument("--ray-address", default=None, help="Ray cluster address")
    p.add_argument("--smoke", action="store_true", help="tiny settings for a quick check")


def parse_recipe(text: str) -> Any:
    """`strategy=initFC-all,optimizer=adam,lr=1e-3` -> Recipe (unknown keys are an error)."""
    from sophon_ray.config import Recipe, apply_overrides

    items = [s.strip() for s in text.split(",") if s.strip()]
    return apply_overrides(Recipe(), items)


def _out(args: argparse.Namespace, stage: str) -> Path:
    return Path(args.out) if args.out else Path("out") / args.pipeline / stage


def cmd_pipelines(args: argparse.Namespace) -> int:
    from pipelines import PIPELINES

    for name, mod in PIPELINES.items():
        print(f"{name:20s} {mod.get_config().description}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from sophon_ray import jobs

    cfg = jobs.get_pipeline(args.pipeline, args.smoke, args.overrides)
    out = jobs.pretrain(cfg, _out(args, "source"), log=_log)
    print(out)
    return 0


def cmd_protect(args: argparse.Namespace) -> int:
    from sophon_ray import jobs

    cfg = jobs.get_pipeline(args.pipeline, args.smoke, args.overrides)
    if args.workers < 0:
        raise UserError("--workers must be >= 0 (0 = in-process)")
    if args.workers == 0 or args.local:
        out = jobs.protect(cfg, args.source, _out(args, "protected"), log=_log)
    else:
        from sophon_ray.train.driver import protect_distributed

        out = protect_distributed(
            cfg, args.source, _out(args, "protected"), workers=args.workers, gpus_per_worker=args.gpus_per_worker,
            cpus_per_worker=args.cpus_per_worker, ray_address=args.ray_address, storage_path=args.storage_path,
            resume=args.resume, verbose=args.verbose, log=_log,
        )
    print(out)
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from sophon_ray import jobs
    from sophon_ray.card import write_json_atomic

    cfg = jobs.get_pipeline(args.pipeline, args.smoke, args.overrides)
    recipe = parse_recipe(args.recipe)
    model = None if args.model == "scratch" else args.model
    curve = jobs.attack(cfg, model, recipe, seed=args.seed)
    result = {"model": args.model, "recipe": dataclasses.asdict(recipe), "seed": args.seed,
              "curve": {str(k): v for k, v in curve.items()}}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json_atomic(Path(args.out) / "attack.json", result)
    for b, v in curve.items():
        print(f"{b:6d} steps  restricted accuracy {v:.4f}")
    return 0


def _budgets(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise UserError(f"--budgets {text!r}: expected increasing positive integers like 25,50,100") from None


def cmd_audit(args: argparse.Namespace) -> int:
    from sophon_ray import jobs
    from sophon_ray.audit.driver import run_audit

    cfg = jobs.get_pipeline(args.pipeline, args.smoke, args.overrides)
    result = run_audit(
        cfg, args.model, out=_out(args, "audit"), suite=args.suite, search=args.search,
        budgets=_budgets(args.budgets), concurrency=args.concurrency, seeds=args.seeds,
        epsilon=args.epsilon, ray_address=args.ray_address, log=_log,
    )
    return 1 if args.strict and not result["verdict"]["passed"] else 0


def cmd_run(args: argparse.Namespace) -> int:
    from sophon_ray import jobs
    from sophon_ray.audit.local import compare, table
    from sophon_ray.audit.suites import get_suite
    from sophon_ray.audit.verdict import verdict, worst_case
    from sophon_ray.card import write_json_atomic

    cfg = jobs.get_pipeline(args.pipeline, args.smoke, args.overrides)
    recipes = get_suite(args.suite)
    root = Path(args.out) if args.out else Path("out") / cfg.name
    source = jobs.pretrain(cfg, root / "source", log=_log)
    protected = jobs.protect(cfg, source, root / "protected", log=_log)
    trials = compare(cfg, {"protected": protected, "scratch": None, "original": source}, recipes, log=_log)
    worst = worst_case(trials, "max")
    result = verdict(worst, args.epsilon, "max")
    metrics = json.loads((protected / "metrics.json").read_text())
    write_json_atomic(root / "comparison.json", {
        "pipeline": cfg.name, "suite": args.suite, "budgets": list(cfg.attack.budgets), "trials": trials,
        "worst_case": worst, "verdict": result, "protected_metrics": metrics,
    })
    print(f"\nBest restricted test accuracy an attacker reached ({len(recipes)} recipes, suite {args.suite}):")
    print(table(worst, cfg.attack.budgets))
    print(f"\noriginal-domain test accuracy: source {metrics['source_original_test_accuracy']:.3f}, "
          f"protected {metrics['original_test_accuracy']:.3f}")
    status = "PASSED" if result["passed"] else "FAILED"
    print(f"verdict: {status} (margin {result['margin']:+.3f} vs epsilon {args.epsilon})  -> {root / 'comparison.json'}")
    return 1 if args.strict and not result["passed"] else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sophon-ray", description="Make pre-trained models non-fine-tunable (SOPHON) and prove it.")
    parser.add_argument("--verbose", action="store_true", help="show full tracebacks and library noise")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipelines", help="list ready pipelines")
    p.set_defaults(func=cmd_pipelines)

    p = sub.add_parser("pretrain", help="train the unprotected source model on the original domain")
    p.add_argument("pipeline")
    _common(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("protect", help="run SOPHON on a source model")
    p.add_argument("pipeline")
    p.add_argument("--source", required=True, help="source model directory or MLflow URI")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--cpus-per-worker", type=int, default=1, help="CPUs (and torch threads) per Ray Train worker")
    p.add_argument("--local", action="store_true", help="in-process (same as --workers 0)")
    p.add_argument("--resume", action="store_true", help="continue a stopped Ray Train run from its last checkpoint")
    p.add_argument("--storage-path", default=None, help="Ray Train storage (shared NFS/S3 on a real cluster)")
    _common(p)
    p.set_defaults(func=cmd_protect)

    p = sub.add_parser("attack", help="one real fine-tuning run on the restricted domain")
    p.add_argument("pipeline")
    p.add_argument("--model", required=True, help="model directory, MLflow URI, or 'scratch'")
    p.add_argument("--recipe", default="", help="k=v,... e.g. strategy=initFC-all,optimizer=adam,lr=1e-3")
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=cmd_attack)

    p = sub.add_parser("audit", help="robustness audit on Ray Tune: many real attacks vs scratch and original")
    p.add_argument("pipeline")
    p.add_argument("--model", required=True, help="protected model directory or MLflow URI")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--suite", default=None, help="named attack suite (default: default-v1)")
    group.add_argument("--search", type=int, default=None, metavar="N", help="adversarial hyper-parameter search with N trials")
    p.add_argument("--budgets", default=None, help="comma-separated increasing step budgets, e.g. 25,50,100,200,400")
    p.add_argument("--concurrency", type=int, default=None, help="max concurrent trials (default: all CPUs)")
    p.add_argument("--seeds", type=int, default=3, help="seeds for re-running the best recipes at full budget")
    p.add_argument("--epsilon", type=float, default=0.02, help="allowed attacker advantage over scratch")
    p.add_argument("--strict", action="store_true", help="exit 1 when the verdict fails")
    _common(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("run", help="pretrain -> protect -> attack comparison -> summary")
    p.add_argument("pipeline")
    p.add_argument("--suite", default="quick-v1")
    p.add_argument("--epsilon", type=float, default=0.02, help="allowed attacker advantage over scratch")
    p.add_argument("--strict", action="store_true", help="exit 1 when the verdict fails")
    _common(p)
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "tracking_uri") and args.tracking_uri:
        os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the work ran and failed: say so briefly, exit 1
        if args.verbose:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"failed: {type(e).__name__}: {first} (run with --verbose for the full traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
