"""Real fine-tuning attacks: strategy x optimizer x lr x batch x weight decay x schedule.

Strategies (NTLBench names): `direct-all` keeps the head and trains everything, `direct-FC`
keeps the head and trains only it, `initFC-all` re-initialises the head and trains everything,
`initFC-FC` re-initialises the head and trains only it (a linear probe; the frozen features run
in eval mode so their BatchNorm statistics stay those of the published model).

Two more classifier strategies undo obfuscation before fine-tuning like `direct-all` (head kept,
every weight trained), so that a model cannot pass an audit by re-scaling its weights:

- `renorm-all`: a function-preserving re-normalisation. Every convolution or linear layer that
  feeds a BatchNorm is re-scaled to unit L2 norm per output channel and the BatchNorm compensates
  (running_mean x s, running_var x s^2, and gamma absorbs the eps term), so the eval-mode function
  is unchanged up to float rounding; train-mode BatchNorm is scale-invariant anyway (up to eps).
  A model whose BN-fed weights were multiplied by 10 (an SGD attacker then moves them 100x slower
  relative to their size) is put back on the scale an attacker's optimizer expects.
  Pairing rule (`bn_pairs`): trace the model with torch.fx; a pair is a BatchNorm{1,2,3}d (affine,
  with running statistics) whose only input is the output of a Conv{1,2,3}d or nn.Linear module
  call, where that output is read by nothing else and both modules are called once. Layers it
  cannot pair (a conv followed by ReLU or a residual sum, a BN fed by a pooling layer, transposed
  convs, shared modules, BN without running statistics or without affine) are left as they are;
  a model without BatchNorm is fine-tuned exactly like `direct-all`. A model torch.fx cannot trace
  is refused with a UserError (a failed trial), never silently attacked as `direct-all`.
- `bnrecal-all`: every BatchNorm's running statistics are recomputed on the attacker's training
  data first (reset, then one train-mode forward pass over it in batches of the recipe's
  batch size, cumulative average), parameters untouched; then `direct-all`.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from sophon_ray.config import Recipe
from sophon_ray.core.inner import fresh_head, lr_factor  # lr_factor: the inner loop follows the same schedules
from sophon_ray.errors import UserError

HEAD_STRATEGIES = ("direct-all", "direct-FC", "initFC-all", "initFC-FC")  # NTLBench's four
PREPROCESSING = ("renorm-all", "bnrecal-all")  # undo obfuscation first, then like direct-all
STRATEGIES = HEAD_STRATEGIES + PREPROCESSING  # every classifier strategy
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


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_FEEDERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(feeder, batchnorm) module paths that `renorm-all` re-scales (the rule: module docstring).

    Args:
        model: any torch.fx-traceable module.
    Returns:
        [(conv or linear path, BatchNorm path)] in graph order; UserError if torch.fx cannot trace it.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # fx raises TraceError, TypeError, ... on data-dependent control flow
        raise UserError(f"strategy renorm-all traces the model with torch.fx to find the layers feeding a "
                        f"BatchNorm, and {type(model).__name__} cannot be traced ({str(e)[:160]}); "
                        "use strategy=direct-all or bnrecal-all for this model") from None
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), _NORMS):
            continue
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        bn = model.get_submodule(node.target)
        if (isinstance(model.get_submodule(src.target), _FEEDERS) and len(src.users) == 1
                and calls[src.target] == 1 and calls[node.target] == 1 and bn.affine and bn.running_var is not None):
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def renormalize_(model: nn.Module) -> list[tuple[str, str]]:
    """`renorm-all`'s preprocessing, in place: each BN-fed conv/linear to unit norm per output channel,
    its BatchNorm compensated so the eval-mode function is unchanged.

    Args:
        model: the model to re-normalise (any mode; left in its mode).
    Returns:
        The (feeder, batchnorm) pairs re-scaled (`bn_pairs`).
    """
    pairs = bn_pairs(model)
    for feeder_path, bn_path in pairs:
        feeder, bn = model.get_submodule(feeder_path), model.get_submodule(bn_path)
        w = feeder.weight  # (out, in/groups, *kernel) or (out, in)
        norm = w.flatten(1).norm(dim=1)  # (out,)
        s = torch.where(norm > 0, 1.0 / norm.clamp_min(1e-30), torch.ones_like(norm))  # zero channels stay
        w.mul_(s.view(-1, *([1] * (w.dim() - 1))))
        if feeder.bias is not None:
            feeder.bias.mul_(s)
        # eval BN: gamma (y - mean) / sqrt(var + eps) + beta. With y' = s y, mean' = s mean and
        # var' = s^2 var, gamma' = gamma sqrt(var' + eps) / (s sqrt(var + eps)) gives the same output.
        var, eps = bn.running_var, bn.eps
        new_var = var * s**2
        bn.weight.mul_(torch.sqrt((new_var + eps) / (s**2 * (var + eps))))
        bn.running_mean.mul_(s)
        bn.running_var.copy_(new_var)
    return pairs


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, x: torch.Tensor, batch_size: int) -> int:
    """`bnrecal-all`'s preprocessing, in place: every BatchNorm's running statistics recomputed on `x`.

    Args:
        model: the model (left in its mode; parameters untouched).
        x: (N, ...) the attacker's training inputs, passed in order in batches of `batch_size`
            (a last batch of fewer than 2 is skipped: train-mode BN needs 2 values per channel).
        batch_size: the recipe's batch size.
    Returns:
        How many BatchNorm layers were recomputed (0 for a model without BatchNorm).
    """
    bns = [m for m in model.modules() if isinstance(m, _NORMS) and m.track_running_stats]
    if not bns:
        return 0
    if len(x) < 2:
        raise UserError(f"strategy bnrecal-all needs at least 2 attacker training images, got {len(x)}")
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches
    model.train()
    try:
        for i in range(0, len(x), batch_size):
            if len(x[i : i + batch_size]) >= 2:
                model(x[i : i + batch_size])
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.train(was_training)
    return len(bns)


def prepare(model: torch.nn.Module, recipe: Recipe, head_keys: tuple[str, ...], seed: int,
            train: tuple[torch.Tensor, ...] | None = None) -> list[torch.Tensor]:
    """Apply the strategy to `model` in place; return the parameters the attacker trains.

    `train` (the attacker's tensors, inputs first) is needed by `bnrecal-all` only.
    """
    if recipe.strategy == "renorm-all":
        renormalize_(model)
    elif recipe.strategy == "bnrecal-all":
        if train is None:
            raise UserError("strategy bnrecal-all recomputes BatchNorm statistics on the attacker's data; pass train")
        recalibrate_bn_(model, train[0], recipe.batch_size)
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
    params = prepare(model, recipe, head_keys, seed, train)
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
