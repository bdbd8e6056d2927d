"""Real fine-tuning attacks: strategy x optimizer x lr x batch x weight decay x schedule.

Strategies (NTLBench names): `direct-all` keeps the head and trains everything, `direct-FC`
keeps the head and trains only it, `initFC-all` re-initialises the head and trains everything,
`initFC-FC` re-initialises the head and trains only it (a linear probe; the frozen features run
in eval mode so their BatchNorm statistics stay those of the published model).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from sophon_ray.config import Recipe
from sophon_ray.core.inner import fresh_head
from sophon_ray.errors import UserError

STRATEGIES = ("direct-all", "direct-FC", "initFC-all", "initFC-FC")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop", "adagrad", "adadelta")
SCHEDULES = ("constant", "cosine", "warmup")
# Diffusion UNets (no head): `all` trains everything, `up` only up_blocks.*, `down` only down_blocks.*.
DIFFUSION_STRATEGIES = ("all", "up", "down")
_DIFFUSION_PREFIX = {"all": "", "up": "up_blocks.", "down": "down_blocks."}


def validate_recipe(recipe: Recipe) -> None:
    """Raise UserError naming the fix for an impossible recipe."""
    if recipe.strategy not in STRATEGIES + DIFFUSION_STRATEGIES:
        raise UserError(f"unknown attack strategy {recipe.strategy!r}; use one of: {', '.join(STRATEGIES)} "
                        f"(classifiers) or {', '.join(DIFFUSION_STRATEGIES)} (diffusion)")
    if recipe.optimizer not in OPTIMIZERS:
        raise UserError(f"unknown attack optimizer {recipe.optimizer!r}; use one of: {', '.join(OPTIMIZERS)}")
    if recipe.schedule not in SCHEDULES:
        raise UserError(f"unknown lr schedule {recipe.schedule!r}; use one of: {', '.join(SCHEDULES)}")
    if not recipe.lr > 0 or recipe.batch_size < 1 or recipe.weight_decay < 0:
        raise UserError("attack recipe needs lr > 0, batch_size >= 1 and weight_decay >= 0")


def make_optimizer(name: str, params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """A torch.optim optimizer by attack name."""
    wd = weight_decay
    table: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "sgd": lambda: torch.optim.SGD(params, lr=lr, weight_decay=wd),
        "momentum": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd),
        "nesterov": lambda: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=wd),
        "adam": lambda: torch.optim.Adam(params, lr=lr, weight_decay=wd),
        "adamw": lambda: torch.optim.AdamW(params, lr=lr, weight_decay=wd),
        "rmsprop": lambda: torch.optim.RMSprop(params, lr=lr, weight_decay=wd),
        "adagrad": lambda: torch.optim.Adagrad(params, lr=lr, weight_decay=wd),
        "adadelta": lambda: torch.optim.Adadelta(params, lr=lr, weight_decay=wd),
    }
    if name not in table:
        raise UserError(f"unknown attack optimizer {name!r}; use one of: {', '.join(OPTIMIZERS)}")
    return table[name]()


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the base lr at `step` (0-based) of `total`: constant, cosine, or warm-up+cosine."""
    if schedule == "constant":
        return 1.0
    if schedule == "warmup" and step < warmup:
        return (step + 1) / warmup
    start = warmup if schedule == "warmup" else 0
    frac = (step - start) / max(total - start, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


def prepare(model: torch.nn.Module, recipe: Recipe, head_keys: tuple[str, ...], seed: int) -> list[torch.Tensor]:
    """Apply the strategy to `model` in place; return the parameters the attacker trains."""
    named = dict(model.named_parameters())
    if recipe.strategy in DIFFUSION_STRATEGIES:
        trained = [k for k in named if k.startswith(_DIFFUSION_PREFIX[recipe.strategy])]
        if not trained:
            raise UserError(f"strategy {recipe.strategy!r} trains {_DIFFUSION_PREFIX[recipe.strategy]}* but the model "
                            f"has no such parameters; use {', '.join(STRATEGIES)} for a classifier")
        for k, p in named.items():
            p.requires_grad_(k in trained)
        return [named[k] for k in trained]
    if recipe.strategy.startswith("initFC"):
        new = fresh_head(named, head_keys, torch.Generator().manual_seed(seed))
        with torch.no_grad():
            for k, v in new.items():
                named[k].copy_(v)
    if recipe.strategy.endswith("-FC"):
        for k, p in named.items():
            p.requires_grad_(k in head_keys)
        return [named[k] for k in head_keys]
    for p in named.values():
        p.requires_grad_(True)
    return list(named.values())


def _set_mode(model: torch.nn.Module, recipe: Recipe, head_keys: tuple[str, ...]) -> None:
    model.train()
    if recipe.strategy.endswith("-FC"):
        model.eval()  # frozen features: BN uses running statistics, as in a linear probe


def finetune(
    model: torch.nn.Module,
    recipe: Recipe,
    train: tuple[torch.Tensor, ...],
    budgets: tuple[int, ...],
    evaluate: Callable[[torch.nn.Module], float],
    head_keys: tuple[str, ...],
    seed: int = 0,
    loss_fn: Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], torch.Tensor] | None = None,
    on_budget: Callable[[int, float], None] | None = None,
) -> dict[int, float]:
    """Fine-tune `model` in place with `recipe` and measure `evaluate` at each step budget.

    Args:
        model: the starting model (protected, source, or random init).
        recipe: the attack recipe.
        train: restricted training tensors, e.g. (x, y); batches are drawn epoch by epoch.
        budgets: increasing optimizer-step counts at which to evaluate.
        evaluate: the restricted test metric of a model (accuracy or MSE).
        head_keys: head parameter names.
        seed: seeds head re-initialisation and batch order.
        loss_fn: training loss on a batch; cross-entropy on (x, y) by default.
        on_budget: called with (steps, value) as each budget is reached.
    Returns:
        {steps: metric} for every budget.
    """
    validate_recipe(recipe)
    if not budgets or any(b <= 0 for b in budgets) or list(budgets) != sorted(set(budgets)):
        raise UserError(f"budgets must be increasing positive integers, got {list(budgets)}")
    loss_fn = loss_fn or (lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    params = prepare(model, recipe, head_keys, seed)
    opt = make_optimizer(recipe.optimizer, params, recipe.lr, recipe.weight_decay)
    total = budgets[-1]
    g = torch.Generator().manual_seed(seed + 1)
    n = len(train[0])
    order = torch.randperm(n, generator=g)
    pos, curve = 0, {}
    _set_mode(model, recipe, head_keys)
    for step in range(total):
        if pos + recipe.batch_size > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos : pos + recipe.batch_size]
        pos += recipe.batch_size
        for group in opt.param_groups:
            group["lr"] = recipe.lr * lr_factor(recipe.schedule, step, total, recipe.warmup_steps)
        loss = loss_fn(model, tuple(t[idx] for t in train))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step + 1 in budgets:
            value = evaluate(model)
            _set_mode(model, recipe, head_keys)
            curve[step + 1] = value
            if on_budget:
                on_budget(step + 1, value)
    for p in model.parameters():
        p.requires_grad_(True)
    return curve
