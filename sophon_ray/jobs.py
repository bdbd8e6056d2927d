"""Bind a pipeline config to data, models and the core engine: pretrain, protect, attack.

These are the in-process jobs; the CLI, the Ray Train / Ray Tune layers and MLflow wrappers
call the same functions. Each entry point below dispatches on `cfg.kind` through the one table
`KINDS` to the module that implements that kind (`classifier_jobs`: accuracy, the attacker
maximises it; `diffusion_jobs`: denoising MSE, the attacker minimises it). Both modules provide
the functions of the `KindJobs` protocol. The pieces both kinds share (tensors, the model card,
compatibility checks, stage hashes) live here.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from sophon_ray.config import PipelineConfig, Recipe, apply_overrides, config_hash, extensions
from sophon_ray.errors import UserError

Log = Callable[[str], None]
Metrics = Callable[[int, dict[str, float]], None]


def _no_metrics(step: int, metrics: dict[str, float]) -> None:
    return None


def get_pipeline(name: str, smoke: bool = False, overrides: tuple[str, ...] | list[str] = ()) -> PipelineConfig:
    """The resolved config of a ready pipeline, with `key.path=value` overrides applied."""
    from pipelines import PIPELINES

    if name not in PIPELINES:
        raise UserError(f"unknown pipeline {name!r}; run `sophon-ray pipelines` to list them ({', '.join(PIPELINES)})")
    cfg = apply_overrides(PIPELINES[name].get_config(smoke=smoke), list(overrides))
    validate(cfg)
    return cfg


def _positive(where: str, value: Any, kind: type = int, zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and value != float("inf")
    ok = ok and (isinstance(value, int) if kind is int else True) and (value >= 0 if zero else value > 0)
    if not ok:
        what = "an integer" if kind is int else "a number"
        raise UserError(f"{where}={value!r}: must be {what} {'>= 0' if zero else '> 0'}; fix it with --set {where}=...")


def validate(cfg: PipelineConfig) -> None:
    """Check a whole pipeline config up front (UserError naming the field): pretraining, input,
    attack budgets and batch, and the protection settings (`core.protect.validate_config`)."""
    from sophon_ray.core.protect import validate_config

    kind(cfg)
    for key in ("steps", "batch_size"):
        _positive(f"pretrain.{key}", getattr(cfg.pretrain, key))
    _positive("pretrain.lr", cfg.pretrain.lr, float)
    _positive("pretrain.weight_decay", cfg.pretrain.weight_decay, float, zero=True)
    _positive("input.channels", cfg.input.channels)
    _positive("input.size", cfg.input.size)
    if {len(cfg.input.mean), len(cfg.input.std)} - {1, cfg.input.channels}:
        raise UserError(f"input.mean/std need 1 or {cfg.input.channels} values (one per channel); got {list(cfg.input.mean)} / "
                        f"{list(cfg.input.std)}")
    for i, sd in enumerate(cfg.input.std):
        _positive(f"input.std[{i}]", sd, float)
    budgets = list(cfg.attack.budgets)
    if not budgets or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in budgets) or budgets != sorted(set(budgets)):
        raise UserError(f"attack.budgets={budgets}: expected increasing positive integers like [25,50,100]")
    _positive("attack.eval_batch", cfg.attack.eval_batch)
    if not cfg.restricted:
        raise UserError("restricted: a pipeline needs at least one restricted domain")
    validate_config(cfg.protect, cfg.kind)


# -- what differs between kinds ------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """How a model kind is measured and attacked, and which module implements its jobs.

    metric: the restricted/original test metric ("accuracy" | "mse"), `label` its short form.
    goal: what the attacker wants of the restricted metric ("max" | "min").
    audit_suite / run_suite / smoke_suite: default attack suites of `audit`, `run`, `run --smoke`.
    epsilon: the default allowed margin of the verdict (in units of the metric).
    min_gap: the default power the control needs (source minus scratch, in units of the metric) for
        a verdict to be `passed` rather than `inconclusive`: five epsilons, so that an advantage
        the protection removed is five times what the verdict tolerates (docs/design.md).
    strategies: attack strategies the search space draws from.
    default_recipe: the attack of `sophon-ray attack` / `samples` without --recipe.
    """

    module: str
    metric: str
    label: str
    goal: str
    audit_suite: str
    run_suite: str
    smoke_suite: str
    epsilon: float
    min_gap: float
    strategies: tuple[str, ...]
    default_recipe: Recipe

    def better(self, a: float, b: float) -> float:
        """The value an attacker prefers of a and b."""
        return max(a, b) if self.goal == "max" else min(a, b)


KINDS: dict[str, Kind] = {
    "classifier": Kind("sophon_ray.classifier_jobs", "accuracy", "acc", "max", "default-v1", "quick-v3", "test-v1",
                       0.02, 0.10, ("direct-all", "direct-FC", "initFC-all", "initFC-FC"), Recipe()),
    "diffusion": Kind("sophon_ray.diffusion_jobs", "mse", "mse", "min", "diffusion-v1", "diffusion-v1",
                      "diffusion-test-v1", 0.005, 0.025, ("all", "up", "down"), Recipe("all", "adam", 1e-3, 16)),
}


def kind(cfg: PipelineConfig) -> Kind:
    """The `Kind` of a pipeline (UserError for an unknown `cfg.kind`)."""
    if cfg.kind not in KINDS:
        raise UserError(f"pipeline {cfg.name!r} has unknown kind {cfg.kind!r}; use one of: {', '.join(KINDS)}")
    return KINDS[cfg.kind]


class KindJobs(Protocol):
    """What a kind's module provides (`classifier_jobs`, `diffusion_jobs`); the dispatchers below
    have the same signatures."""

    def load_tensors(self, cfg: PipelineConfig) -> Tensors: ...
    def new_model(self, cfg: PipelineConfig, num_classes: int, seed: int) -> torch.nn.Module: ...
    def load_for(self, cfg: PipelineConfig, source: str | Path, t: Tensors) -> tuple[torch.nn.Module, dict]: ...
    def original_metric(self, cfg: PipelineConfig, model: torch.nn.Module, t: Tensors) -> float: ...
    def model_metrics(self, cfg: PipelineConfig, model: torch.nn.Module, t: Tensors) -> dict[str, float]: ...
    def build_protection(self, cfg: PipelineConfig, model: torch.nn.Module, t: Tensors, source_value: float,
                         **dist: Any) -> Any: ...
    def pretrain(self, cfg: PipelineConfig, out: str | Path, log: Log, on_metrics: Metrics) -> Path: ...
    def validate_recipe(self, recipe: Recipe) -> None: ...
    def attack(self, cfg: PipelineConfig, model_src: str | Path | None, recipe: Recipe, seed: int,
               t: Tensors | None) -> dict[int, float]: ...
    def finetune_kwargs(self, cfg: PipelineConfig, t: Tensors, model: torch.nn.Module, seed: int) -> dict[str, Any]: ...
    def get_suite(self, name: str) -> tuple[Recipe, ...]: ...
    def audit_extras(self, cfg: PipelineConfig, audit: dict, subjects: dict[str, str | None], out: Path,
                     log: Log, enabled: bool, judge_dir: str | Path | None) -> dict | None: ...


def impl(cfg: PipelineConfig) -> KindJobs:
    """The module implementing the jobs of `cfg.kind` (imported on first use)."""
    return importlib.import_module(kind(cfg).module)  # type: ignore[return-value]


# -- shared pieces ------------------------------------------------------------------------


@dataclass(frozen=True)
class Tensors:
    """Preprocessed tensors of a pipeline: (x, y) pairs for each domain split."""

    original_train: tuple[torch.Tensor, torch.Tensor]
    original_test: tuple[torch.Tensor, torch.Tensor]
    restricted_train: tuple[torch.Tensor, torch.Tensor]
    restricted_test: tuple[torch.Tensor, torch.Tensor]
    num_classes: int
    names: dict[str, Any]


def head_keys(model: torch.nn.Module) -> tuple[str, ...]:
    from sophon_ray.models import HEAD

    return tuple(k for k, _ in model.named_parameters() if k.startswith(HEAD + "."))


def make_card(cfg: PipelineConfig, t: Tensors, role: str, lineage: dict[str, Any]) -> dict[str, Any]:
    """The model.json fields of a model made from `cfg`; `lineage` gains this process's
    `cardlib.environment()` unless it names the environment already (Ray Train: the workers')."""
    from sophon_ray import card as cardlib

    lineage = {**lineage, "environment": lineage.get("environment") or cardlib.environment()}
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
    """Refuse a model whose kind, architecture, class count or input spec does not match the
    pipeline's (the audit's scratch baseline is built from the pipeline's arch)."""
    want_in = dataclasses.asdict(cfg.input)
    got_in = {k: (tuple(v) if isinstance(v, list) else v) for k, v in card["input"].items()}
    problems = []
    if card["kind"] != cfg.kind:
        problems.append(f"kind {card['kind']} != {cfg.kind}")
    arch = card.get("arch") or {}
    if arch.get("name") != cfg.arch.name or dict(arch.get("kwargs") or {}) != dict(cfg.arch.kwargs):
        # the audit's scratch baseline is the pipeline's arch: another arch would be compared unfairly
        problems.append(f"arch {arch.get('name')} {dict(arch.get('kwargs') or {})} != {cfg.arch.name} {dict(cfg.arch.kwargs)}")
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


def source_stage_hash(cfg: PipelineConfig) -> str:
    """What determines the source model: data, input, architecture and pre-training config."""
    return config_hash((cfg.input, cfg.original, cfg.restricted, cfg.arch, cfg.pretrain))


def protect_stage_hash(cfg: PipelineConfig, source_sha: str, workers: int) -> str:
    """What determines a protected model: the protect config (and kind extensions such as
    `diffusion`), the data, the source and the worker count."""
    return config_hash((cfg.protect, cfg.input, cfg.restricted, *extensions(cfg))) + f"-{source_sha[:8]}-w{workers}"


# -- the entry points: one line each, dispatched by kind ------------------------------------


def load_tensors(cfg: PipelineConfig) -> Tensors:
    """Load the original and (first) restricted domain, preprocessed per `cfg.input`."""
    return impl(cfg).load_tensors(cfg)


def new_model(cfg: PipelineConfig, num_classes: int, seed: int) -> torch.nn.Module:
    """A randomly initialised model of the pipeline's architecture (seeded); a UNet ignores num_classes."""
    return impl(cfg).new_model(cfg, num_classes, seed)


def load_for(cfg: PipelineConfig, source: str | Path, t: Tensors) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a model directory / URI and refuse one that does not fit the pipeline's data."""
    return impl(cfg).load_for(cfg, source, t)


def original_metric(cfg: PipelineConfig, model: torch.nn.Module, t: Tensors) -> float:
    """The original-domain test metric of `model` (the guard's quantity)."""
    return impl(cfg).original_metric(cfg, model, t)


def model_metrics(cfg: PipelineConfig, model: torch.nn.Module, t: Tensors) -> dict[str, float]:
    """The final test metrics a protected model's metrics.json records, e.g. original_test_<metric>."""
    return impl(cfg).model_metrics(cfg, model, t)


def build_protection(cfg: PipelineConfig, model: torch.nn.Module, t: Tensors, source_value: float, **dist: Any):
    """The core `Protection` of the pipeline (shared by local and Ray Train runs)."""
    return impl(cfg).build_protection(cfg, model, t, source_value, **dist)


def pretrain(cfg: PipelineConfig, out: str | Path, log: Log = print, on_metrics: Metrics = _no_metrics) -> Path:
    """Train the unprotected source model on the original domain and write its model directory.

    `on_metrics(step, metrics)` receives the training loss every 10 steps (e.g. for MLflow).
    """
    return impl(cfg).pretrain(cfg, out, log=log, on_metrics=on_metrics)


def protect(cfg: PipelineConfig, source: str | Path, out: str | Path, log: Log = print,
            on_metrics: Metrics = _no_metrics) -> Path:
    """Run SOPHON in-process on `source` and write the protected model directory.

    `on_metrics(iteration, metrics)` receives every outer iteration's metrics. The same loop for
    every kind: only the tensors, the model check, the metric and the `Protection` differ.
    """
    import time

    from sophon_ray import card as cardlib
    from sophon_ray.config import to_dict
    from sophon_ray.core import run
    from sophon_ray.core.protect import validate_config

    validate_config(cfg.protect, cfg.kind)
    k = kind(cfg)
    digits = 3 if k.metric == "accuracy" else 4
    t = load_tensors(cfg)
    model, src_card = load_for(cfg, source, t)
    source_value = original_metric(cfg, model, t)
    prot = build_protection(cfg, model, t, source_value)
    start = time.perf_counter()
    every = max(cfg.protect.iterations // 10, 1)

    def progress(it: int, m: dict[str, float]) -> None:
        on_metrics(it, m)
        if it % every == 0 or it == cfg.protect.iterations:
            fts = f" fts_loss {m['fts_loss']:.{digits}f} sim_{k.label} {m['sim_metric']:.{digits}f}" if "fts_loss" in m else ""
            ntr = f" ntr_loss {m['ntr_loss']:.{digits}f}" if "ntr_loss" in m else ""
            orig = f" orig_{k.label} {m['orig_metric']:.{digits}f}" if "orig_metric" in m else ""
            log(f"protect {it}/{cfg.protect.iterations}{fts}{ntr}{orig} ({time.perf_counter() - start:.1f}s)")

    run(prot, progress)
    final = model_metrics(cfg, model, t)
    metrics = {
        **final, f"source_original_test_{k.metric}": source_value,
        "guard_rollbacks": prot.guard.rollbacks, "iterations": prot.iteration,
        "seconds": round(time.perf_counter() - start, 2),
    }
    lineage = {"source": {"path": cardlib.lineage_path(source), "sha256": src_card["sha256"]},
               "protect": to_dict(cfg.protect), "stage_hash": protect_stage_hash(cfg, src_card["sha256"], 0)}
    log(f"protect done: original test {k.metric} {final[f'original_test_{k.metric}']:.4f} "
        f"(source {source_value:.4f}), {prot.guard.rollbacks} guard rollbacks")
    return cardlib.save_model_dir(out, model, make_card(cfg, t, "protected", lineage), metrics)


def validate_recipe(cfg: PipelineConfig, recipe: Recipe) -> None:
    """UserError for a recipe this kind of model cannot take (e.g. a head strategy for a UNet)."""
    impl(cfg).validate_recipe(recipe)


def attack(cfg: PipelineConfig, model_src: str | Path | None, recipe: Recipe, seed: int = 0,
           t: Tensors | None = None) -> dict[int, float]:
    """One real fine-tuning run on the restricted domain; `model_src=None` attacks a scratch model.

    Returns the restricted test metric (`kind(cfg).metric`) at each of `cfg.attack.budgets`.
    """
    return impl(cfg).attack(cfg, model_src, recipe, seed=seed, t=t)


def finetune_kwargs(cfg: PipelineConfig, t: Tensors, model: torch.nn.Module, seed: int) -> dict[str, Any]:
    """The kind-specific arguments of `core.attack.finetune` (train, evaluate, head_keys[, loss_fn])."""
    return impl(cfg).finetune_kwargs(cfg, t, model, seed)


def get_suite(cfg: PipelineConfig, name: str | None) -> tuple[Recipe, ...]:
    """A named attack suite for the pipeline's kind (None: the kind's audit default)."""
    return impl(cfg).get_suite(name or kind(cfg).audit_suite)


def audit_extras(cfg: PipelineConfig, audit: dict[str, Any], subjects: dict[str, str | None], out: Path,
                 log: Log = print, enabled: bool = True, judge_dir: str | Path | None = None) -> dict[str, Any] | None:
    """Kind-specific additions to an audit directory (diffusion: sample grids and the judge
    metric in `samples.json`, the judge cached in `judge_dir`); returns what was written (None: nothing)."""
    return impl(cfg).audit_extras(cfg, audit, subjects, out, log, enabled, judge_dir)
