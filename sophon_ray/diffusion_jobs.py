"""The diffusion jobs: pretrain, protect and attack a DDPM UNet (kind="diffusion" pipelines).

They mirror `sophon_ray.jobs` (same model directories, same engine, same guard and Ray Train
path) with the ε-prediction objective of `core.diffusion`; the restricted-domain metric is the
denoising MSE on held-out images over a fixed timestep grid with fixed noise (lower = better
for the attacker), measured for the original domain too. Also here: the diffusion attack suite,
DDPM sampling into PNG grids, and the "human" metric, the fraction of generated samples a judge
classifier recognises as restricted classes (`sample_report`, also run after a diffusion audit).
Reached through the dispatchers of `sophon_ray.jobs`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sophon_ray import card as cardlib
from sophon_ray import jobs
from sophon_ray.config import DiffusionConfig, DiffusionPipelineConfig, PipelineConfig, Recipe, to_dict
from sophon_ray.diffusion_samples import generate, judge, recognised, sample_report, save_grid, strongest_recipe
from sophon_ray.errors import UserError
from sophon_ray.jobs import Metrics, _no_metrics, source_stage_hash

# Re-exported: the configs live in sophon_ray.config, samples and the judge in diffusion_samples.
__all__ = ["DiffusionConfig", "DiffusionPipelineConfig", "generate", "judge", "recognised", "sample_report",
           "save_grid", "strongest_recipe"]

Log = Callable[[str], None]
R = Recipe

# 15 recipes for UNets: 7 optimizers at several lrs, strategies all / up / down, batch 16 and 32.
# (Plain SGD at lr 1e-1 and momentum at 1e-2 diverge on the digits UNets from any start.)
SUITE_DIFFUSION_V1: tuple[Recipe, ...] = (
    R("all", "sgd", 1e-2, 16),
    R("all", "sgd", 3e-2, 16),
    R("all", "momentum", 3e-3, 16),
    R("all", "adam", 1e-4, 16),
    R("all", "adam", 1e-3, 16),
    R("all", "adam", 1e-3, 32),
    R("all", "adam", 3e-3, 16, schedule="warmup"),
    R("all", "adamw", 1e-3, 16, weight_decay=1e-2, schedule="cosine"),
    R("all", "rmsprop", 1e-4, 16),
    R("all", "adagrad", 1e-2, 16),
    R("up", "adam", 1e-3, 16),
    R("up", "momentum", 3e-3, 16),
    R("down", "adam", 1e-3, 16),
    R("down", "momentum", 3e-3, 16),
    R("all", "nesterov", 3e-3, 16, schedule="cosine"),
)
# 2 recipes, for tests and `sophon-ray run --smoke` only.
SUITE_DIFFUSION_TEST_V1: tuple[Recipe, ...] = (
    R("all", "adam", 1e-3, 16),
    R("up", "momentum", 3e-3, 16),
)
SUITES_DIFFUSION: dict[str, tuple[Recipe, ...]] = {"diffusion-v1": SUITE_DIFFUSION_V1,
                                                   "diffusion-test-v1": SUITE_DIFFUSION_TEST_V1}


def settings(cfg: PipelineConfig) -> DiffusionConfig:
    """`cfg.diffusion` if the config carries it, else the defaults."""
    return getattr(cfg, "diffusion", None) or DiffusionConfig()


# -- data and models --------------------------------------------------------------------


def check_inputs(cfg: PipelineConfig) -> None:
    """Raise UserError for a diffusion pipeline whose image size the UNet cannot take, or whose
    judge cannot label its samples."""
    from sophon_ray.models import downsample_factor

    if cfg.kind != "diffusion":
        raise UserError(f"pipeline {cfg.name!r} has kind {cfg.kind!r}; the diffusion jobs need kind=diffusion")
    factor = downsample_factor(cfg.arch)
    if cfg.input.size % factor:
        raise UserError(
            f"image size {cfg.input.size} is not divisible by the UNet's down-sampling factor {factor} "
            f"({cfg.arch.name}); use input.size=<multiple of {factor}>"
        )
    judge = settings(cfg).judge
    if judge is not None and (judge.kind != "classifier" or not settings(cfg).judge_classes):
        raise UserError("diffusion.judge must be a classifier config (kind=classifier) and diffusion.judge_classes "
                        "the judge's labels that count as restricted (e.g. [5,6,7,8,9])")


def load_tensors(cfg: PipelineConfig) -> jobs.Tensors:
    """Original and restricted images preprocessed per `cfg.input`. Unlike classification, the two
    label spaces may differ (labels are unused); `num_classes` is the original domain's."""
    from sophon_ray.data import load_domain, preprocess

    check_inputs(cfg)
    if len(cfg.restricted) != 1:
        raise UserError("this version protects against exactly one restricted domain; set restricted to a 1-tuple")
    orig, restr = load_domain(cfg.original), load_domain(cfg.restricted[0])
    return jobs.Tensors(
        original_train=preprocess(orig.train, cfg.input), original_test=preprocess(orig.test, cfg.input),
        restricted_train=preprocess(restr.train, cfg.input), restricted_test=preprocess(restr.test, cfg.input),
        num_classes=orig.num_classes, names={"original": orig.name, "restricted": [restr.name]},
    )


def new_unet(cfg: PipelineConfig, seed: int) -> tuple[torch.nn.Module, Any]:
    """A seeded random UNet of the pipeline's architecture and its DDPM scheduler."""
    from sophon_ray.models import build_diffusion

    check_inputs(cfg)
    torch.manual_seed(seed)
    return build_diffusion(cfg.arch, cfg.input.channels, cfg.input.size)


def new_model(cfg: PipelineConfig, num_classes: int, seed: int) -> torch.nn.Module:
    """A seeded random UNet (`num_classes` is ignored: a UNet has no head)."""
    return new_unet(cfg, seed)[0]


def scheduler(cfg: PipelineConfig) -> Any:
    """The pipeline's DDPM scheduler (diffusers `DDPMScheduler`), without building a UNet."""
    from sophon_ray.models.diffusion import build_scheduler

    return build_scheduler(cfg.arch)


def load_for(cfg: PipelineConfig, source: str | Path, t: jobs.Tensors) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a diffusion model directory and refuse one that does not fit the pipeline's data."""
    from sophon_ray.core.diffusion import check_images
    from sophon_ray.models import downsample_factor

    model, card = cardlib.load_model(source)
    got, want = int(card["input"]["channels"]), cfg.input.channels
    if card["kind"] == "diffusion" and got != want:
        raise UserError(f"model {source} takes {got}-channel images but pipeline {cfg.name!r} has {want} "
                        f"(input.channels); pass a model made for this data or --set input.channels={got}")
    jobs.check_compatible(card, cfg, t.num_classes, str(source))
    check_images(t.restricted_test[0][:1], model.config.in_channels, downsample_factor(cfg.arch), f"pipeline {cfg.name}")
    return model, card


def objective(cfg: PipelineConfig, alphas_cumprod: torch.Tensor, protection: bool = False):
    """The `DiffusionObjective` of the pipeline (suppression loss `cfg.protect.loss`); timesteps from
    `diffusion.t_range` for protection, else (pretraining, attacks) from the whole schedule."""
    from sophon_ray.core.diffusion import DiffusionObjective
    from sophon_ray.core.losses import get_loss

    t_range = settings(cfg).t_range if protection else None
    return DiffusionObjective(get_loss(cfg.protect.loss, "diffusion"), alphas_cumprod, t_range)


def mse(cfg: PipelineConfig, model: torch.nn.Module, x: torch.Tensor, alphas_cumprod: torch.Tensor) -> float:
    """Denoising MSE of `model` on images `x` over the pipeline's fixed grid and noise seed."""
    from sophon_ray.core.diffusion import denoising_mse, eval_timesteps

    s = settings(cfg)
    grid = eval_timesteps(len(alphas_cumprod), s.eval_timesteps)
    return denoising_mse(model, x, alphas_cumprod, grid, s.eval_seed, cfg.attack.eval_batch)


def original_metric(cfg: PipelineConfig, model: torch.nn.Module, t: jobs.Tensors) -> float:
    """Original-domain test MSE (the guard's quantity; of the source model: the guard's reference)."""
    return mse(cfg, model, t.original_test[0], scheduler(cfg).alphas_cumprod)



def model_metrics(cfg: PipelineConfig, model: torch.nn.Module, t: jobs.Tensors) -> dict[str, float]:
    """Original and restricted test MSE of a model (what metrics.json records)."""
    alphas = scheduler(cfg).alphas_cumprod
    return {"original_test_mse": mse(cfg, model, t.original_test[0], alphas),
            "restricted_test_mse": mse(cfg, model, t.restricted_test[0], alphas)}


# -- pretrain / protect -------------------------------------------------------------------


def pretrain(cfg: PipelineConfig, out: str | Path, log: Log = print, on_metrics: Metrics = _no_metrics) -> Path:
    """Train the unprotected source UNet on the original domain (ε-prediction MSE, AdamW + cosine)."""
    t = load_tensors(cfg)
    p = cfg.pretrain
    model, sched = new_unet(cfg, p.seed)
    obj = objective(cfg, sched.alphas_cumprod)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    lr_sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(p.steps, 1))
    g = torch.Generator().manual_seed(p.seed)
    x = t.original_train[0]
    start = time.perf_counter()
    model.train()
    for step in range(1, p.steps + 1):
        idx = torch.randint(len(x), (p.batch_size,), generator=g)
        loss = obj.train_loss(model, obj.make_batch((x[idx],), g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr_sched.step()
        if step % 10 == 0 or step == p.steps:
            on_metrics(step, {"train_loss": loss.item()})
        if step % max(p.steps // 5, 1) == 0 or step == p.steps:
            log(f"pretrain {step}/{p.steps} loss {loss.item():.4f}")
    metrics = {**model_metrics(cfg, model, t), "seconds": round(time.perf_counter() - start, 2)}
    log(f"pretrain done: original test MSE {metrics['original_test_mse']:.4f}, "
        f"restricted test MSE {metrics['restricted_test_mse']:.4f}")
    card = jobs.make_card(cfg, t, "source", {"config": to_dict(cfg.pretrain), "stage_hash": source_stage_hash(cfg)})
    return cardlib.save_model_dir(out, model, card, metrics)


def build_protection(cfg: PipelineConfig, model: torch.nn.Module, t: jobs.Tensors, source_mse: float, **dist: Any):
    """The core `Protection` for a diffusion pipeline (shared by local and Ray Train runs).

    The guard passes while the original test MSE <= source_mse * (1 + protect.guard_margin).
    """
    from sophon_ray.core import Protection, ProtectData

    alphas = scheduler(cfg).alphas_cumprod
    obj = objective(cfg, alphas, protection=True)
    data = ProtectData(original=t.original_train, restricted=t.restricted_train)
    return Protection(
        model, cfg.protect, data, obj,
        evaluate_original=lambda: mse(cfg, model, t.original_test[0], alphas),
        source_value=source_mse, higher_is_better=False, head_keys=(), make_batch=obj.make_batch, **dist,
    )


# -- attacks --------------------------------------------------------------------------------


@dataclass
class AttackResult:
    """One real fine-tuning run: restricted and original test MSE per budget, the final model."""

    restricted: dict[int, float]
    original: dict[int, float]
    model: torch.nn.Module


def validate_recipe(recipe: Recipe) -> None:
    """Refuse classifier strategies for a UNet (they need a head)."""
    from sophon_ray.core.attack import DIFFUSION_STRATEGIES, validate_recipe as validate

    validate(recipe)
    if recipe.strategy not in DIFFUSION_STRATEGIES:
        raise UserError(f"strategy {recipe.strategy!r} is for classifiers; a diffusion model takes "
                        f"strategy={'|'.join(DIFFUSION_STRATEGIES)} (e.g. --recipe strategy=all,optimizer=adam,lr=1e-3)")


def finetune_kwargs(cfg: PipelineConfig, t: jobs.Tensors, model: torch.nn.Module | None, seed: int) -> dict[str, Any]:
    """The diffusion-specific arguments of `core.attack.finetune` (train, evaluate, head_keys, loss_fn):
    restricted training images, restricted test MSE, no head, ε-prediction loss over the whole schedule
    with noise/timesteps from a generator seeded by `seed`."""
    alphas = scheduler(cfg).alphas_cumprod
    return {
        "train": (t.restricted_train[0],),
        "evaluate": lambda m: mse(cfg, m, t.restricted_test[0], alphas),
        "head_keys": (),
        "loss_fn": objective(cfg, alphas).loss_fn(torch.Generator().manual_seed(7919 * seed + 17)),
    }


def attack_run(
    cfg: PipelineConfig, model_src: str | Path | None, recipe: Recipe, seed: int = 0,
    t: jobs.Tensors | None = None, track_original: bool = True,
) -> AttackResult:
    """Fine-tune a subject on the restricted training images; `model_src=None` is a scratch UNet
    (seeded 10000 + seed). With `track_original`, the original-domain test MSE is measured at each budget."""
    from sophon_ray.core import finetune

    validate_recipe(recipe)
    t = t or load_tensors(cfg)
    model = new_unet(cfg, 10_000 + seed)[0] if model_src is None else load_for(cfg, model_src, t)[0]
    alphas = scheduler(cfg).alphas_cumprod
    torch.manual_seed(seed)
    original: dict[int, float] = {}

    def on_budget(steps: int, _: float) -> None:
        if track_original:
            original[steps] = mse(cfg, model, t.original_test[0], alphas)

    curve = finetune(model, recipe, budgets=cfg.attack.budgets, seed=seed, on_budget=on_budget,
                     **finetune_kwargs(cfg, t, model, seed))
    return AttackResult(curve, original, model)


def attack(
    cfg: PipelineConfig, model_src: str | Path | None, recipe: Recipe, seed: int = 0, t: jobs.Tensors | None = None,
) -> dict[int, float]:
    """One real fine-tuning run; returns the restricted test MSE at each of `cfg.attack.budgets`."""
    return attack_run(cfg, model_src, recipe, seed, t, track_original=False).restricted


def get_suite(name: str) -> tuple[Recipe, ...]:
    """A named diffusion attack suite (`diffusion-v1`)."""
    if name not in SUITES_DIFFUSION:
        raise UserError(f"unknown diffusion attack suite {name!r}; use one of: {', '.join(SUITES_DIFFUSION)}")
    return SUITES_DIFFUSION[name]


def compare(
    cfg: PipelineConfig, subjects: dict[str, Any], recipes: tuple[Recipe, ...], seeds: tuple[int, ...] = (0,),
    log: Log = print, t: jobs.Tensors | None = None,
) -> list[dict[str, Any]]:
    """Every (subject, recipe, seed) attack in process; `subjects` maps name -> model dir (None = scratch).

    Returns audit-style trial dicts (id, subject, recipe, seed, status, curve) plus `original_curve` and
    `diverged`: the budgets where the fine-tuned model's output was not finite (left out of `curve`, so
    the worst case takes the attacker's best *finite* result; a diverged run gives the attacker nothing).
    """
    from sophon_ray.audit.suites import recipe_label

    t = t or load_tensors(cfg)
    trials, start = [], time.perf_counter()
    plan = [(s, i, r, seed) for i, r in enumerate(recipes) for seed in seeds for s in subjects]
    for n, (subject, i, recipe, seed) in enumerate(plan, 1):
        res = attack_run(cfg, subjects[subject], recipe, seed, t)
        trials.append({
            "id": f"{subject}-r{i:02d}-s{seed}", "subject": subject, "recipe": dataclasses.asdict(recipe), "seed": seed,
            "status": "ok", "curve": {str(k): v for k, v in res.restricted.items() if math.isfinite(v)},
            "original_curve": {str(k): v for k, v in res.original.items() if math.isfinite(v)},
            "diverged": [k for k, v in res.restricted.items() if not math.isfinite(v)],
        })
        last = res.restricted[max(res.restricted)]
        log(f"attack {n}/{len(plan)} {subject:9s} {recipe_label(recipe):36s} -> restricted MSE {last:.4f} "
            f"({time.perf_counter() - start:.0f}s)")
    return trials


# -- samples and the judge (implemented in diffusion_samples) -------------------------------


def audit_extras(cfg: PipelineConfig, audit: dict[str, Any], subjects: dict[str, str | None], out: Path,
                 log: Log = print, enabled: bool = True, judge_dir: str | Path | None = None) -> dict[str, Any]:
    """After a diffusion audit: `sample_report` with the strongest recipe against the protected model,
    or, when disabled (`--no-samples`, `diffusion.samples=0`), a samples.json saying so and how to make them."""
    from sophon_ray.card import write_json_atomic

    recipe = strongest_recipe(audit)
    why = ("--no-samples" if not enabled else "diffusion.samples=0" if settings(cfg).samples < 1
           else "no ok trial of the protected model" if recipe is None else None)
    if why is not None:
        info = {"skipped": f"sample grids and the judge metric were skipped ({why}); make them with "
                           f"`sophon-ray samples {cfg.name} --model {subjects.get('protected')} --audit {out}/audit.json`"}
        write_json_atomic(Path(out) / "samples.json", info)
        log(f"samples: {info['skipped']}")
        return info
    log(f"samples: fine-tune every subject with the strongest recipe ({recipe.strategy} {recipe.optimizer} "
        f"lr {recipe.lr:g}) and sample {settings(cfg).samples} images each")
    return sample_report(cfg, subjects, out, recipe, judge_dir=judge_dir, log=log)
