"""Ray Tune driver of the robustness audit: validate, plan, run all trials in one Tuner, verdict.

`run_audit` checks every input before Ray starts and before anything is written, then runs
one Tuner whose `AuditPlanner` (space.py) hands out the explore trials (a suite or an Optuna
search, each recipe on every subject) and then the seeded re-runs of the best recipes. It
writes `<out>/audit.json` (format "sophon-ray/audit@1", atomically, last), `report.html` with
PNG plots, and keeps Tune's own files under `<out>/.tune/<experiment>`.

The metric and the attacker's goal come from the pipeline's task (`tasks.of(cfg).metric`): classifiers are
audited on restricted test accuracy (the attacker maximises it), diffusion models on denoising
MSE (the attacker minimises it; the worst case is the lowest MSE). After the trials, a kind may
add to the audit directory (`Task.audit_extras`: for diffusion, sample grids and the judge metric
in `samples.json`, which the report shows).

Test-only failure injection: `fault_trial="protected-r01-s0"` makes trials whose id contains
the string fail their first attempt (exercises Tune's retry); `fault_trial=(text, "always")`
makes them fail every attempt. The env var `SOPHON_RAY_FAULT_TRIAL="text"` or "text:always"
does the same when `fault_trial` is None.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from sophon_ray import tasks
from sophon_ray.runtime import interrupts, ray_local
from sophon_ray.config import recipe_label
from sophon_ray.config import PipelineConfig
from sophon_ray.errors import UserError
from sophon_ray.audit.certify import (  # noqa: F401 (re-exported: tests and callers import them from here)
    MINIMUM, certification, max_steps, model_facts, ran, standard_of,
)

FORMAT = "sophon-ray/audit@1"
MAX_FAILURES = 2  # retries of a failing trial before it counts as "failed"
TOP_K = 3  # best recipes per ranking subject re-run with --seeds seeds
QUIET_ENV = {"RAY_AIR_NEW_OUTPUT": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
             "RAY_DEDUP_LOGS": "0", "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
             "TUNE_DISABLE_SIGINT_HANDLER": "1"}  # Ctrl-C must stop the audit, not end it with a partial verdict
Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything validated about one audit, before Ray starts."""

    cfg: PipelineConfig
    model_uri: str
    model_dir: str
    sha256: str
    subjects: dict[str, str | None]
    mode: str  # suite name, "search<N>", or "search<N>-<suite>" (a search starting from the suite)
    recipes: tuple | None  # the suite's recipes (run, or the search's first suggestions)
    search: int | None
    seeds: int
    fault: tuple[str, str] | None
    protocol: Any = None  # the suite's tasks.SuiteProtocol (unit, attacker data, metric key)
    standard: dict[str, Any] | None = None  # what a certifying audit is held to: `standard_of`
    model_facts: dict[str, Any] | None = None  # what the model's card says bears on certifying: `model_facts`


def check_budgets(budgets: Any) -> tuple[int, ...]:
    """Budgets as a tuple of increasing positive integers, or UserError naming the fix."""
    items = list(budgets or ())
    ok = items and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in items)
    if not ok or items != sorted(set(items)):
        raise UserError(f"--budgets {','.join(map(str, items)) or '(empty)'}: expected increasing positive integers like 25,50,100")
    return tuple(items)


def _resolve_dir(model: str) -> str:
    if str(model).startswith(("models:/", "runs:/")):
        raise UserError(f"{model}: resolve MLflow URIs to a directory first (sophon_ray.tracking.resolve_model); "
                        "the sophon-ray CLI does this for you")
    return str(Path(model).resolve())  # absolute: Tune trials run in their own working directory


def _original(task: tasks.Task, card: dict[str, Any], t: tasks.Tensors, log: Log) -> str | None:
    """The unprotected source model dir named by the card's lineage, if it exists and loads."""
    src = (card.get("lineage") or {}).get("source") or {}
    path = src.get("path")
    if not path or not Path(path).is_dir():
        log("audit: no loadable source model in the card's lineage: no 'original' baseline")
        return None
    try:
        _, src_card = task.load_for(path, t)
    except UserError as e:
        log(f"audit: source model {path} does not load ({e}): no 'original' baseline")
        return None
    if src.get("sha256") and src["sha256"] != src_card["sha256"]:
        log(f"audit: source model {path} changed since protection (sha256 differs): no 'original' baseline")
        return None
    return str(Path(path).resolve())


def _parse_fault(fault_trial: Any) -> tuple[str, str] | None:
    fault_trial = fault_trial or os.environ.get("SOPHON_RAY_FAULT_TRIAL") or None
    if fault_trial is None:
        return None
    if isinstance(fault_trial, str):
        text, _, mode = fault_trial.partition(":")
        return (text, mode or "once")
    text, mode = fault_trial
    return (str(text), str(mode))


def run_suite(task: tasks.Task, suite: str | None, search: int | None, smoke: bool) -> str | None:
    """The suite `run` and `harden` audit with: the one given, else (without --search) the kind's
    `run_suite` (`smoke_suite` with --smoke); with --search, only a suite given to start it from."""
    return suite or (None if search is not None else task.smoke_suite if smoke else task.run_suite)


def audit_mode(task: tasks.Task, suite: str | None, search: int | None) -> str:
    """An audit's mode, which names its recipe set with the attack seed: the suite, "search<N>" or
    "search<N>-<suite>" (a search starting from the suite)."""
    return (suite or task.audit_suite) if search is None else f"search{search}" + (f"-{suite}" if suite else "")


def check_audit_flags(cfg: PipelineConfig, *, suite: str | None, search: int | None, budgets: Any = None,
                      seeds: int | None = 1, smoke: bool = False) -> tuple[Any, tuple[int, ...], tuple | None]:
    """Validate an audit's flags against the pipeline, before any model, Ray or output is touched
    (`make_plan` calls it; `run` and `harden` call it before their first round). `smoke`: a protocol
    suite's epoch budgets shrink (`SuiteProtocol.smoke`).

    Returns:
        (the suite's protocol, the budgets, the suite's recipes or None). Raises UserError.
    """
    task = tasks.of(cfg)
    protocol = task.protocol(suite) if search is None or suite is not None else tasks.STEPS_PROTOCOL
    protocol = protocol.smoke() if smoke else protocol
    if search is not None and protocol != tasks.STEPS_PROTOCOL:
        raise UserError(f"suite {suite!r} is a fixed protocol ({protocol.note or protocol.unit}); it cannot seed a "
                        "--search: run it alone (--suite) or seed the search with another suite")
    budgets = check_budgets((protocol.budgets or cfg.attack.budgets) if budgets is None else budgets)
    if seeds is None or seeds < 1:
        raise UserError(f"--seeds {seeds}: need at least 1 seed for the re-runs of the best recipes")
    if search is not None and search < 1:
        raise UserError(f"--search {search}: the number of search trials must be at least 1")
    recipes = task.suite(suite) if search is None or suite is not None else None
    if search is not None and recipes is not None:  # a search that starts from the suite's recipes
        if search < len(recipes):
            raise UserError(f"--search {search} is smaller than suite {suite!r} ({len(recipes)} recipes) it starts "
                            f"from; pass --search {len(recipes)} or more")
        from sophon_ray.audit.space import to_point

        for r in recipes:
            to_point(r, task.strategies)
    return protocol, budgets, recipes


def make_plan(cfg: PipelineConfig, model: str, *, suite: str | None, search: int | None, budgets: Any,
              seeds: int, fault_trial: Any, log: Log, model_ref: str | None = None,
              standard_cfg: PipelineConfig | None = None, smoke: bool = False) -> Plan:
    """Validate every input of an audit (no Ray, nothing written) and resolve the subjects.

    Args:
        cfg: the pipeline config; model: the protected model dir; model_ref: what the user named
            (an MLflow URI resolved to `model`), recorded as audit.json's model uri.
        suite, search, budgets, seeds, fault_trial, standard_cfg, smoke: as in `run_audit`.
        log: progress lines.
    Returns:
        The validated Plan. Raises UserError on bad input.
    """
    protocol, budgets, recipes = check_audit_flags(cfg, suite=suite, search=search, budgets=budgets, seeds=seeds,
                                                   smoke=smoke)
    attack = dataclasses.replace(cfg.attack, budgets=budgets)
    if protocol.attacker_data == "full":  # the suite's own attacker data: the whole restricted training split
        attack = dataclasses.replace(attack, train_per_class=None)
    cfg = dataclasses.replace(cfg, attack=attack)
    task = tasks.of(cfg)
    t = task.load_tensors()
    model_dir = _resolve_dir(model)
    _, card = task.load_for(model_dir, t)
    subjects: dict[str, str | None] = {"protected": model_dir, "scratch": None}
    original = _original(task, card, t, log)
    if original:
        subjects["original"] = original
    mode = audit_mode(task, suite, search)
    return Plan(cfg, str(model_ref or model), model_dir, card["sha256"], subjects, mode, recipes, search, seeds,
                _parse_fault(fault_trial), protocol=protocol, standard=standard_of(cfg, standard_cfg, card),
                model_facts=model_facts(card, model_dir))


def _start_ray(ray_address: str | None, concurrency: int | None) -> tuple[bool, int]:
    """Connect to / start Ray (quietly) and check the concurrency; returns (started_here, concurrency)."""
    import ray

    from sophon_ray.runtime.ray_local import check_address

    check_address(ray_address)  # an unreachable address is a one-line error, not a hang
    local = not ray_address and not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")  # a job: connect
    if local:
        cpus = os.cpu_count() or 1
        if concurrency is not None and concurrency > cpus:
            raise UserError(f"--concurrency {concurrency} exceeds this machine's {cpus} CPUs; pass at most {cpus}")
    started = not ray.is_initialized()
    if started:  # "local": a fresh local instance even if another `ray start` head runs on this machine
        ray.init(address=ray_address or "local", include_dashboard=False,
                 num_cpus=(os.cpu_count() if local else None), logging_level=logging.WARNING, log_to_driver=False,
                 **(ray_local.local_init_kwargs() if local else {}))
        interrupts.install()  # ray.init replaced the SIGTERM handler
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if concurrency is not None and concurrency > cpus:
        if started:
            ray_local.shutdown()
        raise UserError(f"--concurrency {concurrency} exceeds the Ray cluster's {cpus} CPUs; pass at most {cpus}")
    if concurrency is not None and concurrency < 1:
        if started:
            ray_local.shutdown()
        raise UserError(f"--concurrency {concurrency}: need at least 1")
    return started, concurrency or max(cpus, 1)


def _progress_callback(planner: Any, metric: tasks.Metric, log: Log):
    from ray import tune

    class Progress(tune.Callback):
        """One stderr line per finished trial: done/planned and the best attack so far per subject."""

        def __init__(self) -> None:
            self.done, self.best, self.start = 0, {}, time.perf_counter()

        def _line(self, trial: Any, status: str) -> None:
            self.done += 1
            c = trial.config
            value = (trial.last_result or {}).get("best")
            if status == "ok" and value is not None and math.isfinite(value):
                self.best[c["subject"]] = metric.better(self.best.get(c["subject"], value), value)
            best = " ".join(f"{s} {metric.fmt(self.best[s])}" for s in ("protected", "scratch", "original")
                            if s in self.best)
            got = metric.fmt(value) if status == "ok" and value is not None else status.upper()
            log(f"audit {self.done}/{planner.total} {c['id']:18s} {got:>7s} | best so far: {best} "
                f"({time.perf_counter() - self.start:.0f}s)")

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            # A signal whose exception was swallowed (raised inside a weakref or library callback
            # that ignores exceptions) is still recorded: stop at the next step of Tune's loop.
            interrupts.check()

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._line(trial, "ok")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._line(trial, "failed")

        def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            log(f"audit: trial {trial.config['id']} failed, retrying ({trial.num_failures}/{MAX_FAILURES})")

    return Progress()


def experiment(plan: Plan, out: Path) -> tuple[Path, str]:
    """(Tune storage path, deterministic experiment name) of an audit: `<out>/.tune`, name from
    pipeline, model sha256 and mode; never a timestamp."""
    return (out / ".tune").resolve(), f"audit-{plan.cfg.name}-{plan.sha256[:12]}-{plan.mode}"


def _tune(plan: Plan, planner: Any, out: Path, concurrency: int, callbacks: list, log: Log,
          cpus_per_trial: float, gpus_per_trial: float) -> Any:
    from ray import tune

    from sophon_ray.audit.trial import attack_trial

    storage, name = experiment(plan, out)
    trainable = tune.with_resources(
        tune.with_parameters(attack_trial, cfg=plan.cfg, subjects=plan.subjects,
                             protocol=plan.protocol or tasks.STEPS_PROTOCOL),
        {"cpu": cpus_per_trial, "gpu": gpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=planner, num_samples=planner.total, max_concurrent_trials=concurrency, reuse_actors=True,
            trial_name_creator=lambda t: t.config["id"], trial_dirname_creator=lambda t: t.config["id"],
        ),
        run_config=tune.RunConfig(
            name=name, storage_path=str(storage), verbose=0,
            callbacks=[_progress_callback(planner, tasks.of(plan.cfg).metric, log), *callbacks],
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
        ),
    )
    quiet = logging.getLogger("ray.tune")
    level, quiet.level = quiet.level, logging.CRITICAL  # failures are reported by Progress, one line each
    try:
        grid = tuner.fit()
    finally:
        quiet.setLevel(level)
    interrupts.check()  # a signal Tune saw must end the audit without a verdict
    return grid


def collect(grid: Any, planner: Any, budgets: tuple[int, ...]) -> list[dict[str, Any]]:
    """audit.json trial records, in plan order; a planned trial with no complete curve is "failed".

    Args:
        grid: the Tuner's ResultGrid; planner: the AuditPlanner that planned the trials.
        budgets: the step budgets every ok trial must have reached.
    Returns:
        [{"id", "subject", "recipe", "seed", "status", "curve"[, "detail"]}] ("detail": the kind's
        breakdown per budget, e.g. diffusion's timestep buckets).
    """
    by_id = {r.config["id"]: r for r in grid if r.config and "id" in r.config}
    records = []
    for tid, c in planner.planned.items():
        r = by_id.get(tid)
        curve = dict((r.metrics or {}).get("curve") or {}) if r is not None else {}
        detail = dict((r.metrics or {}).get("detail") or {}) if r is not None else {}
        ok = r is not None and r.error is None and set(curve) == {str(b) for b in budgets}
        seen = {k: (r.metrics or {}).get(k) for k in ("train_images", "step_budgets")} if r is not None else {}
        records.append({"id": tid, "subject": c["subject"], "recipe": c["recipe"], "seed": c["seed"],
                        "status": "ok" if ok else "failed", "curve": curve, **({"detail": detail} if detail else {}),
                        **{k: v for k, v in seen.items() if v is not None}})
    return records


def strength(plan: Plan, trials: list[dict[str, Any]], total: int, epsilon: float, min_gap: float, smoke: bool,
             n_explore: int | None = None) -> dict[str, Any]:
    """What this audit ran (audit.json "strength") and the standard it is held to for certifying.

    Recipes and seeds come from the trial records (`ran`), not from what was asked: an audit whose
    re-runs did not happen (top_k=0, or none planned) records 1 seed whatever --seeds said
    (`seeds_requested`). The largest budget in optimizer steps and the attacker's images per class
    (`max_steps`, `attack.train_per_class`) compare across protocols. The standard: the strictest largest budget of the pipeline
    as written, the model's card and the kind's floor (`plan.standard`, see `standard_of`), the kind's
    default epsilon and min_gap, and MINIMUM. What the model's files say (`model_facts`: the guard,
    the recipes a hardening round trained on) is recorded beside it, with this audit's feed key.
    """
    task = tasks.of(plan.cfg)
    std = plan.standard if plan.standard is not None else standard_of(plan.cfg, None)
    counted = ran(trials)
    protocol = plan.protocol or tasks.STEPS_PROTOCOL
    budgets = list(plan.cfg.attack.budgets)
    return {"mode": plan.mode, "recipes": counted["recipes"], "recipes_planned": n_explore, "trials": total,
            "reruns": counted["reruns"], "seeds": counted["seeds"], "seeds_requested": plan.seeds,
            "budgets": budgets, "unit": protocol.unit, "suite_certifies": protocol.certifies,
            "max_steps": max_steps(trials, budgets, protocol.unit),
            "attacker_images": plan.cfg.attack.train_per_class,  # per class; None: the whole split
            "attack_seed": int(plan.cfg.attack.seed), "epsilon": epsilon, "min_gap": min_gap, "smoke": bool(smoke),
            "subjects": sorted(plan.subjects), "model": dict(plan.model_facts or {}),
            "standard": {**std, "epsilon": task.epsilon, "min_gap": task.min_gap, **MINIMUM}}


def recheck(audit: dict[str, Any]) -> dict[str, Any]:
    """An audit.json dict's verdict, strength counts and certification recomputed from its own trial
    records (what the registry trusts: not the dict's `certification.certifies`). The standard, the
    protocol and the model facts are taken as recorded; the verdict's epsilon and min_gap too.

    Returns:
        {"verdict", "strength", "certification"}; a dict too old or malformed to recompute never certifies.
    """
    from sophon_ray.audit.verdict import verdict, worst_case

    try:
        metric = tasks.metric_named(audit["metric"])
        trials = list(audit.get("trials") or [])
        s, old = dict(audit["strength"]), audit["verdict"]
        failed = sum(t.get("status") != "ok" for t in trials) + max(0, int(s.get("trials") or 0) - len(trials))
        v = verdict(worst_case(trials, metric), float(old["epsilon"]), metric, failed_trials=failed,
                    min_gap=float(old["min_gap"]))
        s.update(ran(trials))
        s["max_steps"] = max_steps(trials, list(audit["budgets"]), s.get("unit", "steps"))
        return {"verdict": v, "strength": s, "certification": certification(v, s)}
    except (KeyError, TypeError, ValueError) as e:
        why = f"the audit dict cannot be re-checked ({type(e).__name__}: {e})"
        return {"verdict": audit.get("verdict") or {}, "strength": audit.get("strength") or {},
                "certification": {"certifies": False, "problems": [why]}}


def assemble(plan: Plan, trials: list[dict[str, Any]], expected: int, epsilon: float, min_gap: float | None,
             n_explore: int, smoke: bool = False) -> dict[str, Any]:
    """The audit.json dict; planned-but-missing trials count as failed in the verdict."""
    from sophon_ray.audit.verdict import verdict, worst_case, worst_case_detail

    metric = tasks.of(plan.cfg).metric
    min_gap = resolve_min_gap(plan.cfg, min_gap)
    failed = sum(t["status"] != "ok" for t in trials) + max(0, expected - len(trials))
    worst = worst_case(trials, metric)
    detail = worst_case_detail(trials, metric)
    v = verdict(worst, epsilon, metric, failed_trials=failed, min_gap=min_gap)
    s = strength(plan, trials, expected, epsilon, min_gap, smoke, n_explore=n_explore)
    return {
        "format": FORMAT, "model": {"uri": plan.model_uri, "sha256": plan.sha256}, "pipeline": plan.cfg.name,
        "metric": metric.name, "attacker_goal": metric.goal, "budgets": list(plan.cfg.attack.budgets), "trials": trials,
        "worst_case": worst, **({"worst_case_detail": detail} if detail else {}),
        "verdict": v, "strength": s, "certification": certification(v, s), "protocol": protocol_record(plan),
    }


def protocol_record(plan: Plan) -> dict[str, Any]:
    """audit.json "protocol": what the attacker was given, whatever suite set it (budgets and
    their unit, the attacker's data, the metric the verdict used)."""
    p = plan.protocol or tasks.STEPS_PROTOCOL
    a = plan.cfg.attack
    return {"suite": plan.mode, "unit": p.unit, "budgets": list(a.budgets),
            "attacker_data": "full restricted training split" if a.train_per_class is None
            else f"{a.train_per_class} images per class",
            "metric_key": p.metric_key or "overall", "certifies": p.certifies, "note": p.note}


def resolve_min_gap(cfg: PipelineConfig, min_gap: float | None) -> float:
    """`min_gap` given, else the pipeline's `attack.min_gap`, else the kind's default."""
    value = min_gap if min_gap is not None else cfg.attack.min_gap
    return tasks.of(cfg).min_gap if value is None else float(value)


def check_thresholds(cfg: PipelineConfig, epsilon: float | None, min_gap: float | None) -> None:
    """UserError for an epsilon or min_gap that is negative, not finite, or (accuracy) 1 or more."""
    metric = tasks.of(cfg).metric
    for flag, value in (("--epsilon", epsilon), ("--min-gap", min_gap), ("attack.min_gap", cfg.attack.min_gap)):
        if value is not None:
            metric.check_threshold(flag, value)


def _summary(audit: dict[str, Any], planner: Any, out: Path, wall: float, log: Log) -> None:
    """The closing lines: worst-case table, top protected recipes, verdict."""
    from sophon_ray.audit.verdict import audit_detail_table, audit_table

    v, metric = audit["verdict"], tasks.metric_named(audit["metric"])
    log(f"\nBest ({metric.superlative}) restricted test {metric.name} an attacker reached ({planner.n_explore} recipes + "
        f"re-runs, {wall:.0f}s):")
    log(audit_table(audit))  # budgets in the audit's unit (epochs: with their optimizer steps)
    if audit.get("worst_case_detail"):
        log("\nper timestep bucket (t1 = t 1 only, the paper's protocol; low/mid/high = thirds of the schedule):")
        log(audit_detail_table(audit))
    for index, value in planner.ranking("protected")[:3]:
        log(f"  top protected recipe r{index:02d} score {value:.4g} (mean over budgets): "
            f"{recipe_label(planner.recipes[index])}")
    from sophon_ray.audit.verdict import headline

    log(headline(v))
    cert = audit.get("certification") or {}
    if v.get("status") == "passed" and not cert.get("certifies"):
        log(f"not strong enough to certify (alias audited): {'; '.join(cert.get('problems') or [])}")
    log(f"-> {out / 'audit.json'}")


def run_audit(cfg, model, *, out, suite=None, search=None, budgets=None, concurrency=None, seeds=3,
              epsilon=None, ray_address=None, log=print, callbacks=None, fault_trial=None,
              cpus_per_trial: float = 1.0, gpus_per_trial: float = 0.0, top_k: int = TOP_K,
              samples: bool = True, judge_dir=None, min_gap=None, smoke: bool = False, model_ref=None,
              standard_cfg=None) -> dict:
    """Audit a protected model: many real attacks on Ray Tune vs scratch and original baselines.

    Args:
        cfg: the pipeline config; model: protected model directory (resolve an MLflow URI with
            `tracking.resolve_model` first and pass it as `model_ref`, recorded in audit.json).
        out: output directory (audit.json, report.html, PNGs, .tune/).
        suite: attack suite name (default: the kind's, "default-v1" or "diffusion-v2"); search: N
            Optuna trials instead; with both, the search's first suggestions are the suite's
            recipes (N must be at least the suite's size).
        budgets: step budgets (default cfg.attack.budgets); seeds: re-run seeds of the top recipes.
        concurrency: max concurrent trials (default: all CPUs); epsilon: allowed margin (default:
            the kind's, 0.02 accuracy or 0.005 MSE).
        ray_address: Ray cluster address (None: local, or the caller's initialised Ray).
        log: one line at a time; callbacks: extra Tune callbacks (e.g. tracking).
        fault_trial: test-only failure injection (see the module docstring).
        cpus_per_trial, gpus_per_trial: resources of each trial (fractions allowed).
        top_k: best recipes (by protected, and by scratch) re-run with `seeds` seeds.
        samples: let the kind add to the audit (diffusion: sample grids + judge metric, see
            `Task.audit_extras`; False writes a note instead); judge_dir: where the judge is cached
            (default `<out>/judge`).
        min_gap: the control power a `passed` verdict needs (default: attack.min_gap, else the
            kind's); smoke: the config is a --smoke one (recorded; such an audit never certifies;
            a protocol suite's epoch budgets shrink to `tasks.base.SMOKE_EPOCHS`).
        standard_cfg: the pipeline as written (not smoke, no overrides), whose largest budget a
            certifying audit must reach (see `standard_of`; None: a bundled name's own, else none).
    Returns:
        The audit.json dict.
    """
    from sophon_ray.outputs import guard

    check_thresholds(cfg, epsilon, min_gap)
    guard(out, "audit")  # never write into a user's folder (the CLI claimed it, with --force or not)
    plan = make_plan(cfg, model, suite=suite, search=search, budgets=budgets, seeds=seeds,
                     fault_trial=fault_trial, log=log, model_ref=model_ref, standard_cfg=standard_cfg, smoke=smoke)
    task = tasks.of(plan.cfg)
    epsilon = task.epsilon if epsilon is None else epsilon
    if smoke and (plan.protocol or tasks.STEPS_PROTOCOL).unit != "steps":
        top_k = 0  # a smoke run of a protocol suite (1-2 epochs): each recipe once, as `run --paper` does
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    from sophon_ray.audit.space import SUBJECTS, AuditPlanner, optuna_searcher

    started, concurrency = _start_ray(ray_address, concurrency)
    try:
        subjects = tuple(s for s in SUBJECTS if s in plan.subjects)
        inner = (optuna_searcher(seed=plan.cfg.attack.seed, n_trials=search, metric=task.metric, strategies=task.strategies,
                                 start_from=plan.recipes or ()) if search is not None else None)
        out = Path(out)
        storage, name = experiment(plan, out)
        shutil.rmtree(storage / name, ignore_errors=True)  # a fresh run, never a silent resume
        fault = (*plan.fault, str(storage / name / ".faults")) if plan.fault else None
        planner = AuditPlanner(subjects, recipes=None if inner is not None else plan.recipes, inner=inner,
                               n_search=search or 0, seeds=seeds, top_k=top_k, metric=task.metric, fault=fault)
        log(f"audit {plan.cfg.name} {plan.mode}: {planner.n_explore} recipes x {len(subjects)} subjects "
            f"({', '.join(subjects)}), budgets {list(plan.cfg.attack.budgets)} {(plan.protocol or tasks.STEPS_PROTOCOL).unit}, "
            f"concurrency {concurrency}")
        start = time.perf_counter()
        grid = _tune(plan, planner, out, concurrency, list(callbacks or []), log, cpus_per_trial, gpus_per_trial)
        audit = assemble(plan, collect(grid, planner, plan.cfg.attack.budgets), planner.total, epsilon, min_gap,
                         n_explore=planner.n_explore, smoke=smoke)
        wall = time.perf_counter() - start
    finally:
        if started:
            ray_local.shutdown()
    from sophon_ray.audit.report import write_report
    from sophon_ray.outputs import write_json_atomic

    task.audit_extras(audit, plan.subjects, out, log, enabled=samples, judge_dir=judge_dir)
    write_report(audit, out, search=plan.search is not None, model_dir=plan.model_dir,
                 source_dir=plan.subjects.get("original"))
    write_json_atomic(out / "audit.json", audit)
    _summary(audit, planner, out, wall, log)
    return audit
