"""Tasks: the one place that knows model kinds. `of(cfg)` gives the `Task` of a pipeline config.

`TASKS` is the only kind registry (classifier, diffusion); pipelines come from
`sophon_ray.pipelines` through `get_pipeline`, validated here before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sophon_ray.config import PipelineConfig, apply_overrides
from sophon_ray.errors import UserError
from sophon_ray.tasks.base import (
    ACCURACY, METRICS, MSE, STEPS_PROTOCOL, TASKS, Log, Metric, Metrics, SuiteProtocol, Task, Tensors, head_keys,
    load_model, metric_named, no_metrics, task_class,
)

__all__ = ["ACCURACY", "METRICS", "MSE", "Log", "Metric", "Metrics", "STEPS_PROTOCOL", "SuiteProtocol", "Task",
           "Tensors", "TASKS", "get_pipeline",
           "head_keys", "load_model", "metric_named", "no_metrics", "of", "task_class", "validate"]

def of(cfg: PipelineConfig) -> Task:
    """The task of a pipeline config."""
    return task_class(cfg.kind, f"pipeline {cfg.name!r}")(cfg)


def get_pipeline(name: str | Path, smoke: bool = False, overrides: tuple[str, ...] | list[str] = ()) -> PipelineConfig:
    """The resolved, validated config of a bundled pipeline (by name) or a pipeline file (.py or
    .yaml, see `pipelines.load`), with `key.path=value` overrides applied."""
    from sophon_ray.pipelines import load

    cfg = apply_overrides(load(name, smoke), list(overrides))
    validate(cfg)
    return cfg


def _positive(where: str, value: Any, kind: type = int, zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and value != float("inf")
    ok = ok and (isinstance(value, int) if kind is int else True) and (value >= 0 if zero else value > 0)
    if not ok:
        what = "an integer" if kind is int else "a number"
        raise UserError(f"{where}={value!r}: must be {what} {'>= 0' if zero else '> 0'}; fix it with --set {where}=...")


def validate(cfg: PipelineConfig) -> None:
    """Check a whole pipeline config up front (UserError naming the field): kind, pretraining,
    input, attack budgets and batch, the protection settings (`core.protect.validate_config`) and
    the kind's own checks (`Task.check`)."""
    from sophon_ray.core.protect import validate_config

    task = of(cfg)
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
    if len(cfg.restricted) != 1:
        raise UserError("this version protects against exactly one restricted domain; set restricted to a 1-tuple")
    validate_config(cfg.protect, cfg.kind)
    task.check()
