"""`sophon-ray harden`: protect, audit, feed the audit's strongest attacks back, repeat.

Round r protects on Ray Train (`tracked.protect` -> `train.driver.protect_distributed`, with its
checkpoints) starting from round r-1's weights (round 1: the source, or a fresh init with
`protect.init=fresh`), the source staying the teacher, the guard's reference and the audit's
control; its FTS environment space is the pipeline's plus, as fixed environments
(`protect.env.recipes`), the strongest audit recipes of every earlier round mapped exactly
(`audit.rounds.feedback`, `core.feedback`). Then it audits on Ray Tune (`tracked.audit`): each
round is a registry version with its audit recorded on it, certified by the usual rules. It stops
at `passed` or after `rounds` rounds.

With `start` (`--start MODEL`, an already protected model of the same source, e.g. one scaled up
in `protect --start` chunks), the loop hardens that model: round 0 audits it as it is (no
protection; its record points at the model where it lies, nothing is copied) and feeds its
strongest recipes into round 1, which protects from its weights. `rounds` counts the protection
rounds after round 0; a round 0 that passes ends the loop with nothing protected.

Output folder (deterministic names, never timestamps):
  harden.json          the state, written atomically after every finished round
  round-<r>/protected  the round's model;  round-<r>/audit  its audit (audit.json, report.html)
  round-0/audit        with `start`: the start model's audit (its weights stay where they are)
  removed.png          removed per budget per round (also logged to the MLflow harden run)
  .ray/                Ray Train storage: a round killed mid-protection resumes from its checkpoint
Re-running the same command continues after the last finished round (a protection that finished
before the kill is kept: its card's stage hash matches); other settings in the same folder are
refused unless `force` (then it starts over). Ctrl-C / SIGTERM propagate
(`runtime.interrupts`): the round's unfinished stage writes nothing and the state keeps the last
finished one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from sophon_ray import tasks
from sophon_ray.app import tracked
from sophon_ray.config import PipelineConfig, config_hash, to_dict
from sophon_ray.errors import UserError
from sophon_ray.modeldir import read_card
from sophon_ray.app.workflow import audit_stage
from sophon_ray.outputs import claim, mark_stage, stage_done, write_json_atomic

FORMAT = "sophon-ray/harden@1"
STATE, PLOT = "harden.json", "removed.png"
Log = Callable[[str], None]


def _read_state(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except ValueError:
        raise UserError(f"{path} is not readable JSON; pass --force to start the harden over") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path} is not a sophon-ray harden state ({FORMAT}); pass --force to start over")
    return state


def _start_over(root: Path) -> None:
    (root / STATE).unlink(missing_ok=True)
    (root / PLOT).unlink(missing_ok=True)
    for d in root.glob("round-*"):
        shutil.rmtree(d)


def _round_cfg(cfg: PipelineConfig, recipes: tuple[Any, ...]) -> PipelineConfig:
    env = dataclasses.replace(cfg.protect.env, recipes=recipes)
    return dataclasses.replace(cfg, protect=dataclasses.replace(cfg.protect, env=env))


def _protect(cfg: PipelineConfig, r: int, root: Path, source: Path, start: Path | None, src_sha: str,
             opts: dict[str, Any], parent: str, log: Log, fed_by: dict[str, Any] | None = None) -> tuple[Path, str]:
    """The round's protected model (skipped when it is there for exactly these inputs); `fed_by`
    goes into its card's lineage (the audit whose recipes it trains on)."""
    task = tasks.of(cfg)
    out = claim(root / f"round-{r}" / "protected", "model", force=opts["force"])
    start_sha = read_card(start)["sha256"] if start is not None else None
    if stage_done(out, task.protect_stage_hash(src_sha, opts["workers"], start_sha)):
        log(f"round {r}: protect: {out} is up to date, skipped")
    else:
        w = opts["workers"]
        log(f"round {r}: protect from {start or 'the source'} with {len(cfg.protect.env.recipes)} fed-back recipe(s) "
            f"({'in-process' if w == 0 else f'{w} Ray Train workers'})")
        extra = {"ray_address": opts["ray_address"], "verbose": opts["verbose"], "gpus_per_worker": opts["gpus_per_worker"],
                 "storage_path": opts["storage_path"] or str(root / ".ray"), "resume": True} if w else {}
        tracked.protect(cfg, str(source), out, log, model_name=opts["model_name"], workers=w,
                        start=str(start) if start is not None else None, parent_run_id=parent, fed_by=fed_by, **extra)
    return out, read_card(out)["sha256"]


def _audit(cfg: PipelineConfig, r: int, root: Path, protected: Path, sha: str, opts: dict[str, Any],
           parent: str, log: Log, subject: str = "") -> dict[str, Any]:
    """The round's audit (skipped when audit.json is there for exactly these inputs)."""
    out = claim(root / f"round-{r}" / "audit", "audit", force=opts["force"])
    keys = ("suite", "search", "seeds", "epsilon", "min_gap", "samples", "smoke")
    stage = audit_stage(cfg, sha, *(opts[k] for k in keys))
    if stage_done(out, stage):
        log(f"round {r}: audit: {out / 'audit.json'} is up to date, skipped")
        return json.loads((out / "audit.json").read_text())
    log(f"round {r}: audit{' of ' + subject if subject else ''} on Ray Tune")
    result = tracked.audit(cfg, str(protected), out, log, model_name=opts["model_name"], parent_run_id=parent,
                           suite=opts["suite"], search=opts["search"], seeds=opts["seeds"],
                           concurrency=opts["concurrency"], epsilon=opts["epsilon"], min_gap=opts["min_gap"],
                           smoke=opts["smoke"], ray_address=opts["ray_address"], samples=opts["samples"],
                           judge_dir=str(root / "judge"), standard_cfg=opts["standard_cfg"])
    mark_stage(out, stage)
    return result


def _record(r: int, protected: Path, sha: str, audit: dict[str, Any], env_recipes: tuple[Any, ...],
            fed: list[dict[str, Any]], root: Path, model_name: str, seconds: dict[str, float]) -> dict[str, Any]:
    from sophon_ray import tracking

    v = audit["verdict"]
    versions = sorted(ver for name, ver in tracking.versions_with_sha256(sha) if name == model_name)
    inside = protected.is_relative_to(root)
    return {"round": r, "model": str(protected.relative_to(root) if inside else protected), "sha256": sha,
            "version": versions[0] if versions else None,
            "audit": str(((protected.parent if inside else root / f"round-{r}") / "audit" / "audit.json")
                         .relative_to(root)),
            "status": v["status"], "margin": v.get("margin"), "control_gap": v.get("control_gap"),
            "removed": v.get("removed") or {}, "residual": v.get("residual") or {},
            "certifies": bool((audit.get("certification") or {}).get("certifies")),
            "env_recipes": [to_dict(x) if dataclasses.is_dataclass(x) else dict(x) for x in env_recipes],
            "fed_back": fed, "seconds": seconds}


def harden(cfg: PipelineConfig, root: str | Path, *, source: str | Path, rounds: int, feedback: int = 3,
           start: str | Path | None = None, workers: int = 2, suite: str | None = None, search: int | None = None,
           seeds: int = 2, concurrency: int | None = None, epsilon: float | None = None, min_gap: float | None = None,
           smoke: bool = False, samples: bool = True, model_name: str | None = None, ray_address: str | None = None,
           storage_path: str | None = None, gpus_per_worker: float = 0.0, verbose: bool = False, force: bool = False,
           standard_cfg: PipelineConfig | None = None, log: Log = print,
           on_round: Callable[[int, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or continue) the hardening loop in `root` (module docstring).

    Args:
        cfg: the pipeline config; root: the output folder (claimed by the caller, kind "harden").
        source: the unprotected source model directory; rounds: stop after this many protection rounds.
        start: a protected model directory of the same source to harden (round 0 audits it; module
            docstring); None: round 1 protects from the source (or a fresh init).
        feedback: at most this many of each audit's strongest recipes are fed back.
        workers: Ray Train workers (0: in-process); suite, search, seeds, concurrency, epsilon, min_gap,
            smoke, samples, standard_cfg: the audit's, as in `sophon-ray run`.
        force: the caller's --force: a state of other settings in `root` is started over.
        on_round: called with (round, its record) after each round's state is written.
    Returns:
        {"rounds": [round records], "done": "passed" | "rounds", "audit": the last audit.json dict,
        "protected", "audit_dir": the last round's paths, "plot": removed.png, "state": harden.json}.
    """
    from sophon_ray import tracking
    from sophon_ray.audit.driver import check_audit_flags, resolve_min_gap, run_suite
    from sophon_ray.train.driver import init_ray

    task = tasks.of(cfg)
    if rounds < 1 or feedback < 1:
        raise UserError(f"--rounds {rounds} / --feedback {feedback}: each must be at least 1")
    suite = run_suite(task, suite, search, smoke)
    protocol = check_audit_flags(cfg, suite=suite, search=search, seeds=seeds, smoke=smoke)[0]  # before any round
    epsilon = task.epsilon if epsilon is None else epsilon
    min_gap = resolve_min_gap(cfg, min_gap)
    root, source = Path(root), Path(source).resolve()
    src_card = read_card(source)
    task.check_compatible(src_card, task.load_tensors().num_classes, str(source))
    start_card = None
    if start is not None:
        start = Path(start).resolve()
        start_card = check_start(task, src_card, start)
    model_name = model_name or tracked.default_model_name(cfg)
    opts = {"workers": workers, "suite": suite, "search": search, "seeds": seeds, "epsilon": epsilon, "min_gap": min_gap,
            "samples": samples, "smoke": smoke, "concurrency": concurrency, "model_name": model_name,
            "ray_address": ray_address, "storage_path": storage_path, "verbose": verbose,
            "gpus_per_worker": gpus_per_worker, "force": force, "standard_cfg": standard_cfg}
    settings = {k: opts[k] for k in ("workers", "suite", "search", "seeds", "epsilon", "min_gap", "samples", "smoke",
                                     "model_name")} | {"feedback": feedback, "source_sha256": src_card["sha256"]} | (
        {"start_sha256": start_card["sha256"]} if start_card else {})
    state = _open_state(root, cfg, settings, source, force)
    records: list[dict[str, Any]] = state["rounds"]
    if records and (records[-1]["status"] == "passed" or _protected(records) >= rounds):
        log(f"harden: {root / STATE} has {len(records)} finished round(s), the last {records[-1]['status']}: nothing to do")
        return _summary(root, state)
    tracking.ensure_store()
    ray_started = init_ray(ray_address, verbose)
    try:
        with tracking.Tracker.start("harden", cfg.name, {**to_dict(cfg), "run": settings}, resume=True,
                                    tags={"source_model": str(source)}) as run:
            run.set_tags({"rounds_asked": rounds})
            first = 0 if start is not None and not records else _protected(records) + 1
            for r in range(first, rounds + 1):
                if records and records[-1]["status"] == "passed":
                    break
                if r == 0:
                    rec, audit = _round_zero(cfg, root, start, start_card["sha256"], protocol, feedback, opts,
                                             run.run_id, log)
                else:
                    rec, audit = _round(cfg, r, root, source, src_card["sha256"], records, protocol, feedback, opts,
                                        run.run_id, log)
                records.append(rec)
                state["done"] = "passed" if rec["status"] == "passed" else "rounds" if r >= rounds else None
                write_json_atomic(root / STATE, state)
                _log_round(run, rec, audit, root, records, log)
                if on_round is not None:
                    on_round(r, rec)
    finally:
        if ray_started:
            from sophon_ray.runtime import ray_local

            ray_local.shutdown()
    return _summary(root, state)


def check_start(task: Any, src_card: dict[str, Any], start: Path) -> dict[str, Any]:
    """The card of `--start`, refused (UserError) unless it is a model of this pipeline protected
    from the source whose card is `src_card` (the source stays the audit's control)."""
    card = read_card(start)
    task.check_compatible(card, task.load_tensors().num_classes, str(start))
    from_source = ((card.get("lineage") or {}).get("source") or {}).get("sha256")
    if card.get("role") != "protected" or from_source != src_card["sha256"]:
        raise UserError(f"--start {start}: not a model protected from this --source (its card names source "
                        f"{str(from_source)[:12]}, the source is {src_card['sha256'][:12]}); pass the source it was "
                        "protected from, or a model protected from this source")
    return card


def _protected(records: list[dict[str, Any]]) -> int:
    """How many protection rounds are finished (round 0, the `start` model's audit, protects nothing)."""
    return sum(1 for rec in records if rec["round"] >= 1)


def _open_state(root: Path, cfg: PipelineConfig, settings: dict[str, Any], source: Path, force: bool) -> dict[str, Any]:
    """The harden's state in `root`: the one there when it was made with these settings (same
    pipeline config, source and audit), else a new one (other settings: UserError, or with `force`
    the old rounds are removed)."""
    key = config_hash(cfg) + "-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    state = _read_state(root / STATE)
    if state is not None and state.get("key") != key:
        if not force:
            raise UserError(f"{root} holds a harden with other settings (pipeline config, source, audit or --feedback); "
                            "re-run its own command to continue it, or pass --force to start over")
        _start_over(root)
        state = None
    return state or {"format": FORMAT, "pipeline": cfg.name, "key": key, "settings": settings,
                     "source": {"path": str(source), "sha256": settings["source_sha256"]}, "rounds": [], "done": None}


def _round(cfg: PipelineConfig, r: int, root: Path, source: Path, src_sha: str, records: list[dict[str, Any]],
           protocol: Any, feedback: int, opts: dict[str, Any], parent: str, log: Log) -> tuple[dict[str, Any], dict[str, Any]]:
    """Round r: protect from round r-1's recorded weights with every earlier round's fed-back
    recipes, audit, choose this round's feedback. Returns (its record, its audit.json dict)."""
    from sophon_ray.audit.rounds import feedback as feed, merged

    start = None
    if records:  # the previous round's weights, as recorded
        start = root / records[-1]["model"]
        if not (start / "model.json").is_file() or read_card(start)["sha256"] != records[-1]["sha256"]:
            raise UserError(f"{start} is not the model round {r - 1} recorded; pass --force to start over")
    recipes = merged(cfg.protect.env.recipes, [f["env"] for rec in records for f in rec["fed_back"]])
    cfg_r = _round_cfg(cfg, recipes)
    t0 = time.perf_counter()
    protected, sha = _protect(cfg_r, r, root, source, start, src_sha, opts, parent, log, fed_by=_fed_by(cfg, records, opts))
    t1 = time.perf_counter()
    audit = _audit(cfg_r, r, root, protected, sha, opts, parent, log)
    fed = feed(audit, tasks.of(cfg_r), protocol, feedback)
    seconds = {"protect": round(t1 - t0, 1), "audit": round(time.perf_counter() - t1, 1)}
    return _record(r, protected, sha, audit, recipes, fed, root, opts["model_name"], seconds), audit


def _round_zero(cfg: PipelineConfig, root: Path, start: Path, sha: str, protocol: Any, feedback: int,
                opts: dict[str, Any], parent: str, log: Log) -> tuple[dict[str, Any], dict[str, Any]]:
    """Round 0 (with `start`): audit the start model as it is and choose the recipes round 1 trains
    on. Returns (its record, its audit.json dict)."""
    from sophon_ray.audit.rounds import feedback as feed

    t0 = time.perf_counter()
    audit = _audit(cfg, 0, root, start, sha, opts, parent, log, subject="the --start model")
    fed = feed(audit, tasks.of(cfg), protocol, feedback)
    seconds = {"protect": 0.0, "audit": round(time.perf_counter() - t0, 1)}
    return _record(0, start, sha, audit, cfg.protect.env.recipes, fed, root, opts["model_name"], seconds), audit


def _fed_by(cfg: PipelineConfig, records: list[dict[str, Any]], opts: dict[str, Any]) -> dict[str, Any] | None:
    """What a round's weights trained against (its card's `lineage.fed_by`): the audit mode and attack
    seed of the earlier rounds whose strongest recipes were fed back. An audit of the same mode and
    attack seed does not certify these weights (`audit.certify.certification`); None for round 1."""
    from sophon_ray.audit.driver import audit_mode

    rounds = [rec["round"] for rec in records if rec["fed_back"]]
    if not rounds:
        return None
    return {"mode": audit_mode(tasks.of(cfg), opts["suite"], opts["search"]), "attack_seed": int(cfg.attack.seed),
            "seeds": opts["seeds"], "rounds": rounds}


def _summary(root: Path, state: dict[str, Any]) -> dict[str, Any]:
    last = state["rounds"][-1]
    audit_path = root / last["audit"]
    return {"rounds": state["rounds"], "done": state["done"], "audit": json.loads(audit_path.read_text()),
            "protected": root / last["model"], "audit_dir": audit_path.parent, "plot": root / PLOT,
            "state": root / STATE}


def _log_round(run: Any, rec: dict[str, Any], audit: dict[str, Any], root: Path, records: list[dict[str, Any]],
               log: Log) -> None:
    """The round's figures on the harden MLflow run (step = round), the plot and the state as artifacts."""
    from sophon_ray.audit.rounds import plot_removed
    from sophon_ray.tasks.base import budget_label, unit_of

    r = rec["round"]
    run.log_metrics({f"removed_{b}": x for b, x in rec["removed"].items() if x is not None}, step=r)
    run.log_metrics({f"residual_{b}": x for b, x in rec["residual"].items() if x is not None}, step=r)
    run.log_metrics({"margin": rec["margin"], "passed": rec["status"] == "passed",
                     "fed_back": len(rec["fed_back"]), "env_recipes": len(rec["env_recipes"])}, step=r)
    plot_removed(records, [int(b) for b in audit["budgets"]], root / PLOT, unit_of(audit))
    run.log_artifacts(root / PLOT)
    run.log_artifacts(root / STATE)
    removed = ", ".join(f"{budget_label(b, unit_of(audit))}: {'-' if x is None else f'{x:.0%}'}"
                        for b, x in rec["removed"].items())
    log(f"round {r}: {rec['status']} (margin {rec['margin'] if rec['margin'] is None else format(rec['margin'], '+.3f')}), "
        f"removed {removed}; feeding back {len(rec['fed_back'])} recipe(s): "
        + "; ".join(f"{f['env']['label']}" for f in rec["fed_back"]))
    for note in sorted({n for f in rec["fed_back"] for n in f["notes"]}):
        log(f"round {r}: not simulated exactly: {note}")
