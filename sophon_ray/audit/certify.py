"""What certifies a model (registry alias `audited`): the standard an audit is held to, what the
model's own files say, what an audit ran (counted from its trials, in units that compare), and
the certification decision. Pure functions over configs, cards and audit.json records; the audit
driver (`driver.py`) and the registry (`tracking/registry.py`, via `driver.recheck`) call them.
docs/design.md, "What certifies a model".
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sophon_ray.config import PipelineConfig

# What an audit must be to certify a model (registry alias `audited`), besides status "passed":
# docs/design.md explains each figure.
MINIMUM = {"recipes": 16, "seeds": 3}  # seeds: of every re-run recipe, its explore run included

# The per-kind floor of the budget standard, in optimizer steps: whatever a pipeline file says, a
# certifying audit attacks at least this long (docs/design.md, "What certifies a model").
FLOOR_STEPS = {"classifier": 50, "diffusion": 100}


def _budgets_std(source: str, pc: PipelineConfig) -> dict[str, Any]:
    budgets = [int(b) for b in pc.attack.budgets]
    return {"source": source, "pipeline": pc.name, "budgets": budgets, "max_budget": max(budgets)}


def _same_model(a: PipelineConfig, b: PipelineConfig) -> bool:
    """Whether two pipelines build the same kind of model on the same data (kind, arch, input,
    original and restricted domains): a model of one is a model of the other."""
    return (a.kind, a.arch, a.input, a.original, a.restricted) == (b.kind, b.arch, b.input, b.original, b.restricted)


def _card_standards(cfg: PipelineConfig, card: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The standards the model's own card implies: the bundled pipeline it was protected under (by
    name), and every bundled pipeline that builds the same model on the same data as the audited
    config (a pipeline file's resolved base: `base: mnist-to-digits` with other budgets is still
    mnist-to-digits' model)."""
    from sophon_ray.pipelines import PIPELINES

    out = []
    for name in PIPELINES:
        pc = PIPELINES[name].get_config(smoke=False)
        if pc.kind != cfg.kind or not pc.attack.budgets:
            continue
        if (card is not None and card.get("pipeline") == name) or _same_model(pc, cfg):
            out.append(_budgets_std("card" if card is not None and card.get("pipeline") == name else "bundled-match", pc))
    return out


def standard_of(cfg: PipelineConfig, standard_cfg: PipelineConfig | None,
                card: dict[str, Any] | None = None) -> dict[str, Any]:
    """The budget a certifying audit of `cfg` must reach: the strictest (largest) of the pipeline as
    written (before `--budgets`, `--set attack.budgets=...` or a rename with `--set name=...`), the
    pipeline the model's card was protected under and every bundled pipeline of the same model and
    data (`_card_standards`), and the kind's floor (`FLOOR_STEPS`).

    Args:
        cfg: the audited config (overrides applied).
        standard_cfg: the same pipeline loaded from its name or file with smoke=False and no
            overrides (the CLI passes it), or None.
        card: the audited model's card (model.json), or None.
    Returns:
        {"source": where the deciding budget came from: "pipeline" (standard_cfg) | "bundled" (no
        standard_cfg, but `cfg.name` is a bundled pipeline of the same kind) | "card" | "bundled-match"
        | "floor"; "unknown" when the pipeline as written is unknown or of another kind (the audit
        never certifies), "pipeline", "budgets", "max_budget", "covers" (every pipeline whose
        standard was taken into account), "floor"[, "reason"]}.
    """
    from sophon_ray.pipelines import PIPELINES

    source = "pipeline"
    if standard_cfg is None and cfg.name in PIPELINES:
        standard_cfg, source = PIPELINES[cfg.name].get_config(smoke=False), "bundled"
    floor = FLOOR_STEPS.get(cfg.kind, max(FLOOR_STEPS.values()))
    if standard_cfg is None:
        why = (f"{cfg.name!r} is not a bundled pipeline and the pipeline as written was not given "
               "(the CLI gives it; from Python pass standard_cfg=sophon_ray.pipeline(NAME_OR_FILE))")
    elif standard_cfg.kind != cfg.kind:
        why = f"the audited config is a {cfg.kind} pipeline, the pipeline as written a {standard_cfg.kind} one"
    elif not standard_cfg.attack.budgets:
        why = f"pipeline {standard_cfg.name!r} has no attack.budgets"
    else:
        candidates = [_budgets_std(source, standard_cfg), *_card_standards(cfg, card)]
        best = max(candidates, key=lambda c: c["max_budget"])  # the first (the pipeline as written) on a tie
        covers = sorted({c["pipeline"] for c in candidates} | {cfg.name} | ({str(card["pipeline"])} if card and card.get("pipeline") else set()))
        if best["max_budget"] < floor:
            best = {"source": "floor", "pipeline": best["pipeline"], "budgets": [floor], "max_budget": floor}
        return {**best, "covers": covers, "floor": floor}
    return {"source": "unknown", "pipeline": cfg.name, "budgets": None, "max_budget": None, "covers": [cfg.name],
            "floor": floor, "reason": why}


def model_facts(card: dict[str, Any], model_dir: str | Path) -> dict[str, Any]:
    """What the audited model's own files say that bears on certifying it:
    "guard_passed" (metrics.json / the card; None for a model without a guard, e.g. a source) and
    "trained_against" (the card's `lineage.fed_by`: the audit suite and attack seed whose strongest
    recipes a hardening round trained on; None when it trained on none)."""
    lineage = card.get("lineage") or {}
    guard = lineage.get("guard") or {}
    passed = guard.get("passed")
    if passed is None:
        try:
            passed = json.loads((Path(model_dir) / "metrics.json").read_text()).get("guard_passed")
        except (OSError, ValueError):
            passed = None
    return {"guard_passed": passed, "trained_against": lineage.get("fed_by")}


def _feed_key(mode: Any, attack_seed: Any) -> tuple[str, int]:
    return str(mode), int(attack_seed or 0)


_TRIAL_ID = re.compile(r"-r(\d+)-s(\d+)$")  # space.trial_id: "<subject>-r<recipe index>-s<seed>"


def ran(trials: list[dict[str, Any]]) -> dict[str, int]:
    """What the trial records show was run: {"recipes": distinct recipes, "reruns": recipes
    re-run with more seeds, "seeds": the fewest seeds a re-run recipe finished (status ok) on any
    subject, its explore run (seed 0) included; 1 when no recipe was re-run, 0 with no ok trial}."""
    planned: dict[tuple[Any, str], set[int]] = {}
    ok: dict[tuple[Any, str], set[int]] = {}
    for t in trials:
        m = _TRIAL_ID.search(str(t.get("id", "")))
        key = (int(m.group(1)) if m else json.dumps(t.get("recipe"), sort_keys=True), str(t.get("subject")))
        seed = int(t.get("seed") or 0)
        planned.setdefault(key, set()).add(seed)
        if t.get("status") == "ok":
            ok.setdefault(key, set()).add(seed)
    rerun = {i for (i, _), seeds in planned.items() if any(s > 0 for s in seeds)}
    if rerun:
        seeds = min(len(ok.get(key, ())) for key in planned if key[0] in rerun)
    else:
        seeds = 1 if ok else 0
    return {"recipes": len({i for i, _ in planned}), "reruns": len(rerun), "seeds": seeds}


def max_steps(trials: list[dict[str, Any]], budgets: list[int], unit: str) -> int | None:
    """The largest budget in optimizer steps, a unit that compares across protocols: from the trials'
    `step_budgets`; the budgets themselves where they are steps and no trial says."""
    steps = [int(x) for t in trials for x in (t.get("step_budgets") or ())]
    if not steps and unit == "steps":
        steps = [int(b) for b in budgets]
    return max(steps) if steps else None


def certification(verdict: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    """Whether an audit may certify the model (alias `audited`), and why not: status passed, and at
    least the recorded minimum (not smoke, MINIMUM recipes and seeds, the largest budget of the
    standard (`standard_of`), which must be known, epsilon and min_gap no laxer than the kind's
    defaults), on a model whose guard passed and that did not train on this audit's recipes (a
    hardening round's feedback from the same suite and attack seed)."""
    std, problems, model = s["standard"], [], s.get("model") or {}
    if verdict.get("status") != "passed":
        problems.append(f"status {verdict.get('status')}, not passed")
    if s["smoke"]:
        problems.append("a --smoke audit")
    if s.get("suite_certifies") is False:
        problems.append(f"suite {s.get('mode')}'s protocol does not certify")
    if s["recipes"] < std["recipes"]:
        problems.append(f"{s['recipes']} recipes < {std['recipes']}")
    if s["seeds"] < std["seeds"]:
        problems.append(f"{s['seeds']} seeds per re-run recipe < {std['seeds']}")
    if std.get("max_budget") is None:
        problems.append(f"no budget standard: {std.get('reason') or 'the pipeline as written is unknown'}")
    elif s.get("unit", "steps") != "steps":
        problems.append(f"budgets in {s['unit']}, the pipeline's in steps")
    elif max(s["budgets"]) < std["max_budget"]:
        problems.append(f"largest budget {max(s['budgets'])} < the standard's {std['max_budget']} "
                        f"({std.get('source')} {std.get('pipeline')})")
    if s["epsilon"] > std["epsilon"]:
        problems.append(f"epsilon {s['epsilon']:g} > {std['epsilon']:g}")
    if s["min_gap"] < std["min_gap"]:
        problems.append(f"min_gap {s['min_gap']:g} < {std['min_gap']:g}")
    if model.get("guard_passed") is False:
        problems.append("the protection's guard never passed (original-domain metric below the source's)")
    fed = model.get("trained_against")
    if fed and _feed_key(fed.get("mode"), fed.get("attack_seed")) == _feed_key(s.get("mode"), s.get("attack_seed")):
        problems.append(f"the model trained on this suite's recipes ({fed.get('mode')}, attack seed "
                        f"{fed.get('attack_seed')}: hardening feedback); audit with another suite or --set attack.seed=N")
    return {"certifies": not problems, "problems": problems}
