"""Batched FTS environments: E simulated fine-tunings in one vmapped pass (first order).

`first_order_meta_grad` runs one environment at a time. Environments that draw batches of the
same shapes and train the same parameters can share every forward/backward pass instead: their
fast weights are stacked along a new leading dimension (E, ...) and the model runs once per
inner step under `torch.func.vmap` over `torch.func.functional_call` (the torch.func
model-ensembling / MAML pattern). Each environment keeps its own BatchNorm buffers (stacked
copies, updated per environment in train mode, discarded afterwards, as the sequential path
does with its private copy), its own batches, its own head re-initialisation and its own lr.

The inner optimizers are inner.py's own classes, applied with their in-place `step_` to the
stacked tensors of all environments of one optimizer family at once (their maths is
elementwise). Every inner update is `p <- p - lr * d(grads, state)` with a direction `d` that
does not depend on lr, so each family runs its `step_` at lr = 1 on zero tensors to get `-d`
and the per-environment lr is applied afterwards as a (E, 1, ..., 1) tensor.

Where batching would be wrong or unsupported the sequential loop runs instead, decided up front
and recorded with a reason in the plan (`plan_batches`): second-order meta-gradients, objectives
other than `ClassificationObjective` (the metric cannot be taken inside vmap), layers outside a
known-safe list (e.g. dropout in train mode: vmap cannot reproduce the sequential random draws;
SyncBatchNorm), groups of a single environment, environments with an lr schedule or weight
decay (fed-back audit recipes, core/feedback.py), and the long-horizon terms of core/horizon.py
(`protect.tail_weight` / `protect.curv_weight`; sequential only).

`meta_grad_sum` has the contract of fts_step's loop in protect.py: the sum over environments of
their meta-gradients, and the (sum loss, sum metric, count) statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from sophon_ray.core.horizon import Horizon
from sophon_ray.core.inner import (
    Batch, Environment, Objective, Params, _trained, fresh_head, make_inner_optimizer, meta_grad_fn,
)
from sophon_ray.core.objectives import ClassificationObjective
from sophon_ray.errors import UserError

MODES = ("auto", "sequential", "batched")

# Leaf module types whose forward batches correctly under vmap with per-environment weights and
# buffers (BatchNorm: per-environment running statistics). Containers are not checked: their
# forward only composes leaves with tensor ops.
_SAFE_LEAVES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Softmax,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity,
)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)


@dataclass(frozen=True)
class Job:
    """One environment to simulate: its recipe, K support and K query batches, head-init RNG."""

    env: Environment
    support: Sequence[Batch]
    query: Sequence[Batch]
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class Group:
    """Jobs (indices into the job list) run together (`batched`) or one by one, and why."""

    jobs: tuple[int, ...]
    batched: bool
    reason: str


def model_blocker(model: nn.Module) -> str | None:
    """Why `model` cannot run batched environments under vmap (None when it can)."""
    for name, m in model.named_modules():
        if isinstance(m, nn.SyncBatchNorm):
            return f"SyncBatchNorm at {name!r}"
        if isinstance(m, _DROPOUT):
            if m.training and m.p > 0:
                return f"dropout in train mode at {name!r} (vmap cannot reproduce the sequential random draws)"
            continue
        if next(m.children(), None) is None and not isinstance(m, _SAFE_LEAVES):
            return f"layer {type(m).__name__} at {name!r} is not in the vmap-safe list"
    return None


def _shapes(batch: Batch) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in batch)


def plan_batches(model: nn.Module, jobs: Sequence[Job], objective: Objective, order: str = "first",
                 mode: str = "auto", horizon: Horizon | None = None) -> list[Group]:
    """Partition `jobs` into groups that share one vmapped pass, or run sequentially (with a reason).

    Jobs share a pass when their support and query batches have the same shapes and they train
    the same parameters (same `head_only`); optimizer, lr and head re-initialisation may differ.
    A group's jobs are ordered by optimizer (each family is one contiguous slice).

    Args:
        mode: "auto" (batch where it is correct), "sequential" (never), "batched" (raise
            UserError where a group of several jobs cannot be batched).
        horizon: long-horizon terms; any of them on runs every job sequentially.
    """
    if mode not in MODES:
        raise UserError(f"unknown environment batching mode {mode!r}; use one of {', '.join(MODES)}")
    every = tuple(range(len(jobs)))
    blocker = None
    if mode == "sequential":
        blocker = "mode=sequential"
    elif order != "first":
        blocker = f"order={order} (batched environments are first order only)"
    elif horizon is not None and horizon.on:
        blocker = "protect.tail_weight/curv_weight > 0 (the long-horizon terms run sequentially only)"
    elif not isinstance(objective, ClassificationObjective):
        blocker = f"objective {type(objective).__name__} has no batched suppress (its metric is taken outside vmap only for classification)"
    else:
        blocker = model_blocker(model)
    if blocker is not None:
        if mode == "batched" and len(jobs) > 1:
            raise UserError(f"batched environments impossible: {blocker}; use protect.env_batching=auto or sequential")
        return [Group(every, False, blocker)] if jobs else []
    keys: dict[tuple, list[int]] = {}
    groups = []
    for i, job in enumerate(jobs):
        if job.env.schedule != "constant" or job.env.weight_decay:  # a fed-back recipe's: per-step lr, decay
            groups.append(Group((i,), False, "lr schedule or weight decay (sequential)"))
            continue
        key = (job.env.steps, job.env.head_only, _shapes(job.support[0]), _shapes(job.query[0]))
        keys.setdefault(key, []).append(i)
    for idx in keys.values():
        idx.sort(key=lambda i: (jobs[i].env.optimizer, i))
        if len(idx) == 1:
            groups.append(Group(tuple(idx), False, "group of one environment"))
        else:
            groups.append(Group(tuple(idx), True, "batched"))
    return groups


def meta_grads(
    model: nn.Module,
    params: Params,
    jobs: Sequence[Job],
    objective: Objective,
    head_keys: tuple[str, ...] = (),
    order: str = "first",
    query_every: int = 1,
    weighting: str = "uniform",
    mode: str = "auto",
    plan: list[Group] | None = None,
    horizon: Horizon | None = None,
) -> list[tuple[Params, dict[str, float]]]:
    """Meta-gradient and stats of every job, as `meta_grad_fn(order)` would give one by one.

    Returns a list aligned with `jobs` of (grads by name, {"loss", "metric"} and the horizon
    terms' "tail" / "curv").
    """
    if query_every < 1 or weighting not in ("uniform", "linear"):
        raise UserError(f"query_every {query_every} / weighting {weighting!r}: need >= 1 and uniform|linear")
    plan = plan_batches(model, jobs, objective, order, mode, horizon) if plan is None else plan
    # Head re-initialisations are drawn first, in job order, so a generator shared by several
    # jobs is consumed exactly as the sequential loop consumes it.
    heads: dict[int, Params] = {}
    for group in plan:
        if group.batched:
            for i in group.jobs:
                j = jobs[i]
                if j.env.reinit_head:
                    heads[i] = fresh_head(params, head_keys, j.generator or torch.Generator().manual_seed(0))
    out: list[tuple[Params, dict[str, float]] | None] = [None] * len(jobs)
    fn = meta_grad_fn(order)
    extra = _first_order_kwargs(order, query_every, weighting, horizon)
    for group in sorted(plan, key=lambda g: min(g.jobs)):
        if group.batched:
            res = _batched_group(model, params, [jobs[i] for i in group.jobs], [heads.get(i) for i in group.jobs],
                                 objective, head_keys, query_every, weighting)
            for i, r in zip(group.jobs, res):
                out[i] = r
        else:
            for i in group.jobs:
                j = jobs[i]
                out[i] = fn(model, params, j.env, j.support, j.query, objective, head_keys, j.generator, **extra)
    assert all(r is not None for r in out)
    return out  # type: ignore[return-value]


def _first_order_kwargs(order: str, query_every: int, weighting: str, horizon: Horizon | None) -> dict[str, Any]:
    """The keyword arguments only `first_order_meta_grad` takes (the horizon terms only when on)."""
    if order != "first":
        if horizon is not None and horizon.on:
            raise UserError("protect.tail_weight/curv_weight are first-order terms; set protect.order=first")
        return {}
    extra: dict[str, Any] = {"query_every": query_every, "weighting": weighting}
    if horizon is not None and horizon.on:
        extra["horizon"] = horizon
    return extra


def meta_grad_sum(
    model: nn.Module,
    params: Params,
    jobs: Sequence[Job],
    objective: Objective,
    head_keys: tuple[str, ...] = (),
    order: str = "first",
    query_every: int = 1,
    weighting: str = "uniform",
    mode: str = "auto",
    horizon: Horizon | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """What fts_step's loop in protect.py accumulates, with environments batched where possible.

    Args:
        horizon: the long-horizon terms (core/horizon.py); any of them on runs sequentially
            (mode=batched: UserError).
    Returns:
        (total, stats): the sum over jobs of their meta-gradients as a list in `params` order
        (zeros when there are no jobs), and a float tensor (sum loss, sum metric, count), with
        (sum tail, sum curv) appended when a horizon term is on (0 for a term that is off). The
        caller divides `total` by the number of environments of the whole step, as before.
    """
    total = [torch.zeros_like(p) for p in params.values()]
    on = horizon is not None and horizon.on
    stats = torch.zeros(5 if on else 3)
    if mode == "sequential":  # the default: one environment at a time, summed as it goes (memory flat in E)
        fn = meta_grad_fn(order)
        extra = _first_order_kwargs(order, query_every, weighting, horizon)
        results: Any = (fn(model, params, j.env, j.support, j.query, objective, head_keys, j.generator, **extra)
                        for j in jobs)
    else:
        results = meta_grads(model, params, jobs, objective, head_keys, order, query_every, weighting, mode,
                             horizon=horizon)
    for grads, st in results:
        torch._foreach_add_(total, list(grads.values()))
        row = [st["loss"], st["metric"], 1.0] + ([st.get("tail", 0.0), st.get("curv", 0.0)] if on else [])
        stats += torch.tensor(row)
    return total, stats


# ------------------------------------------------------------------------------------------
# the vmapped group
# ------------------------------------------------------------------------------------------


def _stack_batches(batches: list[Batch]) -> Batch:
    return tuple(torch.stack(ts) for ts in zip(*batches))  # each (E, B, ...)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))  # (n,) -> (n, 1, ..., 1)


def _batched_group(
    model: nn.Module,
    params: Params,
    jobs: list[Job],
    heads: list[Params | None],
    objective: ClassificationObjective,
    head_keys: tuple[str, ...],
    query_every: int,
    weighting: str,
) -> list[tuple[Params, dict[str, float]]]:
    """`first_order_meta_grad` for E jobs of one group at once (see the module docstring)."""
    E, steps = len(jobs), jobs[0].env.steps
    assert all(len(j.support) == len(j.query) == steps for j in jobs)
    names = list(params)
    fast: Params = {}
    for k in names:
        rows = [params[k].detach() if h is None or k not in h else h[k] for h in heads]
        fast[k] = torch.stack(rows).requires_grad_(True)  # (E, *shape)
    buffers = {k: torch.stack([b.detach().clone() for _ in range(E)]) for k, b in model.named_buffers()}
    fast_list = [fast[k] for k in names]
    trained_names = _trained(names, jobs[0].env, head_keys)
    trained = [fast[k] for k in trained_names]

    # One slice [a, b) of the stack per optimizer family, with its lr as a (n,) tensor.
    families = []
    a = 0
    while a < E:
        b = a
        while b < E and jobs[b].env.optimizer == jobs[a].env.optimizer:
            b += 1
        opt = make_inner_optimizer(jobs[a].env.optimizer, 1.0)
        lr = torch.tensor([j.env.lr for j in jobs[a:b]], dtype=trained[0].dtype, device=trained[0].device)
        with torch.no_grad():
            state = opt.init([t[a:b] for t in trained])
        families.append((a, b, opt, lr, state))
        a = b

    def fit(p, buf, batch):
        return objective.fit(model, {**p, **buf}, batch)

    def suppress(p, buf, batch):
        logits = functional_call(model, {**p, **buf}, (batch[0],))  # (B, C)
        return objective.loss(logits, batch[1]), logits.detach()

    v_fit, v_suppress = vmap(fit), vmap(suppress)
    meta: list[torch.Tensor] | None = None
    total = torch.zeros(E, dtype=torch.float64)
    weights, metric = 0.0, torch.full((E,), float("nan"))
    for k in range(1, steps + 1):
        losses = v_fit(fast, buffers, _stack_batches([j.support[k - 1] for j in jobs]))  # (E,)
        g = torch.autograd.grad(losses.sum(), trained)  # rows are per-environment gradients
        with torch.no_grad():
            for i, (a, b, opt, lr, state) in enumerate(families):
                views = [t[a:b] for t in trained]
                d = [torch.zeros_like(v) for v in views]
                families[i] = (a, b, opt, lr, opt.step_(d, [x[a:b] for x in g], state))  # d = -direction
                for v, dv in zip(views, d):
                    v.addcmul_(_bcast(lr, v), dv)
        if k % query_every and k != steps:
            continue
        w = 1.0 if weighting == "uniform" else float(k)
        qb = _stack_batches([j.query[k - 1] for j in jobs])
        q_losses, logits = v_suppress(fast, buffers, qb)  # (E,), (E, B, C)
        gq = list(torch.autograd.grad(q_losses.sum(), fast_list))
        metric = (logits.argmax(-1) == qb[1]).float().mean(-1)  # (E,)
        total += w * q_losses.detach().double().cpu()
        weights += w
        with torch.no_grad():
            if w != 1.0:
                torch._foreach_mul_(gq, w)
            if meta is None:
                meta = list(gq)
            else:
                torch._foreach_add_(meta, gq)
    assert meta is not None
    torch._foreach_div_(meta, weights)
    out = []
    for e, job in enumerate(jobs):
        grads = {k: m[e] for k, m in zip(names, meta)}
        if job.env.reinit_head:
            for k in head_keys:
                grads[k] = torch.zeros_like(grads[k])
        out.append((grads, {"loss": float(total[e]) / weights, "metric": float(metric[e])}))
    return out
