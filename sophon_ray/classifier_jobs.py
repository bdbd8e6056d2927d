"""The classification jobs (kind="classifier"): pretrain, protect and attack a classifier.

Reached through the dispatchers of `sophon_ray.jobs`; the restricted-domain metric is test
accuracy (higher = better for the attacker).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from sophon_ray import card as cardlib
from sophon_ray.config import PipelineConfig, Recipe, to_dict
from sophon_ray.errors import UserError
from sophon_ray.jobs import (
    Log, Metrics, Tensors, _no_metrics, check_compatible, eval_batch, head_keys, make_card,
    source_stage_hash,
)


def load_tensors(cfg: PipelineConfig) -> Tensors:
    """Load the original and (first) restricted domain and preprocess them per `cfg.input`."""
    from sophon_ray.data import load_domain, preprocess

    if len(cfg.restricted) != 1:
        raise UserError("this version protects against exactly one restricted domain; set restricted to a 1-tuple")
    attacker_subset(torch.zeros(0, dtype=torch.int64), cfg.attack.train_per_class, 0)  # validate before loading
    orig, restr = load_domain(cfg.original), load_domain(cfg.restricted[0])
    if orig.num_classes != restr.num_classes:
        raise UserError(
            f"original ({orig.num_classes} classes) and restricted ({restr.num_classes}) label spaces differ; "
            "select the same number of classes in original.classes and restricted.0.classes"
        )
    return Tensors(
        original_train=preprocess(orig.train, cfg.input),
        original_test=preprocess(orig.test, cfg.input),
        restricted_train=preprocess(restr.train, cfg.input),
        restricted_test=preprocess(restr.test, cfg.input),
        num_classes=orig.num_classes,
        names={"original": orig.name, "restricted": [restr.name]},
    )


def new_model(cfg: PipelineConfig, num_classes: int, seed: int) -> torch.nn.Module:
    """A randomly initialised model of the pipeline's architecture (seeded)."""
    from sophon_ray.models import build_classifier

    torch.manual_seed(seed)
    return build_classifier(cfg.arch, num_classes, cfg.input.channels, cfg.input.size)


def original_metric(cfg: PipelineConfig, model: torch.nn.Module, t: Tensors) -> float:
    """Original-domain test accuracy."""
    from sophon_ray.core import accuracy

    return accuracy(model, *t.original_test, batch_size=eval_batch(cfg))


def model_metrics(cfg: PipelineConfig, model: torch.nn.Module, t: Tensors) -> dict[str, float]:
    return {"original_test_accuracy": original_metric(cfg, model, t)}


def pretrain(cfg: PipelineConfig, out: str | Path, log: Log = print, on_metrics: Metrics = _no_metrics) -> Path:
    """Train the unprotected source model on the original domain and write its model directory."""
    t = load_tensors(cfg)
    p = cfg.pretrain
    model = new_model(cfg, t.num_classes, p.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(p.steps, 1))
    g = torch.Generator().manual_seed(p.seed)
    x, y = t.original_train
    start = time.perf_counter()
    model.train()
    for step in range(1, p.steps + 1):
        idx = torch.randint(len(x), (p.batch_size,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 10 == 0 or step == p.steps:
            on_metrics(step, {"train_loss": loss.item()})
        if step % max(p.steps // 5, 1) == 0 or step == p.steps:
            log(f"pretrain {step}/{p.steps} loss {loss.item():.4f}")
    acc = original_metric(cfg, model, t)
    metrics = {"original_test_accuracy": acc, "seconds": round(time.perf_counter() - start, 2)}
    log(f"pretrain done: original test accuracy {acc:.4f}")
    card = make_card(cfg, t, "source", {"config": to_dict(cfg.pretrain), "stage_hash": source_stage_hash(cfg)})
    return cardlib.save_model_dir(out, model, card, metrics)


def load_for(cfg: PipelineConfig, source: str | Path, t: Tensors) -> tuple[torch.nn.Module, dict[str, Any]]:
    model, card = cardlib.load_model(source)
    check_compatible(card, cfg, t.num_classes, str(source))
    return model, card


def build_protection(cfg: PipelineConfig, model: torch.nn.Module, t: Tensors, source_acc: float, **dist: Any):
    """The core `Protection` for a classification pipeline (shared by local and Ray Train runs)."""
    from sophon_ray.core import ClassificationObjective, Protection, ProtectData, get_loss

    objective = ClassificationObjective(get_loss(cfg.protect.loss, cfg.kind))
    data = ProtectData(original=t.original_train, restricted=t.restricted_train)
    return Protection(
        model, cfg.protect, data, objective,
        evaluate_original=lambda: original_metric(cfg, model, t),
        source_value=source_acc, higher_is_better=True, head_keys=head_keys(model), **dist,
    )


def validate_recipe(recipe: Recipe) -> None:
    """Refuse impossible recipes and the UNet strategies (all/up/down) for a classifier."""
    from sophon_ray.core.attack import STRATEGIES, validate_recipe as validate

    validate(recipe)
    if recipe.strategy not in STRATEGIES:
        raise UserError(f"strategy {recipe.strategy!r} is for diffusion UNets; a classifier takes "
                        f"strategy={'|'.join(STRATEGIES)} (e.g. --recipe strategy=initFC-all,optimizer=adam,lr=1e-3)")


def attacker_subset(y: torch.Tensor, per_class: int | None, seed: int) -> torch.Tensor:
    """Indices of the attacker's restricted training images: at most `per_class` of each class.

    Args:
        y: (N,) int64 labels of the restricted training split (any device).
        per_class: images kept per class (all of a class that has fewer); None keeps everything.
        seed: seeds the draw (`attack.seed`), so every subject and trial fine-tunes on the same images.
    Returns:
        (M,) int64 indices into y, ascending, on y's device.
    """
    if per_class is None:
        return torch.arange(len(y), device=y.device)
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise UserError(f"attack.train_per_class must be a positive integer or None, got {per_class!r}")
    labels = y.cpu()
    g = torch.Generator().manual_seed(int(seed))
    keep = []
    for c in torch.unique(labels).tolist():  # ascending classes: the draw order is fixed
        members = torch.nonzero(labels == c).flatten()
        keep.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    if not keep:
        return torch.zeros(0, dtype=torch.int64, device=y.device)
    return torch.sort(torch.cat(keep)).values.to(y.device)


def attacker_train(cfg: PipelineConfig, t: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """The restricted (x, y) the attacker fine-tunes on: `cfg.attack.train_per_class` images per
    class of the restricted training split (all of it when None)."""
    x, y = t.restricted_train
    if cfg.attack.train_per_class is None:
        return x, y
    idx = attacker_subset(y, cfg.attack.train_per_class, cfg.attack.seed)
    return x[idx], y[idx]


def finetune_kwargs(cfg: PipelineConfig, t: Tensors, model: torch.nn.Module, seed: int) -> dict[str, Any]:
    """The classification arguments of `core.attack.finetune`: the attacker's restricted (x, y)
    (`attacker_train`), restricted test accuracy, the model's head (cross-entropy is finetune's
    default loss)."""
    from sophon_ray.core import accuracy

    return {
        "train": attacker_train(cfg, t),
        "evaluate": lambda m: accuracy(m, *t.restricted_test, batch_size=eval_batch(cfg)),
        "head_keys": head_keys(model),
    }


def attack(
    cfg: PipelineConfig,
    model_src: str | Path | None,
    recipe: Recipe,
    seed: int = 0,
    t: Tensors | None = None,
) -> dict[int, float]:
    """One real fine-tuning run on the restricted domain; `model_src=None` attacks a scratch model.

    Returns the restricted test accuracy at each of `cfg.attack.budgets`.
    """
    from sophon_ray.core import finetune

    validate_recipe(recipe)
    t = t or load_tensors(cfg)
    if model_src is None:
        model = new_model(cfg, t.num_classes, 10_000 + seed)
    else:
        model, _ = load_for(cfg, model_src, t)
    torch.manual_seed(seed)
    return finetune(model, recipe, budgets=cfg.attack.budgets, seed=seed, **finetune_kwargs(cfg, t, model, seed))


def get_suite(name: str) -> tuple[Recipe, ...]:
    """A named classification attack suite (see `audit.suites`)."""
    from sophon_ray.audit.suites import get_suite as suite

    return suite(name)


def audit_extras(cfg: PipelineConfig, audit: dict, subjects: dict[str, str | None], out: Path, log: Log,
                 enabled: bool = True, judge_dir: str | Path | None = None) -> None:
    """Nothing to add for classifiers."""
    return None
