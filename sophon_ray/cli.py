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
    if args.workers not in (0, None) and not args.local:
        raise UserError("distributed protection (--workers N) arrives with the Ray Train layer; use --workers 0 for now")
    out = jobs.protect(cfg, args.source, _out(args, "protected"), log=_log)
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
    p.add_argument("--local", action="store_true", help="in-process (same as --workers 0)")
    p.add_argument("--resume", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_protect)

    p = sub.add_parser("attack", help="one real fine-tuning run on the restricted domain")
    p.add_argument("pipeline")
    p.add_argument("--model", required=True, help="model directory, MLflow URI, or 'scratch'")
    p.add_argument("--recipe", default="", help="k=v,... e.g. strategy=initFC-all,optimizer=adam,lr=1e-3")
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=cmd_attack)

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


if __name__ == "__main__":
    sys.exit(main())
