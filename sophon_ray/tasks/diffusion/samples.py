"""Diffusion samples and the judge: DDPM sample grids and the "recognised as restricted" metric.

`sample_report` fine-tunes every audit subject with one recipe (the strongest against the
protected model, after a diffusion audit) and draws samples before and after; a judge classifier
(`diffusion.judge`, trained once and cached) labels them. The functions take the pipeline's
`DiffusionTask`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from sophon_ray import tasks
from sophon_ray.config import PipelineConfig, Recipe
from sophon_ray.errors import UserError
from sophon_ray.outputs import write_json_atomic

if TYPE_CHECKING:
    from sophon_ray.tasks.diffusion import DiffusionTask

Log = Callable[[str], None]


def generate(task: DiffusionTask, model: torch.nn.Module) -> torch.Tensor:
    """`diffusion.samples` DDPM samples (fixed seed, `diffusion.sample_steps` steps), (n, C, S, S)."""
    from sophon_ray.core.diffusion import sample

    s, cfg = task.settings, task.cfg
    shape = (cfg.input.channels, cfg.input.size, cfg.input.size)
    return sample(model, task.scheduler(), s.samples, shape, s.sample_steps, s.sample_seed)


def save_grid(cfg: PipelineConfig, images: torch.Tensor, path: str | Path, nrow: int = 8, scale: int = 2) -> Path:
    """Write normalised images (N, C, S, S) as a PNG grid (pixels de-normalised with input.mean/std)."""
    import torch.nn.functional as F
    from torchvision.utils import save_image

    mean = torch.tensor(cfg.input.mean).view(1, -1, 1, 1)
    std = torch.tensor(cfg.input.std).view(1, -1, 1, 1)
    x = (images * std + mean).clamp(0, 1)  # (N, C, S, S) in [0, 1]
    if scale > 1:
        x = F.interpolate(x, scale_factor=scale, mode="nearest")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(x, str(path), nrow=nrow, padding=2, pad_value=1.0)
    return path


def judge(judge_cfg: PipelineConfig, out: str | Path, log: Log = print) -> torch.nn.Module:
    """The judge classifier of a pipeline (a classification config), trained once and cached in `out`
    (retrained when the cached model was made from a different judge config)."""
    out = Path(out)
    judge_task = tasks.of(judge_cfg)
    try:
        model, card = tasks.load_model(out)
        if card.get("lineage", {}).get("stage_hash") == judge_task.source_stage_hash():
            return model
    except UserError:
        pass
    log(f"training the judge classifier into {out}")
    return tasks.load_model(judge_task.pretrain(out, log=log))[0]


def recognised(judge_model: torch.nn.Module, samples: torch.Tensor, classes: tuple[int, ...],
               confidence: float = 0.0, none_class: int | None = None) -> dict[str, float]:
    """{"recognised": fraction of `samples` the judge accepts (top probability >= `confidence`, label
    not `none_class`) and labels as one of `classes` (e.g. the restricted digits), "rejected":
    fraction not accepted}."""
    from sophon_ray.core.diffusion import judge_samples

    return judge_samples(judge_model, samples, classes, confidence, none_class)


def noise_check(judge_model: torch.nn.Module, shape: tuple[int, int, int], classes: tuple[int, ...],
                confidence: float, none_class: int | None = None, n: int = 256, seed: int = 0) -> dict[str, float]:
    """The judge on images that are no digit at all (uniform noise in [-1, 1] and Gaussian noise
    clamped to it): how many it rejects and how many it would still call restricted."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.rand((n // 2, *shape), generator=g) * 2 - 1,
                   torch.randn((n - n // 2, *shape), generator=g).clamp(-1, 1)])
    return recognised(judge_model, x, classes, confidence, none_class)


def _judge_for(task: DiffusionTask, judge_dir: Path, log: Log) -> tuple[torch.nn.Module | None, dict[str, Any] | None]:
    s = task.settings
    if s.judge is None:
        return None, None
    task.check()
    model = judge(dataclasses.replace(s.judge, input=task.cfg.input), judge_dir, log)  # judges what the UNet draws
    acc = json.loads((judge_dir / "metrics.json").read_text()).get("original_test_accuracy")
    shape = (task.cfg.input.channels, task.cfg.input.size, task.cfg.input.size)
    return model, {"dir": str(judge_dir), "test_accuracy": acc, "classes": list(s.judge_classes),
                   "confidence": s.judge_confidence, "none_class": s.judge_none_class,
                   "on_noise": noise_check(model, shape, s.judge_classes, s.judge_confidence, s.judge_none_class)}


def sample_report(
    task: DiffusionTask, subjects: dict[str, str | Path | None], out: str | Path, recipe: Recipe,
    steps: int | None = None, judge_dir: str | Path | None = None, log: Log = print, t: tasks.Tensors | None = None,
    budget: str | None = None,
) -> dict[str, Any]:
    """Sample grids and the judge metric before and after a real attack, written to `out/samples.json`.

    Every subject (name -> model dir, None = scratch) is fine-tuned with `recipe` (seed 0) for `steps`
    optimizer steps (default: the pipeline's largest budget; after an audit, `attack_steps`: what its
    largest budget meant in steps, also for an epoch suite such as paper-v1); `budget` (e.g. "the
    audit's 20 epochs") is recorded beside them. `diffusion.samples` DDPM samples are drawn from each subject as it is
    (models only, not scratch) and after the attack, saved as PNG grids `samples-<subject>-<before|after>.png`
    and, with a judge (`diffusion.judge`, trained once into `judge_dir`, default `out/judge`), labelled:
    `recognised` is the fraction the judge accepts (top probability >= `diffusion.judge_confidence`,
    label not `diffusion.judge_none_class`) and assigns to `diffusion.judge_classes` (the restricted classes), `rejected` the fraction it
    does not accept as any digit; `judge.on_noise` records the same on pure noise images.

    Returns:
        The samples.json dict: recipe, steps[, budget], judge, and per subject {"before"|"after": {"grid",
        "recognised"}, "restricted_test_mse"}.
    """
    cfg, s = task.cfg, task.settings
    if s.samples < 1 or s.sample_steps < 1:
        raise UserError("diffusion.samples and diffusion.sample_steps must be >= 1 to draw sample grids")
    task.validate_recipe(recipe)
    out = Path(out)
    t = t or task.load_tensors()
    out.mkdir(parents=True, exist_ok=True)
    steps = int(steps or max(cfg.attack.budgets))
    run_cfg = dataclasses.replace(cfg, attack=dataclasses.replace(cfg.attack, budgets=(steps,)))
    run_task = type(task)(run_cfg)
    judge_model, judge_info = _judge_for(task, Path(judge_dir) if judge_dir else out / "judge", log)
    start = time.perf_counter()

    def draw(model: torch.nn.Module, name: str) -> dict[str, Any]:
        images = generate(task, model)  # (n, C, S, S)
        grid = save_grid(cfg, images, out / f"samples-{name}.png").name
        if judge_model is None:
            return {"grid": grid, "recognised": None, "rejected": None}
        return {"grid": grid, **recognised(judge_model, images, s.judge_classes, s.judge_confidence, s.judge_none_class)}

    rows: dict[str, Any] = {}
    for name, src in subjects.items():
        row: dict[str, Any] = {}
        if src is not None:
            row["before"] = draw(task.load_for(src, t)[0], f"{name}-before")
        res = run_task.attack_run(src, recipe, seed=0, t=t, track_original=False)
        row["after"] = draw(res.model, f"{name}-after")
        value = res.restricted[steps]
        row["restricted_test_mse"] = value if math.isfinite(value) else None
        rows[name] = row
        judged = "" if judge_model is None else (
            f", recognised as restricted: {row.get('before', {}).get('recognised', float('nan')):.2f} before, "
            f"{row['after']['recognised']:.2f} after ({row['after']['rejected']:.2f} rejected as no digit)")
        log(f"samples {name}: {steps} attack steps{judged} ({time.perf_counter() - start:.0f}s)")
    result = {"recipe": dataclasses.asdict(recipe), "steps": steps, **({"budget": budget} if budget else {}),
              "samples": s.samples, "sample_steps": s.sample_steps,
              "judge": judge_info, "subjects": rows}
    write_json_atomic(out / "samples.json", result)
    return result


def strongest_trial(audit: dict[str, Any], subject: str = "protected") -> dict[str, Any] | None:
    """The subject's ok seed-0 trial record with the lowest restricted MSE at any budget (None: none)."""
    best: tuple[float, dict[str, Any]] | None = None
    for trial in audit["trials"]:
        values = [v for v in trial["curve"].values() if v is not None]
        if trial["subject"] == subject and trial["status"] == "ok" and trial["seed"] == 0 and values:
            if best is None or min(values) < best[0]:
                best = (min(values), trial)
    return None if best is None else best[1]


def strongest_recipe(audit: dict[str, Any], subject: str = "protected") -> Recipe | None:
    """The recipe of `strongest_trial` (None: no ok trial of the subject)."""
    trial = strongest_trial(audit, subject)
    return None if trial is None else Recipe(**trial["recipe"])


def attack_steps(audit: dict[str, Any], trial: dict[str, Any] | None = None) -> tuple[int, str | None] | None:
    """How long the sample grids' attack runs after an audit, so that they show what the audit's
    attacker reached: (optimizer steps of the audit's largest budget, that budget in words where it
    is not in steps, e.g. "the audit's 20 epochs"; None for a steps audit).

    The trial's `step_budgets` (what its budgets meant in optimizer steps: an epoch budget is
    floor(images / batch size) steps of its recipe) give the steps; without them the budgets must be
    steps already. `trial`: the attack the grids repeat (default: `strongest_trial`).
    Returns None where an epoch audit's trial does not record its step budgets.
    """
    from sophon_ray.tasks.base import budget_label, unit_of

    budgets, unit = [int(b) for b in audit["budgets"]], unit_of(audit)
    trial = trial if trial is not None else strongest_trial(audit)
    step_budgets = (trial or {}).get("step_budgets")
    if step_budgets and len(step_budgets) == len(budgets):
        steps = int(step_budgets[budgets.index(max(budgets))])
    elif unit == "steps":
        steps = max(budgets)
    else:
        return None
    return steps, (None if unit == "steps" else f"the audit's {budget_label(max(budgets), unit)}")
