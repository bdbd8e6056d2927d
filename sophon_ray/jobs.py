"""Bind a pipeline config to data, models and the core engine: pretrain, protect, attack.

These are the in-process jobs; the Ray Train / Ray Tune layers call the same functions.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sophon_ray import card as cardlib
from sophon_ray.config import PipelineConfig, Recipe, apply_overrides, config_hash, to_dict
from sophon_ray.errors import UserError

Log = Callable[[str], None]


def get_pipeline(name: str, smoke: bool = False, overrides: tuple[str, ...] | list[str] = ()) -> PipelineConfig:
    """The resolved config of a ready pipeline, with `key.path=value` overrides applied."""
    from pipelines import PIPELINES

    if name not in PIPELINES:
        raise UserError(f"unknown pipeline {name!r}; run `sophon-ray pipelines` to list them ({', '.join(PIPELINES)})")
    return apply_overrides(PIPELINES[name].get_config(smoke=smoke), list(overrides))


@dataclass(frozen=True)
class Tensors:
    """Preprocessed tensors of a pipeline: (x, y) pairs for each domain split."""

    original_train: tuple[torch.Tensor, torch.Tensor]
    original_test: tuple[torch.Tensor, torch.Tensor]
    restricted_train: tuple[torch.Tensor, torch.Tensor]
    restricted_test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    names: dict[str, Any]


def load_tensors(cfg: PipelineConfig) -> Tensors:
    """Load the original and (first) restricted domain and preprocess them per `cfg.input`."""
    from sophon_ray.data import load_domain, preprocess

    if len(cfg.restricted) != 1:
        raise UserError("this version protects against exactly one restricted domain; set restricted to a 1-tuple")
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


def head_keys(model: torch.nn.Module) -> tuple[str, ...]:
    from sophon_ray.models import HEAD

    return tuple(k for k, _ in model.named_parameters() if k.startswith(HEAD + "."))


def make_card(cfg: PipelineConfig, t: Tensors, role: str, lineage: dict[str, Any]) -> dict[str, Any]:
    return {
        "kind": cfg.kind,
        "arch": {"name": cfg.arch.name, "kwargs": dict(cfg.arch.kwargs)},
        "num_classes": t.num_classes,
        "input": dataclasses.asdict(cfg.input),
        "pipeline": cfg.name,
        "domains": t.names,
        "role": role,
        "lineage": lineage,
    }


def check_compatible(card: dict[str, Any], cfg: PipelineConfig, num_classes: int, where: str) -> None:
    """Refuse a model whose kind, class count or input spec does not match the pipeline's data."""
    want_in = dataclasses.asdict(cfg.input)
    got_in = {k: (tuple(v) if isinstance(v, list) else v) for k, v in card["input"].items()}
    problems = []
    if card["kind"] != cfg.kind:
        problems.append(f"kind {card['kind']} != {cfg.kind}")
    if card.get("num_classes") != num_classes:
        problems.append(f"{card.get('num_classes')} classes != {num_classes}")
    if got_in != want_in:
        problems.append(f"input {got_in} != {want_in}")
    if problems:
        raise UserError(
            f"model {where} does not match pipeline {cfg.name!r} ({'; '.join(problems)}); "
            "pass a model made by this pipeline, or --set input.../arch... to match the model"
        )


def eval_batch(cfg: PipelineConfig) -> int:
    return cfg.attack.eval_batch


Metrics = Callable[[int, dict[str, float]], None]


def _no_metrics(step: int, metrics: dict[str, float]) -> None:
    return None


def pretrain(cfg: PipelineConfig, out: str | Path, log: Log = print, on_metrics: Metrics = _no_metrics) -> Path:
    """Train the unprotected source model on the original domain and write its model directory.

    `on_metrics(step, metrics)` receives the training loss every 10 steps (e.g. for MLflow).
    """
    from sophon_ray.core import accuracy

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
    acc = accuracy(model, *t.original_test, batch_size=eval_batch(cfg))
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
    from sophon_ray.core import ClassificationObjective, Protection, ProtectData, accuracy, get_loss

    objective = ClassificationObjective(get_loss(cfg.protect.loss, cfg.kind))
    data = ProtectData(original=t.original_train, restricted=t.restricted_train)
    return Protection(
        model, cfg.protect, data, objective,
        evaluate_original=lambda: accuracy(model, *t.original_test, batch_size=eval_batch(cfg)),
        source_value=source_acc, higher_is_better=True, head_keys=head_keys(model), **dist,
    )


def source_stage_hash(cfg: PipelineConfig) -> str:
    """What determines the source model: data, input, architecture and pre-training config."""
    return config_hash((cfg.input, cfg.original, cfg.restricted, cfg.arch, cfg.pretrain))


def protect_stage_hash(cfg: PipelineConfig, source_sha: str, workers: int) -> str:
    """What determines a protected model: the protect config, the data, the source and the worker count."""
    return config_hash((cfg.protect, cfg.input, cfg.restricted)) + f"-{source_sha[:8]}-w{workers}"


def protect(cfg: PipelineConfig, source: str | Path, out: str | Path, log: Log = print,
            on_metrics: Metrics = _no_metrics) -> Path:
    """Run SOPHON in-process on `source` and write the protected model directory.

    `on_metrics(iteration, metrics)` receives every outer iteration's metrics.
    """
    from sophon_ray.core import accuracy, run
    from sophon_ray.core.protect import validate_config

    validate_config(cfg.protect, cfg.kind)
    t = load_tensors(cfg)
    model, src_card = load_for(cfg, source, t)
    source_acc = accuracy(model, *t.original_test, batch_size=eval_batch(cfg))
    prot = build_protection(cfg, model, t, source_acc)
    start = time.perf_counter()
    every = max(cfg.protect.iterations // 10, 1)

    def progress(it: int, m: dict[str, float]) -> None:
        on_metrics(it, m)
        if it % every == 0 or it == cfg.protect.iterations:
            orig = f" orig_acc {m['orig_metric']:.3f}" if "orig_metric" in m else ""
            log(
                f"protect {it}/{cfg.protect.iterations} fts_loss {m['fts_loss']:.3f} sim_acc {m['sim_metric']:.3f} "
                f"ntr_loss {m['ntr_loss']:.3f}{orig} ({time.perf_counter() - start:.1f}s)"
            )

    run(prot, progress)
    acc = accuracy(model, *t.original_test, batch_size=eval_batch(cfg))
    metrics = {
        "original_test_accuracy": acc,
        "source_original_test_accuracy": source_acc,
        "guard_rollbacks": prot.guard.rollbacks,
        "iterations": prot.iteration,
        "seconds": round(time.perf_counter() - start, 2),
    }
    lineage = {"source": {"path": str(source), "sha256": src_card["sha256"]}, "protect": to_dict(cfg.protect),
               "stage_hash": protect_stage_hash(cfg, src_card["sha256"], 0)}
    log(f"protect done: original test accuracy {acc:.4f} (source {source_acc:.4f}), {prot.guard.rollbacks} guard rollbacks")
    return cardlib.save_model_dir(out, model, make_card(cfg, t, "protected", lineage), metrics)


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
    from sophon_ray.core import accuracy, finetune
    from sophon_ray.core.attack import validate_recipe

    validate_recipe(recipe)
    t = t or load_tensors(cfg)
    if model_src is None:
        model = new_model(cfg, t.num_classes, 10_000 + seed)
    else:
        model, _ = load_for(cfg, model_src, t)
    torch.manual_seed(seed)
    return finetune(
        model, recipe, t.restricted_train, cfg.attack.budgets,
        evaluate=lambda m: accuracy(m, *t.restricted_test, batch_size=eval_batch(cfg)),
        head_keys=head_keys(model), seed=seed,
    )
