"""The audit trial: one real fine-tuning attack as a Ray Tune function trainable.

A trial attacks one subject (the protected model, a scratch model, or the unprotected
original) with one recipe and seed, and calls `ray.tune.report` at every step budget with:

- `steps`, `value`: the budget just reached (in the suite's unit: optimizer steps, or epochs for a
  protocol suite such as paper-v1) and the restricted test metric there (accuracy, or
  denoising MSE for diffusion; NaN when the fine-tuned model diverged);
- `best`: the attacker's best value so far, max accuracy or min MSE (±inf while every value so
  far diverged);
- `score`: the mean of the finite values so far, over budgets (what the planner ranks and Optuna
  optimises: `best` saturates on easy benchmarks, e.g. at 0.994 for nearly every digits recipe by
  50-100 steps, and says nothing about the early budgets where protection is decided; ±inf while
  every value so far diverged);
- `curve`: {"<steps>": value} for every budget reached so far (the last report holds all; a
  diverged budget is null: a diverged run gives the attacker nothing);
- `detail`: {"<steps>": {bucket: value}} where the kind breaks its metric down (diffusion: the
  denoising MSE per timestep bucket, `core.diffusion.mse_buckets`); empty otherwise;
- `train_images`, `step_budgets`: how many restricted images the attacker trains on and the
  budgets in optimizer steps (equal to the budgets unless the suite counts epochs);
- `compute_s`: seconds spent fine-tuning and evaluating so far, measured inside the trial
  (excludes data loading, model loading and the reports themselves), so that
  wall - sum(compute_s) is the audit's scheduling overhead.

Pipeline tensors and loaded models are cached in module-level dicts, so a reused actor
(`reuse_actors=True`) loads them once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from sophon_ray import tasks
from sophon_ray.config import PipelineConfig, Recipe, to_dict

_TENSORS: dict[tuple[str, str], tasks.Tensors] = {}
_MODELS: dict[tuple[str, str], torch.nn.Module] = {}


def data_key(cfg: PipelineConfig) -> str:
    """Hash of what determines a pipeline's tensors (domains and input spec)."""
    blob = json.dumps([to_dict(cfg.input), to_dict(cfg.original), [to_dict(d) for d in cfg.restricted]], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _device() -> str:
    import ray

    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


def cached_tensors(cfg: PipelineConfig, device: str = "cpu") -> tasks.Tensors:
    """The pipeline's tensors, loaded once per process and device.

    Args:
        cfg: the pipeline config.
        device: "cpu" or "cuda".
    Returns:
        The preprocessed tensors (on `device`).
    """
    key = (data_key(cfg), device)
    if key not in _TENSORS:
        t = tasks.of(cfg).load_tensors()
        if device != "cpu":
            moved = {f: tuple(x.to(device) for x in getattr(t, f))
                     for f in ("original_train", "original_test", "restricted_train", "restricted_test")}
            t = tasks.Tensors(**moved, num_classes=t.num_classes, names=t.names)
        _TENSORS[key] = t
    return _TENSORS[key]


def subject_model(cfg: PipelineConfig, path: str | None, t: tasks.Tensors, seed: int, device: str) -> torch.nn.Module:
    """A fresh copy of the subject's model: loaded once per process, or a seeded scratch model.

    Args:
        cfg: the pipeline config.
        path: the model directory, or None for a scratch model.
        t: the pipeline tensors (for the class count).
        seed: the trial seed (scratch models are seeded 10000 + seed, as in `Task.attack`).
        device: where the model goes.
    Returns:
        A module the trial may modify.
    """
    if path is None:
        return tasks.of(cfg).new_model(t.num_classes, 10_000 + seed).to(device)
    key = (str(path), device)
    if key not in _MODELS:
        _MODELS[key] = tasks.of(cfg).load_for(path, t)[0].to(device)
    return copy.deepcopy(_MODELS[key])


def _maybe_fault(config: dict[str, Any]) -> None:
    """Test-only failure injection: mode "always" fails every attempt, "once" only the first
    (a marker file at fault["marker"], on the driver's filesystem, records that it failed)."""
    fault = config.get("fault")
    if not fault:
        return
    marker = Path(fault["marker"])
    if fault["mode"] == "always" or not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"injected fault in trial {config['id']} (test-only, fault={fault['mode']})")


def attack_trial(config: dict[str, Any], *, cfg: PipelineConfig, subjects: dict[str, str | None],
                 protocol: tasks.SuiteProtocol = tasks.STEPS_PROTOCOL) -> None:
    """Tune function trainable: run one attack and report at every budget of `cfg.attack.budgets`.

    Args:
        config: {"id", "subject", "index", "recipe" (Recipe fields), "seed", "fault"} from the planner.
        cfg: the pipeline config (budgets and attacker data already resolved), bound with
            `tune.with_parameters`.
        subjects: subject name -> model directory (None for scratch).
        protocol: the suite's protocol: budgets in steps or epochs (an epoch = floor(images / batch)
            steps), and which part of the kind's metric breakdown is the value (`metric_key`).
    """
    from ray import tune

    from sophon_ray.core import finetune

    _maybe_fault(config)
    device = _device()
    t = cached_tensors(cfg, device)
    seed = int(config["seed"])
    model = subject_model(cfg, subjects[config["subject"]], t, seed, device)
    task = tasks.of(cfg)
    metric = task.metric
    torch.manual_seed(seed)
    state = {"compute": 0.0, "mark": time.perf_counter(), "best": metric.worst,
             "curve": {}, "detail": {}}
    detail: dict[str, float] = {}  # the kind's breakdown of the last evaluation (diffusion: timestep buckets)

    recipe = Recipe(**config["recipe"])
    task.validate_recipe(recipe)
    kwargs = task.finetune_kwargs(t, model, seed, detail)
    images = len(kwargs["train"][0])
    step_budgets = protocol.epochs_to_steps(tuple(cfg.attack.budgets), images, recipe.batch_size)
    budget_of = dict(zip(step_budgets, cfg.attack.budgets))  # optimizer steps -> the suite's budget (steps or epochs)

    def on_budget(step: int, value: float) -> None:
        steps = budget_of[step]
        if protocol.metric_key is not None:
            value = detail.get(protocol.metric_key, math.nan)
        state["compute"] += time.perf_counter() - state["mark"]
        finite = math.isfinite(value)
        if finite:
            state["best"] = metric.better(state["best"], value)
        state["curve"][str(steps)] = value if finite else None
        if detail:
            state["detail"][str(steps)] = {k: (v if math.isfinite(v) else None) for k, v in detail.items()}
        values = [v for v in state["curve"].values() if v is not None]
        score = sum(values) / len(values) if values else metric.worst
        tune.report({"steps": steps, "value": value, "best": state["best"], "score": score,
                     "curve": dict(state["curve"]), "detail": dict(state["detail"]), "compute_s": state["compute"],
                     "train_images": images, "step_budgets": list(step_budgets)})
        state["mark"] = time.perf_counter()

    finetune(model, recipe, budgets=step_budgets, seed=seed, on_budget=on_budget, **kwargs)
