"""`sophon-ray` console script: thin subcommands over the tasks (`sophon_ray.tasks`) and the layers.

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


def _model(ref: str) -> str:
    """A local model directory for a CLI model argument (MLflow `models:/` / `runs:/` URIs are
    downloaded through `tracking.resolve_model`; paths are made absolute)."""
    from sophon_ray.tracking import resolve_model

    return str(resolve_model(ref))


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--out", default=None, help="output directory (default: out/<pipeline>/<stage>)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    p.add_argument("--ray-address", default=None, help="Ray cluster address")
    p.add_argument("--smoke", action="store_true", help="tiny settings for a quick check")
    p.add_argument("--force", action="store_true",
                   help="replace whatever is at --out (default: refuse anything that is not this command's own output)")


def _protect_flags(p: argparse.ArgumentParser, storage: str) -> None:
    """The protection stage's flags of `run` and `harden` (Ray Train workers, registry name, storage)."""
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers for protection (0 = in-process)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray Train worker")
    p.add_argument("--model-name", default=None, help="registered model name (default sophon-<pipeline>)")
    p.add_argument("--storage-path", default=None, help=storage)


def _preset_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=None, metavar="NAME",
                   help="named protection settings put before your --set overrides: 'paper' = the SOPHON "
                        "paper's (ICE, K=50 inner SGD lr 1e-4 with head re-init, Adam 3e-4/5e-4, 1000 iterations); "
                        "'hardened' = the best measured (K=20, loss after every 4th step, 1600 iterations: "
                        "16x the default, ~70 min on 2 cores for mnist-to-digits)")


def parse_recipe(text: str) -> Any:
    """`strategy=initFC-all,optimizer=adam,lr=1e-3` -> Recipe (unknown keys are an error)."""
    from sophon_ray.config import Recipe, apply_overrides

    items = [s.strip() for s in text.split(",") if s.strip()]
    return apply_overrides(Recipe(), items)


def _out(args: argparse.Namespace, stage: str, kind: str = "model") -> Path:
    """The output path, claimed before any work: refused (exit 2) when it holds anything that is not
    this kind of sophon-ray output (unless --force) or is not writable."""
    from sophon_ray.outputs import claim

    path = Path(args.out) if args.out else Path("out") / _name(args.pipeline) / stage
    return claim(path, kind, force=args.force)


def _name(pipeline: str) -> str:
    """A pipeline argument as a folder name: the name, or a pipeline file's stem."""
    from sophon_ray.pipelines import is_file_ref

    return Path(pipeline).stem if is_file_ref(pipeline) else pipeline


def _standard(pipeline: str) -> Any:
    """The pipeline as written (no --smoke, no --set): its largest budget is what a certifying
    audit must reach, whatever --budgets or --set attack.budgets=... / name=... the audit ran with."""
    from sophon_ray.pipelines import load

    return load(pipeline, smoke=False)


def cmd_pipelines(args: argparse.Namespace) -> int:
    from sophon_ray.pipelines import PIPELINES, describe_domains

    if args.show:
        import yaml

        from sophon_ray import tasks
        from sophon_ray.config import to_dict

        cfg = tasks.get_pipeline(args.show, args.smoke, args.overrides)
        print("# resolved domains (a domain a pipeline file gives replaces its base's whole):")
        print("".join(f"#   {line}\n" for line in describe_domains(cfg)), end="")
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    for name, mod in PIPELINES.items():
        print(f"{name:20s} {mod.get_config().description}")
    print("(or a pipeline file: sophon-ray run ./my_pipeline.yaml; see `sophon-ray pipelines --show NAME|PATH`)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """A model directory (role source) from weights the user brings, for a pipeline's arch."""
    from sophon_ray import tasks
    from sophon_ray.app import tracked

    cfg = tasks.get_pipeline(args.pipeline, args.smoke, args.overrides)
    out = tracked.import_model(cfg, args.weights, _out(args, "source"), log=_log, new_head=args.new_head)
    print(out)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from sophon_ray import tasks
    from sophon_ray.app import tracked

    cfg = tasks.get_pipeline(args.pipeline, args.smoke, args.overrides)
    out = tracked.pretrain(cfg, _out(args, "source"), log=_log)
    print(out)
    return 0


def cmd_protect(args: argparse.Namespace) -> int:
    from sophon_ray import tasks
    from sophon_ray.app import tracked

    cfg = tasks.get_pipeline(args.pipeline, args.smoke, args.overrides)
    if args.workers < 0:
        raise UserError("--workers must be >= 0 (0 = in-process)")
    workers = 0 if args.local else args.workers
    if args.resume and workers == 0:
        raise UserError("--resume continues a Ray Train run; pass --workers 1 or more (in-process runs cannot resume)")
    if args.cpus_per_worker < 1:
        raise UserError(f"--cpus-per-worker {args.cpus_per_worker}: need at least 1")
    if args.gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker {args.gpus_per_worker}: must be >= 0")
    extra = {}
    if workers:
        extra = dict(gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                     ray_address=args.ray_address, storage_path=args.storage_path, resume=args.resume,
                     verbose=args.verbose)
    start = _model(args.start) if args.start else None
    if start is not None:
        from sophon_ray.modeldir import read_card

        read_card(start)  # refuse a --start that is not a model before any work
    out, _ = tracked.protect(cfg, _model(args.source), _out(args, "protected"), log=_log, model_name=args.model_name,
                             workers=workers, source_ref=args.source, start=start, **extra)
    print(out)
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from sophon_ray import tasks
    from sophon_ray.outputs import write_json_atomic

    cfg = tasks.get_pipeline(args.pipeline, args.smoke, args.overrides)
    task = tasks.of(cfg)
    recipe = parse_recipe(args.recipe) if args.recipe else task.default_recipe
    task.validate_recipe(recipe)
    out = _out(args, "attack", "attack") if args.out else None
    model = None if args.model == "scratch" else _model(args.model)
    curve = task.attack(model, recipe, seed=args.seed)
    metric = task.metric.name
    result = {"model": args.model, "recipe": dataclasses.asdict(recipe), "seed": args.seed, "metric": metric,
              "curve": {str(k): v for k, v in curve.items()}}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "attack.json", result)
    for b, v in curve.items():
        print(f"{b:6d} steps  restricted {metric} {v:.4f}")
    return 0


def _audit_flags(p: argparse.ArgumentParser, seeds: int, suite_default: str) -> None:
    """The audit's flags, shared by `audit` and `run` (only the defaults differ)."""
    p.add_argument("--suite", default=None, help=f"named attack suite (default: {suite_default}); "
                   "with --search, the recipes the search starts from")
    p.add_argument("--search", type=int, default=None, metavar="N", help="adversarial hyper-parameter search with N trials")
    p.add_argument("--concurrency", type=int, default=None, help="max concurrent trials (default: all CPUs)")
    p.add_argument("--seeds", type=int, default=seeds, help="seeds for re-running the best recipes at full budget")
    p.add_argument("--epsilon", type=float, default=None,
                   help="allowed attacker advantage over scratch (default 0.02 accuracy, 0.005 MSE)")
    p.add_argument("--min-gap", type=float, default=None,
                   help="power the control needs: the source must beat scratch by this much at some budget for a "
                        "'passed' verdict (default attack.min_gap, else 0.10 accuracy, 0.025 MSE)")
    p.add_argument("--strict", action="store_true", help="exit 1 unless the verdict is passed (failed or inconclusive)")
    p.add_argument("--no-samples", action="store_true", help="diffusion: skip the sample grids and judge metric")


def _rounds_flags(p: argparse.ArgumentParser, required: bool) -> None:
    """The hardening loop's flags, shared by `harden` and `run`."""
    p.add_argument("--rounds", type=int, default=None, metavar="N",
                   help="hardening rounds (protect, audit, feed the strongest attacks back); stops early at a passed audit"
                   + ("" if required else "; without it, one plain protect + audit"))
    p.add_argument("--feedback", type=int, default=3, metavar="K",
                   help="with --rounds: the strongest audit recipes fed back into the next round's protection (default 3)")


def _budgets(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise UserError(f"--budgets {text!r}: expected increasing positive integers like 25,50,100") from None


def cmd_audit(args: argparse.Namespace) -> int:
    from sophon_ray import tasks
    from sophon_ray.app import tracked
    from sophon_ray.audit.driver import check_thresholds
    from sophon_ray.outputs import claim

    cfg = tasks.get_pipeline(args.pipeline, args.smoke, args.overrides)
    check_thresholds(cfg, args.epsilon, args.min_gap)
    if args.reruns < 0:
        raise UserError(f"--reruns {args.reruns}: must be >= 0 (0 = each recipe once)")
    out = _out(args, "audit", "audit")
    judge = claim(args.judge, "model", force=args.force, flag="--judge") if args.judge else out / "judge"
    result = tracked.audit(
        cfg, _model(args.model), out, _log, suite=args.suite, search=args.search,
        budgets=_budgets(args.budgets), concurrency=args.concurrency, seeds=args.seeds,
        epsilon=args.epsilon, min_gap=args.min_gap, ray_address=args.ray_address, samples=not args.no_samples,
        judge_dir=str(judge), smoke=args.smoke, model_ref=args.model, standard_cfg=_standard(args.pipeline),
        top_k=args.reruns,
    )
    return 1 if args.strict and not result["verdict"]["passed"] else 0


def cmd_run(args: argparse.Namespace) -> int:
    from sophon_ray import tasks
    from sophon_ray.app.workflow import run_pipeline
    from sophon_ray.audit.driver import check_audit_flags, check_thresholds, run_suite
    from sophon_ray.audit.verdict import audit_table, headline, meaning
    from sophon_ray.outputs import claim_run
    from sophon_ray.tracking import resolve_uri

    cfg = tasks.get_pipeline(args.pipeline, args.smoke, args.overrides)
    task = tasks.of(cfg)
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: must be >= 0 (0 = in-process)")
    check_thresholds(cfg, args.epsilon, args.min_gap)
    _check_rounds(args)
    suite = run_suite(task, args.suite, args.search, args.smoke)
    check_audit_flags(cfg, suite=suite, search=args.search, seeds=args.seeds, smoke=args.smoke)  # before anything is claimed
    root = claim_run(Path(args.out) if args.out else Path("out") / _name(args.pipeline), force=args.force)
    summary = run_pipeline(
        cfg, root, workers=args.workers, source=_model(args.source) if args.source else None, search=args.search, min_gap=args.min_gap, smoke=args.smoke,
        suite=suite,
        seeds=args.seeds, concurrency=args.concurrency, epsilon=args.epsilon, model_name=args.model_name,
        ray_address=args.ray_address, storage_path=args.storage_path, gpus_per_worker=args.gpus_per_worker,
        verbose=args.verbose, log=_log, samples=not args.no_samples, standard_cfg=_standard(args.pipeline),
        rounds=args.rounds, feedback=args.feedback, force=args.force, paper=args.paper,
    )
    audit, metrics, v = summary["audit"], summary["metrics"], summary["audit"]["verdict"]
    m = task.metric
    print(f"\nBest ({m.superlative}) restricted test {m.name} an attacker reached (worst case over all recipes):")
    print(audit_table(audit))
    key = f"original_test_{m.name}"
    print(f"\noriginal-domain test {m.name}: source {metrics[f'source_{key}']:.4f}, protected {metrics[key]:.4f}")
    print(headline(v))
    if summary.get("harden"):
        _print_rounds(summary["harden"], audit)
    if summary.get("paper_audit"):
        _print_paper(audit, summary["paper_audit"], m.digits)
    else:
        print(meaning(audit, f"The audit ({(audit.get('protocol') or {}).get('suite', 'this run')})"))
    if v.get("status") == "inconclusive" and cfg.name == "digits":
        print("  a benchmark where pre-training matters: sophon-ray run mnist-to-digits-demo --paper (make demo), "
              "or mnist-to-digits (docs/results.md)")
    times = "  ".join(f"{k} {t:.0f}s" for k, t in summary["times"].items())
    print(f"stages: {times}  total {summary['wall']:.0f}s")
    print(f"report: {summary['paths']['audit'] / 'report.html'}")
    if summary["paths"].get("paper_audit"):
        print(f"paper-v1 report: {summary['paths']['paper_audit'] / 'report.html'}")
    uri = resolve_uri(None)
    if uri.startswith("sqlite:///"):
        artifacts = Path(uri[len("sqlite:///"):]).parent / "artifacts"
        print(f"look at it: mlflow ui --backend-store-uri {uri} --artifacts-destination {artifacts} --host 127.0.0.1")
    else:
        print(f"look at it: {uri}")
    return 1 if args.strict and not v["passed"] else 0


def _print_paper(audit: dict[str, Any], paper: dict[str, Any], digits: int) -> None:
    """`run --paper`'s side-by-side table of the full audit and the paper's protocol, and what each
    verdict means."""
    from sophon_ray.audit.verdict import meaning, side_by_side

    full, pp = ((a.get("protocol") or {}).get("suite", "?") for a in (audit, paper))
    n_full, n_paper = (len({str(t["recipe"]) for t in a["trials"]}) for a in (audit, paper))
    data = [(a.get("protocol") or {}).get("attacker_data", "?") for a in (audit, paper)]
    print(f"\nSide by side, the same protected model: the full audit ({full}: {n_full} recipes, {data[0]}) and the "
          f"SOPHON paper's protocol ({pp}: {n_paper} gentle recipes, {data[1]}); best restricted value an attacker "
          "reached per budget:")
    print(side_by_side([(full, audit), (pp, paper)], digits))
    print("\nWhat the verdicts mean:")
    print(f"- {meaning(audit, f'The full audit ({full})')}")
    print(f"- {meaning(paper, f'The paper protocol ({pp})')} A {pp} audit never certifies (gentle recipes, fewer "
          "than the certifying minimum), whatever its status.")


def _check_rounds(args: argparse.Namespace) -> None:
    if args.rounds is not None and args.rounds < 1:
        raise UserError(f"--rounds {args.rounds}: need at least 1 round")
    if args.feedback < 1:
        raise UserError(f"--feedback {args.feedback}: feed back at least 1 recipe per round")


def _print_rounds(summary: dict[str, Any], audit: dict[str, Any]) -> None:
    from sophon_ray.audit.rounds import removed_table
    from sophon_ray.tasks.base import unit_of

    print(f"\nHardening rounds ({summary['done'] or 'stopped'}; removed = share of the source's advantage over scratch "
          "taken away, per budget):")
    print(removed_table(summary["rounds"], [int(b) for b in audit["budgets"]], unit_of(audit)))
    print(f"rounds: {summary['state']}  plot: {summary['plot']}")


def cmd_harden(args: argparse.Namespace) -> int:
    """The hardening loop: protect (Ray Train) from the last round's weights with the last audits'
    strongest recipes fed back, audit (Ray Tune), until `passed` or --rounds rounds."""
    from sophon_ray import tasks
    from sophon_ray.app.harden import harden
    from sophon_ray.audit.driver import check_audit_flags, check_thresholds, run_suite
    from sophon_ray.audit.verdict import audit_table, headline

    cfg = tasks.get_pipeline(args.pipeline, args.smoke, args.overrides)
    task = tasks.of(cfg)
    if args.workers < 0:
        raise UserError(f"--workers {args.workers}: must be >= 0 (0 = in-process)")
    if args.rounds is None:
        raise UserError("harden needs --rounds N (the most rounds to run; it stops earlier at a passed audit)")
    _check_rounds(args)
    check_thresholds(cfg, args.epsilon, args.min_gap)
    suite = run_suite(task, args.suite, args.search, args.smoke)
    check_audit_flags(cfg, suite=suite, search=args.search, seeds=args.seeds, smoke=args.smoke)  # before anything is claimed
    source, start = _model(args.source), _model(args.start) if args.start else None
    if start is not None:
        from sophon_ray.app.harden import check_start
        from sophon_ray.modeldir import read_card

        check_start(task, read_card(source), Path(start))
    root = _out(args, "harden", "harden")
    summary = harden(
        cfg, root, source=source, start=start, rounds=args.rounds, feedback=args.feedback, workers=args.workers,
        suite=suite, search=args.search, seeds=args.seeds, concurrency=args.concurrency, epsilon=args.epsilon,
        min_gap=args.min_gap, smoke=args.smoke, samples=not args.no_samples, model_name=args.model_name,
        ray_address=args.ray_address, storage_path=args.storage_path, gpus_per_worker=args.gpus_per_worker,
        verbose=args.verbose, force=args.force, standard_cfg=_standard(args.pipeline), log=_log,
    )
    audit, v, m = summary["audit"], summary["audit"]["verdict"], task.metric
    print(f"\nLast round: best ({m.superlative}) restricted test {m.name} an attacker reached:")
    print(audit_table(audit))
    print(headline(v))
    _print_rounds(summary, audit)
    print(f"last model: {summary['protected']}  report: {summary['audit_dir'] / 'report.html'}")
    return 1 if args.strict and not v["passed"] else 0


def cmd_samples(args: argparse.Namespace) -> int:
    """Sample grids and the judge metric of a diffusion model before/after an attack (samples.json)."""
    from sophon_ray import tasks
    from sophon_ray.modeldir import read_card

    cfg = tasks.get_pipeline(args.pipeline, args.smoke, args.overrides)
    task = tasks.of(cfg)
    if not task.has_samples:
        raise UserError(f"samples needs a diffusion pipeline; {cfg.name!r} is a {cfg.kind} (try digits-diffusion)")
    from sophon_ray.config import Recipe
    from sophon_ray.tasks.diffusion.samples import attack_steps, sample_report, strongest_trial

    recipe = parse_recipe(args.recipe) if args.recipe else task.default_recipe
    length = None  # (optimizer steps, the audit's budget in words) of the audit's largest budget
    if args.audit:
        path = Path(args.audit)
        if not path.is_file():
            raise UserError(f"--audit {path}: no such file; pass the audit.json of a diffusion audit")
        audit = json.loads(path.read_text())
        trial = strongest_trial(audit)
        recipe = Recipe(**trial["recipe"]) if trial else recipe
        length = attack_steps(audit, trial) if trial else None
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps {args.steps}: need at least 1 attack step")
    model = _model(args.model)
    subjects: dict[str, Any] = {"protected": model, "scratch": None}
    src = ((read_card(model).get("lineage") or {}).get("source") or {}).get("path")
    if src and Path(src).is_dir():
        subjects["original"] = src
    from sophon_ray.outputs import claim

    out = _out(args, "samples", "samples")
    judge = claim(args.judge, "model", force=args.force, flag="--judge") if args.judge else out / "judge"
    result = sample_report(task, subjects, out, recipe, steps=args.steps or (length[0] if length else None),
                           budget=None if args.steps or not length else length[1], judge_dir=judge, log=_log)
    for name, row in result["subjects"].items():
        rec = {w: row[w]["recognised"] for w in ("before", "after") if w in row}
        rej = {w: row[w].get("rejected") for w in ("before", "after") if w in row}
        print(f"{name:10s} restricted MSE after {result['steps']} steps {row['restricted_test_mse']}, recognised {rec}, "
              f"rejected as no digit {rej}")
    print(out / "samples.json")
    return 0


def cmd_registry(args: argparse.Namespace) -> int:
    from sophon_ray import tracking

    if args.action == "list":
        print(tracking.format_table(tracking.list_models()))
    elif args.action == "show":
        if not args.ref:
            raise UserError("registry show needs NAME, NAME@ALIAS or NAME/VERSION")
        print(tracking.format_table(tracking.version_rows(tracking.show(args.ref[0]))))
    else:
        if len(args.ref) != 3:
            raise UserError("registry promote needs NAME VERSION ALIAS")
        name, version, alias = args.ref
        tracking.promote(name, version, alias)
        print(f"{name} version {version} -> alias {alias}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sophon-ray", description="Make pre-trained models non-fine-tunable (SOPHON) and prove it.")
    parser.add_argument("--verbose", action="store_true", help="show full tracebacks and library noise")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pipelines", help="list ready pipelines, or --show one's resolved config")
    p.add_argument("--show", default=None, metavar="NAME|PATH", help="print the resolved config (YAML) of a pipeline")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="with --show: override a config field (repeatable)")
    p.add_argument("--smoke", action="store_true", help="with --show: the smoke settings")
    _preset_flag(p)
    p.set_defaults(func=cmd_pipelines)

    p = sub.add_parser("import", help="make a source model directory from your own weights (safetensors, "
                                      "weights-only .pt, or a diffusers UNet2DModel folder)")
    p.add_argument("pipeline", help="pipeline name or file whose arch and input the weights are for")
    p.add_argument("--weights", required=True, help="a .safetensors / .pt state dict, or a diffusers UNet folder")
    p.add_argument("--new-head", action="store_true",
                   help="re-initialise the classifier head (weights made for another class count)")
    _common(p)
    p.set_defaults(func=cmd_import)

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
    p.add_argument("--start", default=None, metavar="MODEL",
                   help="start from this protected model's weights instead of the source's (more compute on a "
                        "finished protection); the source stays the teacher, the guard's reference and the audit's control")
    p.add_argument("--storage-path", default=None, help="Ray Train storage (shared NFS/S3 on a real cluster)")
    p.add_argument("--model-name", default=None, help="registered model name (default sophon-<pipeline>)")
    _preset_flag(p)
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
    _audit_flags(p, seeds=3, suite_default="default-v1; diffusion-v2 for diffusion")
    p.add_argument("--budgets", default=None, help="comma-separated increasing step budgets, e.g. 25,50,100,200,400")
    p.add_argument("--judge", default=None, help="diffusion: judge classifier cache dir (default <out>/judge)")
    p.add_argument("--reruns", type=int, default=3, metavar="K",
                   help="re-run the K best recipes per ranking subject with --seeds more seeds (default 3; 0: each "
                        "recipe once, which records 1 seed and so never certifies)")
    _common(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("run", help="pretrain -> protect (Ray Train) -> audit (Ray Tune) -> register -> report")
    p.add_argument("pipeline")
    _audit_flags(p, seeds=2, suite_default="quick-v3, test-v1 with --smoke; "
                 "diffusion: diffusion-v2, diffusion-test-v1 with --smoke")
    _protect_flags(p, storage="Ray Train storage (shared NFS/S3 on a real cluster)")
    p.add_argument("--source", default=None, help="protect this model (directory or MLflow URI) instead of pretraining one")
    p.add_argument("--paper", action="store_true",
                   help="then audit the protected model with the SOPHON paper's protocol too (suite paper-v1, in "
                        "<out>/audit-paper; never certifies) and print both audits side by side")
    _rounds_flags(p, required=False)
    _preset_flag(p)
    _common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("harden", help="hardening loop: protect (Ray Train) from the last round's weights with the "
                                      "last audits' strongest attacks fed back, audit (Ray Tune), repeat")
    p.add_argument("pipeline")
    p.add_argument("--source", required=True, help="the unprotected source model (directory or MLflow URI)")
    p.add_argument("--start", default=None, metavar="MODEL",
                   help="harden this model protected from --source (e.g. one scaled up with `protect --start`): "
                        "round 0 audits it, round 1 protects from its weights with round 0's strongest attacks")
    _rounds_flags(p, required=True)
    _audit_flags(p, seeds=2, suite_default="quick-v3, test-v1 with --smoke; "
                 "diffusion: diffusion-v2, diffusion-test-v1 with --smoke")
    _protect_flags(p, storage="Ray Train storage (default <out>/.ray; shared NFS/S3 on a cluster)")
    _preset_flag(p)
    _common(p)
    p.set_defaults(func=cmd_harden)

    p = sub.add_parser("samples", help="diffusion: sample grids + judge metric before/after an attack")
    p.add_argument("pipeline")
    p.add_argument("--model", required=True, help="protected model directory (its source is the 'original' subject)")
    p.add_argument("--recipe", default="", help="attack recipe k=v,... (default strategy=all,optimizer=adam,lr=1e-3,batch_size=16)")
    p.add_argument("--audit", default=None, help="audit.json: use its strongest recipe against the protected model")
    p.add_argument("--steps", type=int, default=None, help="attack steps (default: the largest budget)")
    p.add_argument("--judge", default=None, help="judge classifier cache dir (default <out>/judge)")
    _common(p)
    p.set_defaults(func=cmd_samples)

    p = sub.add_parser("registry", help="MLflow model registry: list | show NAME[@ALIAS] | promote NAME VERSION ALIAS")
    p.add_argument("action", choices=["list", "show", "promote"])
    p.add_argument("ref", nargs="*")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    p.set_defaults(func=cmd_registry)

    return parser


def main(argv: list[str] | None = None) -> int:
    from sophon_ray.runtime import interrupts, ray_local

    interrupts.install()  # Ctrl-C / SIGTERM: stop cleanly, exit 130 / 143, write no verdict
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "ray_address", None) and not os.environ.get("RAY_ADDRESS"):
        ray_local.loopback_env()  # before Ray is imported: a local instance listens on 127.0.0.1 only
    try:
        if getattr(args, "tracking_uri", None):
            from sophon_ray.tracking.store import resolve_uri

            # one resolved URI for this process, its Ray workers and MLflow's own helpers
            os.environ["MLFLOW_TRACKING_URI"] = resolve_uri(args.tracking_uri)
        if getattr(args, "preset", None):
            from sophon_ray.config import preset_overrides

            args.overrides = [*preset_overrides(args.preset), *args.overrides]  # the user's --set wins
        return int(args.func(args) or 0)
    except UserError as e:
        if args.verbose:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        code = interrupts.exit_code(e)
        print(f"interrupted ({'SIGTERM' if code == 143 else 'Ctrl-C'}): stopped; no verdict written", file=sys.stderr)
        return code
    except Exception as e:  # the work ran and failed: say so briefly, exit 1
        if args.verbose:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"failed: {type(e).__name__}: {first} (run with --verbose for the full traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
