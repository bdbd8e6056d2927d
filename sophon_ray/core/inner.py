"""Fine-tuning simulation as pure functions over parameter dicts.

The inner loop never mutates the module: it runs `torch.func.functional_call` on a dict of
(fast) parameters plus *copies* of the module's buffers, so BatchNorm running statistics of
the real model are untouched by FTS (snapshot by construction; nothing to restore).

Two meta-gradients:
- `first_order_meta_grad`: dθ_k/dθ = I, so the meta-gradient is the mean over k of the query
  gradient at θ_k. The fast weights are one private working copy updated in place and the
  query gradients are accumulated step by step: memory O(1) in K.
- `second_order_meta_grad`: differentiates through the K inner updates (create_graph=True);
  memory O(K). Use for small models or few steps.

The first-order path also carries the optional long-horizon terms of core/horizon.py (progress
bound, directional curvature), off by default.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch
from torch.func import functional_call

from sophon_ray.core.horizon import Horizon, HorizonTerms
from sophon_ray.errors import UserError

Params = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class Environment:
    """One simulated fine-tuning recipe (what an attacker might run)."""

    optimizer: str  # one of INNER_OPTIMIZERS
    lr: float
    batch_size: int
    steps: int
    reinit_head: bool
    head_only: bool = False  # a linear-probe attacker: only the head is fine-tuned
    # What a fed-back audit recipe adds (core/feedback.py); the defaults are the sampled environments'.
    weight_decay: float = 0.0  # L2 added to the gradient, as torch.optim's weight_decay does
    decoupled_decay: bool = False  # AdamW's form: the weights shrink by lr * weight_decay before each step
    schedule: str = "constant"  # constant | cosine | warmup (`lr_factor`, as the attacks schedule lr)
    schedule_total: int = 0  # the schedule's length in steps (the attack's largest budget); 0 = `steps`
    warmup_steps: int = 0
    support_per_class: int | None = None  # a recipe's attacker images per class (None: the whole pool)
    recipe: str = ""  # the audit recipe simulated ("" = drawn from protect.env's distribution)


class Objective(Protocol):
    """What the inner loop optimises and what FTS suppresses, for one model kind.

    `fit` is the attacker's fine-tuning loss on a support batch; `suppress` returns the
    suppression loss on a query batch and a detached quality metric of the fine-tuned weights
    (accuracy for classification, MSE for diffusion). Both take `state` = params + buffers.
    """

    def fit(self, model: torch.nn.Module, state: Params, batch: Batch) -> torch.Tensor: ...

    def suppress(self, model: torch.nn.Module, state: Params, batch: Batch) -> tuple[torch.Tensor, float]: ...


# ----------------------------------------------------------------------------------------
# Functional inner optimizers. `step(params, grads, state)` returns new params and state
# (out of place, differentiable); `step_(params, grads, state)` updates lists in place with
# foreach kernels (the fast first-order path). Both follow torch.optim's formulas exactly.
# ----------------------------------------------------------------------------------------


class SGD:
    def __init__(self, lr: float, momentum: float = 0.0, nesterov: bool = False):
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov

    def init(self, params: list[torch.Tensor]) -> dict[str, Any]:
        return {"buf": None}

    def _direction(self, grads, state, inplace: bool):
        if self.momentum == 0.0:
            return grads
        m = self.momentum
        if state["buf"] is None:
            buf = [g.detach().clone() if inplace else g for g in grads]
        elif inplace:
            buf = state["buf"]
            torch._foreach_mul_(buf, m)
            torch._foreach_add_(buf, grads)
        else:
            buf = [m * b + g for b, g in zip(state["buf"], grads)]
        state = {"buf": buf}
        if self.nesterov:
            return [g + m * b for g, b in zip(grads, buf)] if not inplace else torch._foreach_add(grads, buf, alpha=m), state
        return buf, state

    def step(self, params, grads, state):
        if self.momentum == 0.0:
            return [p - self.lr * g for p, g in zip(params, grads)], state
        d, state = self._direction(grads, state, inplace=False)
        return [p - self.lr * x for p, x in zip(params, d)], state

    def step_(self, params, grads, state):
        if self.momentum == 0.0:
            torch._foreach_add_(params, grads, alpha=-self.lr)
            return state
        d, state = self._direction(grads, state, inplace=True)
        torch._foreach_add_(params, d, alpha=-self.lr)
        return state


class Adam:
    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, betas, eps

    def init(self, params: list[torch.Tensor]) -> dict[str, Any]:
        return {"t": 0, "m": [torch.zeros_like(p) for p in params], "v": [torch.zeros_like(p) for p in params]}

    def _scalars(self, t: int) -> tuple[float, float]:
        b1, b2 = self.betas
        return self.lr / (1 - b1**t), math.sqrt(1 - b2**t)

    def step(self, params, grads, state):
        b1, b2 = self.betas
        t = state["t"] + 1
        m = [b1 * a + (1 - b1) * g for a, g in zip(state["m"], grads)]
        v = [b2 * a + (1 - b2) * g * g for a, g in zip(state["v"], grads)]
        step_size, bc2 = self._scalars(t)
        # +1e-30 inside sqrt keeps d sqrt/dv finite at v == 0 (second order); no effect on values.
        new = [p - step_size * a / ((b + 1e-30).sqrt() / bc2 + self.eps) for p, a, b in zip(params, m, v)]
        return new, {"t": t, "m": m, "v": v}

    def step_(self, params, grads, state):
        b1, b2 = self.betas
        state["t"] += 1
        torch._foreach_lerp_(state["m"], grads, 1 - b1)
        torch._foreach_mul_(state["v"], b2)
        torch._foreach_addcmul_(state["v"], grads, grads, value=1 - b2)
        step_size, bc2 = self._scalars(state["t"])
        denom = torch._foreach_sqrt(state["v"])
        torch._foreach_div_(denom, bc2)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, state["m"], denom, value=-step_size)
        return state


class _SquareAvg:
    """Shared state of the adaptive optimizers that keep a running average of squared grads."""

    def init(self, params: list[torch.Tensor]) -> dict[str, Any]:
        return {"sq": [torch.zeros_like(p) for p in params], "acc": [torch.zeros_like(p) for p in params]}


class Adagrad(_SquareAvg):
    """torch.optim.Adagrad with defaults (no lr decay, zero initial accumulator)."""

    def __init__(self, lr: float, eps: float = 1e-10):
        self.lr, self.eps = lr, eps

    def step(self, params, grads, state):
        sq = [a + g * g for a, g in zip(state["sq"], grads)]
        new = [p - self.lr * g / ((s + 1e-30).sqrt() + self.eps) for p, g, s in zip(params, grads, sq)]
        return new, {**state, "sq": sq}

    def step_(self, params, grads, state):
        torch._foreach_addcmul_(state["sq"], grads, grads)
        denom = torch._foreach_sqrt(state["sq"])
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, grads, denom, value=-self.lr)
        return state


class RMSprop(_SquareAvg):
    """torch.optim.RMSprop with defaults (alpha 0.99, no momentum, not centered)."""

    def __init__(self, lr: float, alpha: float = 0.99, eps: float = 1e-8):
        self.lr, self.alpha, self.eps = lr, alpha, eps

    def step(self, params, grads, state):
        a = self.alpha
        sq = [a * s + (1 - a) * g * g for s, g in zip(state["sq"], grads)]
        new = [p - self.lr * g / ((s + 1e-30).sqrt() + self.eps) for p, g, s in zip(params, grads, sq)]
        return new, {**state, "sq": sq}

    def step_(self, params, grads, state):
        torch._foreach_mul_(state["sq"], self.alpha)
        torch._foreach_addcmul_(state["sq"], grads, grads, value=1 - self.alpha)
        denom = torch._foreach_sqrt(state["sq"])
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, grads, denom, value=-self.lr)
        return state


class Adadelta(_SquareAvg):
    """torch.optim.Adadelta with defaults (rho 0.9, eps 1e-6); `lr` scales the delta (default 1.0)."""

    def __init__(self, lr: float, rho: float = 0.9, eps: float = 1e-6):
        self.lr, self.rho, self.eps = lr, rho, eps

    def step(self, params, grads, state):
        r, e = self.rho, self.eps
        sq = [r * s + (1 - r) * g * g for s, g in zip(state["sq"], grads)]
        delta = [(a + e).sqrt() / (s + e).sqrt() * g for a, s, g in zip(state["acc"], sq, grads)]
        acc = [r * a + (1 - r) * d * d for a, d in zip(state["acc"], delta)]
        return [p - self.lr * d for p, d in zip(params, delta)], {"sq": sq, "acc": acc}

    def step_(self, params, grads, state):
        r, e = self.rho, self.eps
        torch._foreach_mul_(state["sq"], r)
        torch._foreach_addcmul_(state["sq"], grads, grads, value=1 - r)
        std = torch._foreach_add(state["sq"], e)
        torch._foreach_sqrt_(std)
        delta = torch._foreach_add(state["acc"], e)
        torch._foreach_sqrt_(delta)
        torch._foreach_div_(delta, std)
        torch._foreach_mul_(delta, grads)
        torch._foreach_mul_(state["acc"], r)
        torch._foreach_addcmul_(state["acc"], delta, delta, value=1 - r)
        torch._foreach_add_(params, delta, alpha=-self.lr)
        return state


INNER_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "rmsprop", "adagrad", "adadelta")


def make_inner_optimizer(name: str, lr: float) -> SGD | Adam | _SquareAvg:
    """Build a functional inner optimizer by name (one of INNER_OPTIMIZERS)."""
    if name == "sgd":
        return SGD(lr)
    if name == "momentum":
        return SGD(lr, momentum=0.9)
    if name == "nesterov":
        return SGD(lr, momentum=0.9, nesterov=True)
    builders = {"adam": Adam, "rmsprop": RMSprop, "adagrad": Adagrad, "adadelta": Adadelta}
    if name in builders:
        return builders[name](lr)
    raise UserError(f"unknown inner optimizer {name!r}; use one of: {', '.join(INNER_OPTIMIZERS)} (protect.env.optimizers=...)")


def sample_environments(
    n: int,
    steps: int,
    optimizers: tuple[str, ...],
    lr: dict[str, tuple[float, float]],
    batch_sizes: tuple[int, ...],
    reinit_head_prob: float,
    rng: random.Random,
    head_only_prob: float = 0.0,
) -> list[Environment]:
    """Draw `n` environments: optimizer uniform, lr log-uniform in its range, batch size uniform,
    head re-initialisation and head-only (linear probe) training with the given probabilities."""
    envs = []
    for _ in range(n):
        opt = rng.choice(optimizers)
        lo, hi = lr[opt]
        envs.append(
            Environment(
                optimizer=opt,
                lr=math.exp(rng.uniform(math.log(lo), math.log(hi))),
                batch_size=rng.choice(batch_sizes),
                steps=steps,
                reinit_head=rng.random() < reinit_head_prob,
                head_only=rng.random() < head_only_prob,
            )
        )
    return envs


def validate_env_space(optimizers, lr, batch_sizes, reinit_head_prob, head_only_prob=0.0) -> None:
    """Raise UserError for an environment distribution that cannot be sampled."""
    if not optimizers:
        raise UserError(f"protect.env.optimizers is empty; name at least one of {', '.join(INNER_OPTIMIZERS)}")
    for o in optimizers:
        make_inner_optimizer(o, 1.0)
        if o not in lr or len(lr[o]) != 2 or not 0 < lr[o][0] <= lr[o][1]:
            raise UserError(f"protect.env.lr.{o} must be a (low, high) range with 0 < low <= high")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UserError("protect.env.batch_sizes must be positive integers")
    if not 0.0 <= reinit_head_prob <= 1.0 or not 0.0 <= head_only_prob <= 1.0:
        raise UserError("protect.env.reinit_head_prob and protect.env.head_only_prob must be in [0, 1]")


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the base lr at `step` (0-based) of `total`: constant, cosine, or warm-up+cosine
    (the attacks' schedules, `core.attack.finetune`; a fed-back recipe's inner loop follows them)."""
    if schedule == "constant":
        return 1.0
    if schedule == "warmup" and step < warmup:
        return (step + 1) / warmup
    start = warmup if schedule == "warmup" else 0
    frac = (step - start) / max(total - start, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))


def _step_lr(opt: Any, env: Environment, step: int) -> float:
    """Set `opt.lr` for inner step `step` (0-based) from the environment's schedule; returns it."""
    if env.schedule != "constant":
        opt.lr = env.lr * lr_factor(env.schedule, step, env.schedule_total or env.steps, env.warmup_steps)
    return opt.lr


def _update_(opt: Any, env: Environment, step: int, params: list[torch.Tensor], grads: list[torch.Tensor],
             state: dict[str, Any]) -> dict[str, Any]:
    """One in-place inner step as torch.optim takes it: the scheduled lr, weight decay added to the
    gradient (AdamW: the weights shrunk by lr * weight_decay first). Without schedule and decay it
    is `opt.step_` itself."""
    lr = _step_lr(opt, env, step)
    if env.weight_decay and env.decoupled_decay:
        torch._foreach_mul_(params, 1.0 - lr * env.weight_decay)
    elif env.weight_decay:
        grads = torch._foreach_add(grads, params, alpha=env.weight_decay)
    return opt.step_(params, grads, state)


def _update(opt: Any, env: Environment, step: int, params: list[torch.Tensor], grads: list[torch.Tensor],
            state: dict[str, Any]) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """`_update_` out of place (differentiable, for second order)."""
    lr = _step_lr(opt, env, step)
    if env.weight_decay and env.decoupled_decay:
        params = [p * (1.0 - lr * env.weight_decay) for p in params]
    elif env.weight_decay:
        grads = [g + env.weight_decay * p for g, p in zip(grads, params)]
    return opt.step(params, grads, state)


def fresh_head(params: Params, head_keys: tuple[str, ...], generator: torch.Generator) -> Params:
    """New head tensors: Xavier-uniform weights, zero biases (as the reference ICE does)."""
    out = {}
    for k in head_keys:
        p = params[k]
        if p.dim() >= 2:
            fan_out, fan_in = p.shape[0], p[0].numel()
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            w = torch.rand(p.shape, generator=generator, dtype=p.dtype) * (2 * bound) - bound
            out[k] = w.to(p.device)
        else:
            out[k] = torch.zeros_like(p)
    return out


def _trained(names: list[str], env: Environment, head_keys: tuple[str, ...]) -> list[str]:
    if not env.head_only:
        return names
    if not head_keys:
        raise UserError("a head-only environment needs the model's head parameter names")
    return [k for k in names if k in head_keys]


def _buffers_copy(model: torch.nn.Module) -> Params:
    return {k: b.detach().clone() for k, b in model.named_buffers()}


def first_order_meta_grad(
    model: torch.nn.Module,
    params: Params,
    env: Environment,
    support: Sequence[Batch],
    query: Sequence[Batch],
    objective: Objective,
    head_keys: tuple[str, ...] = (),
    generator: torch.Generator | None = None,
    query_every: int = 1,
    weighting: str = "uniform",
    horizon: Horizon | None = None,
) -> tuple[Params, dict[str, float]]:
    """First-order FTS meta-gradient for one environment, accumulated step by step.

    Args:
        model: the module (used only as a function; its parameters and buffers are not changed).
        params: θ, the current parameters by name (not modified).
        env: the simulated fine-tuning recipe; len(support) == len(query) == env.steps.
        support, query: K restricted batches each (any sequence; `LazyBatches` draws on access).
        objective: fit / suppress functions for this model kind.
        head_keys: parameter names of the head, re-initialised when env.reinit_head.
        generator: seeds the head re-initialisation.
        query_every: evaluate the suppression loss after every m-th inner step only (and after
            the last): a long simulated fine-tuning (large K) at a fraction of the query cost.
        weighting: "uniform" (the reference: every evaluated step counts the same) or "linear"
            (step k weighs k, as TAR weights later inner steps more: what the attacker reaches
            late matters most).
        horizon: the long-horizon terms (core/horizon.py: progress bound, directional curvature);
            None or all weights 0: SOPHON's meta-gradient, unchanged.
    Returns:
        (grads, stats): weighted mean over the evaluated k of ∇ℓ(θ_k; Q_k) by name, plus the
        horizon terms' gradients (zeros for a re-initialised head, which does not depend on θ),
        and {"loss": weighted mean suppression loss, "metric": metric at θ_K}, plus "tail" /
        "curv" for the terms that are on.
    """
    assert len(support) == len(query) == env.steps
    if query_every < 1 or weighting not in ("uniform", "linear"):
        raise UserError(f"query_every {query_every} / weighting {weighting!r}: need >= 1 and uniform|linear")
    names = list(params)
    fast = {k: v.detach().clone() for k, v in params.items()}
    if env.reinit_head:
        fast.update(fresh_head(params, head_keys, generator or torch.Generator().manual_seed(0)))
    fast_list = [fast[k].requires_grad_(True) for k in names]
    trained = [fast[k] for k in _trained(names, env, head_keys)]
    state = {**fast, **_buffers_copy(model)}
    opt = make_inner_optimizer(env.optimizer, env.lr)
    opt_state = opt.init(trained)
    terms = None
    if horizon is not None and horizon.on:
        terms = HorizonTerms(horizon, env.steps, query_every, names, _trained(names, env, head_keys))
    meta: list[torch.Tensor] | None = None
    total, metric, weights = 0.0, float("nan"), 0.0
    for k in range(1, env.steps + 1):
        g = torch.autograd.grad(objective.fit(model, state, support[k - 1]), trained)
        if terms is not None:
            terms.before_update(k, trained)
        with torch.no_grad():
            opt_state = _update_(opt, env, k - 1, trained, list(g), opt_state)
        if k % query_every and k != env.steps:
            continue
        w = 1.0 if weighting == "uniform" else float(k)
        q_batch = query[k - 1]
        q_loss, metric = objective.suppress(model, state, q_batch)
        gq = list(torch.autograd.grad(q_loss, fast_list))
        if terms is not None:
            terms.at_query(k, w, q_loss, gq, model, state, trained, q_batch, objective)
        total += w * float(q_loss.detach())
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
    extra = terms.finish(meta, weights) if terms is not None else {}
    grads = dict(zip(names, meta))
    if env.reinit_head:
        for k in head_keys:
            grads[k] = torch.zeros_like(grads[k])
    return grads, {"loss": total / weights, "metric": metric, **extra}


def second_order_meta_grad(
    model: torch.nn.Module,
    params: Params,
    env: Environment,
    support: Sequence[Batch],
    query: Sequence[Batch],
    objective: Objective,
    head_keys: tuple[str, ...] = (),
    generator: torch.Generator | None = None,
) -> tuple[Params, dict[str, float]]:
    """Exact FTS meta-gradient, differentiating through the K inner updates (memory O(K)).

    Same arguments and returns as `first_order_meta_grad`.
    """
    assert len(support) == len(query) == env.steps
    names = list(params)
    theta = [params[k].detach().requires_grad_(True) for k in names]
    fast = dict(zip(names, theta))
    if env.reinit_head:
        fast.update(fresh_head(params, head_keys, generator or torch.Generator().manual_seed(0)))
    fast_list = [fast[k] for k in names]
    if any(not t.requires_grad for t in fast_list):
        fast_list = [t if t.requires_grad else t.requires_grad_(True) for t in fast_list]
    buffers = _buffers_copy(model)
    fast = dict(zip(names, fast_list))
    keys = _trained(names, env, head_keys)
    opt = make_inner_optimizer(env.optimizer, env.lr)
    opt_state = opt.init([fast[k] for k in keys])
    objective_sum = 0.0
    metric = float("nan")
    for step, (s_batch, q_batch) in enumerate(zip(support, query)):
        trained = [fast[k] for k in keys]
        g = torch.autograd.grad(objective.fit(model, {**fast, **buffers}, s_batch), trained, create_graph=True)
        new, opt_state = _update(opt, env, step, trained, list(g), opt_state)
        fast = {**fast, **dict(zip(keys, new))}
        q_loss, metric = objective.suppress(model, {**fast, **buffers}, q_batch)
        objective_sum = objective_sum + q_loss
    objective_mean = objective_sum / env.steps
    meta = torch.autograd.grad(objective_mean, theta, allow_unused=True)
    grads = {k: (torch.zeros_like(t) if g is None else g) for k, t, g in zip(names, theta, meta)}
    return grads, {"loss": float(objective_mean.detach()), "metric": metric}


def meta_grad_fn(order: str) -> Callable[..., tuple[Params, dict[str, float]]]:
    """`first_order_meta_grad` or `second_order_meta_grad` by name ("first" | "second")."""
    if order == "first":
        return first_order_meta_grad
    if order == "second":
        return second_order_meta_grad
    raise UserError(f"unknown meta-gradient order {order!r}; use protect.order=first or protect.order=second")


def call(model: torch.nn.Module, state: Params, *args: Any) -> Any:
    """`functional_call` of `model` with `state` (params + buffers)."""
    return functional_call(model, state, args)
