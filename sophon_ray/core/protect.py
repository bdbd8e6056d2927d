"""SOPHON protection: one FTS step, one NTR step, the guard, one outer iteration.

`Protection` holds the state of one run (the module, two Adam optimizers, the guard's last good
snapshot, the iteration counter) and is driven by a plain loop. All randomness is derived from
(seed, iteration, environment index), so every worker of a distributed run draws the same
environments and batches; worker `rank` of `world` simulates environments rank, rank+world, ...
and its share of each NTR batch, and `allreduce` (sum over workers, identity locally) combines
gradients before every optimizer step. The same code path runs in-process and on Ray Train.
The optional long-horizon terms (core/horizon.py) enter the FTS step: the progress bound and
curvature per environment (`meta_grad_sum`), the gradient coupling once per step at θ.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch

from sophon_ray.config import ProtectConfig
from sophon_ray.core.inner import Batch, Environment, Params, meta_grad_fn, sample_environments, validate_env_space
from sophon_ray.core.batched import Job, meta_grad_sum
from sophon_ray.core.horizon import Bound, Horizon, coupling
from sophon_ray.core.feedback import validate_space, with_recipes
from sophon_ray.core.objectives import ClassificationObjective
from sophon_ray.core.optim import OuterAdam
from sophon_ray.errors import UserError

AllReduce = Callable[[list[torch.Tensor]], None]
QUERY_FRACTION = 0.25  # share of the restricted training set held out for FTS query batches


def validate_config(cfg: ProtectConfig, kind: str | None = None) -> None:
    """Raise UserError naming the field for an impossible protection config (and loss, given `kind`)."""
    from sophon_ray.core.losses import get_loss

    checks = [
        (cfg.iterations >= 1, "protect.iterations must be >= 1"),
        (cfg.ml_loop >= 0 and cfg.nl_loop >= 0 and cfg.ml_loop + cfg.nl_loop >= 1, "protect.ml_loop/nl_loop must be >= 0, not both 0"),
        (cfg.envs_per_step >= 1, "protect.envs_per_step must be >= 1"),
        (cfg.inner_steps >= 1, "protect.inner_steps must be >= 1"),
        (cfg.query_batch >= 1 and cfg.ntr_batch >= 1, "protect.query_batch and protect.ntr_batch must be >= 1"),
        (cfg.alpha > 0 and cfg.beta > 0, "protect.alpha and protect.beta must be > 0"),
        (cfg.clip >= 0, "protect.clip must be >= 0 (0 disables clipping)"),
        (cfg.guard_every >= 1, "protect.guard_every must be >= 1"),
        (cfg.support_per_class is None or (type(cfg.support_per_class) is int and cfg.support_per_class >= 1),
         "protect.support_per_class must be a positive integer or None"),
        (0 < cfg.guard_backoff <= 1, "protect.guard_backoff must be in (0, 1]"),
        (cfg.guard_margin >= 0, "protect.guard_margin must be >= 0"),
        (cfg.query_every >= 1, "protect.query_every must be >= 1"),
        (cfg.weighting in ("uniform", "linear"), "protect.weighting must be uniform or linear"),
        (cfg.init in ("source", "fresh"), "protect.init must be source or fresh"),
        (cfg.env_batching in ("sequential", "auto", "batched"), "protect.env_batching must be sequential, auto or batched"),
        (cfg.order == "first" or (cfg.query_every == 1 and cfg.weighting == "uniform"),
         "protect.query_every/weighting need protect.order=first"),
        *_horizon_checks(cfg),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    meta_grad_fn(cfg.order)
    if kind is not None:
        get_loss(cfg.loss, kind)
    validate_env_space(cfg.env.optimizers, cfg.env.lr, cfg.env.batch_sizes, cfg.env.reinit_head_prob, cfg.env.head_only_prob)
    validate_space(cfg.env)


def _horizon_checks(cfg: ProtectConfig) -> list[tuple[bool, str]]:
    """validate_config's checks of the long-horizon terms (core/horizon.py)."""
    on = horizon_of(cfg) is not None
    return [
        (min(cfg.tail_weight, cfg.curv_weight, cfg.couple_weight) >= 0,
         "protect.tail_weight, protect.curv_weight and protect.couple_weight must be >= 0 (0 turns a term off)"),
        (0 < cfg.tail_ratio_max < 1, "protect.tail_ratio_max must be in (0, 1)"),
        (cfg.curv_eps > 0 and cfg.curv_scale > 0 and cfg.couple_eps > 0,
         "protect.curv_eps, protect.curv_scale and protect.couple_eps must be > 0"),
        (not on or cfg.order == "first",
         "protect.tail_weight/curv_weight are first-order terms: set protect.order=first (or the weights to 0)"),
        (not on or cfg.env_batching != "batched",
         "protect.tail_weight/curv_weight run the environments sequentially: set protect.env_batching=sequential "
         "(or auto)"),
    ]


def horizon_of(cfg: ProtectConfig) -> Horizon | None:
    """The per-environment long-horizon terms of `cfg` (None when both weights are 0)."""
    h = Horizon(cfg.tail_weight, cfg.tail_ratio_max, cfg.curv_weight, cfg.curv_eps, cfg.curv_scale)
    return h if h.on else None


def _no_reduce(tensors: list[torch.Tensor]) -> None:
    return None


@dataclass(frozen=True)
class ProtectData:
    """Preprocessed tensors the protection needs: original train (NTR), restricted train (FTS)."""

    original: tuple[torch.Tensor, torch.Tensor]
    restricted: tuple[torch.Tensor, ...]

    def split_restricted(self, seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Disjoint (support pool, query pool) of the restricted training set, fixed by `seed`."""
        n = len(self.restricted[0])
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        n_q = max(1, int(n * QUERY_FRACTION))
        q, s = perm[:n_q], perm[n_q:]
        return tuple(t[s] for t in self.restricted), tuple(t[q] for t in self.restricted)


def per_class_subset(y: torch.Tensor, per_class: int, g: torch.Generator) -> torch.Tensor:
    """Ascending indices of `per_class` images of every class of labels `y` (all of a smaller
    class), drawn with `g`, classes in ascending order (the draw order is fixed)."""
    labels = y.cpu()
    keep = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        keep.append(members[torch.randperm(len(members), generator=g)[:per_class]])
    if not keep:
        return torch.zeros(0, dtype=torch.int64, device=y.device)
    return torch.sort(torch.cat(keep)).values.to(y.device)


def _draw(pool: tuple[torch.Tensor, ...], n: int, g: torch.Generator) -> Batch:
    idx = torch.randint(len(pool[0]), (n,), generator=g)
    return tuple(t[idx] for t in pool)


class LazyBatches(Sequence):
    """K batches drawn on access, each from its own seeded generator (memory O(1) in K).

    Batch i is `make_batch(_draw(pool, n, g_i), g_i)` with g_i seeded by (`key`, i), so the
    sequence is the same however often and in whatever order it is read, and the inner loop
    holds one support and one query batch at a time instead of all K of each.
    """

    def __init__(self, pool: tuple[torch.Tensor, ...], n: int, steps: int, key: tuple[int, ...],
                 make_batch: Callable[[Batch, torch.Generator], Batch]):
        self.pool, self.n, self.steps, self.key, self.make_batch = pool, n, steps, key, make_batch

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.steps))]
        if not -self.steps <= i < self.steps:
            raise IndexError(i)
        g = torch.Generator().manual_seed(_seed(*self.key, i % self.steps))
        return self.make_batch(_draw(self.pool, self.n, g), g)


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFF)) * 1099511628211) & 0x7FFFFFFFFFFFFFFF
    return h


@dataclass
class GuardState:
    """The guard's memory: the last weights that passed, and the current FTS lr scale."""

    best: dict | None = None
    lr_scale: float = 1.0
    rollbacks: int = 0
    last_value: float = float("nan")
    passed_at: int | None = None  # the outer iteration of the last snapshot that passed (None: never passed)

    @property
    def passed(self) -> bool:
        """Whether the weights a run ends on passed the guard (a snapshot that passed exists)."""
        return self.best is not None

    def summary(self) -> dict[str, object]:
        """metrics.json's guard fields: `guard_passed` and `guard_last_pass` (the iteration)."""
        return {"guard_passed": self.passed, "guard_last_pass": self.passed_at if self.passed else None}


class Protection:
    """One SOPHON protection run over `model` (modified in place).

    Args:
        model: the source model (its weights are the starting point θ_0).
        cfg: protection hyper-parameters.
        data: original and restricted training tensors.
        objective: fit/suppress/train_loss for the model kind.
        evaluate_original: returns the original-domain test metric of `model` (for the guard).
        source_value: that metric for the unprotected source model.
        higher_is_better: True for accuracy (guard: value >= source - margin), False for MSE
            (guard: value <= source * (1 + margin)).
        head_keys: head parameter names (re-initialised in environments that ask for it).
        make_batch: turns a drawn restricted/original batch into an objective batch (e.g. adds
            noise and timesteps for diffusion); identity for classification.
        rank, world, allreduce: distributed sharding; defaults are the in-process run.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: ProtectConfig,
        data: ProtectData,
        objective: ClassificationObjective,
        evaluate_original: Callable[[], float],
        source_value: float,
        higher_is_better: bool = True,
        head_keys: tuple[str, ...] = (),
        make_batch: Callable[[Batch, torch.Generator], Batch] | None = None,
        rank: int = 0,
        world: int = 1,
        allreduce: AllReduce | None = None,
    ):
        validate_config(cfg)
        self.model, self.cfg, self.objective = model, cfg, objective
        self.support, self.query = data.split_restricted(cfg.seed)
        self.original = data.original
        self.evaluate_original, self.source_value = evaluate_original, source_value
        self.higher_is_better, self.head_keys = higher_is_better, head_keys
        self.make_batch = make_batch or (lambda b, g: b)
        self.rank, self.world, self.allreduce = rank, world, allreduce or _no_reduce
        params = list(model.parameters())
        self.fts_opt = OuterAdam(params, lr=cfg.alpha)
        self.ntr_opt = OuterAdam(params, lr=cfg.beta)
        self.guard = GuardState()
        self.iteration = 0

    # -- phases --------------------------------------------------------------------------

    def fts_step(self, sub: int = 0) -> dict[str, float]:
        """One Fine-Tuning Suppression step: E environments, averaged meta-gradients, one update."""
        cfg, it = self.cfg, self.iteration
        rng = random.Random(_seed(cfg.seed, it, sub, 1))
        envs = sample_environments(
            cfg.envs_per_step, cfg.inner_steps, cfg.env.optimizers, cfg.env.lr, cfg.env.batch_sizes,
            cfg.env.reinit_head_prob, rng, cfg.env.head_only_prob,
        )
        fed: dict[str, float] = {}
        if cfg.env.recipes:  # the hardening loop's fed-back audit recipes (core/feedback.py), own generator
            envs = with_recipes(envs, cfg.env.recipes, cfg.env.recipe_prob, random.Random(_seed(cfg.seed, it, sub, 4)))
            fed = {"fts_recipe_envs": float(sum(bool(e.recipe) for e in envs))}
        self.model.train()
        params: Params = dict(self.model.named_parameters())
        jobs = [
            Job(envs[e],
                LazyBatches(self._support(it, sub, e, envs[e]), envs[e].batch_size, envs[e].steps, (cfg.seed, it, sub, 2, e, 0),
                            self.make_batch),
                LazyBatches(self.query, cfg.query_batch, envs[e].steps, (cfg.seed, it, sub, 2, e, 1), self.make_batch),
                torch.Generator().manual_seed(_seed(cfg.seed, it, sub, 2, e)))
            for e in range(self.rank, len(envs), self.world)
        ]
        horizon = horizon_of(cfg)
        total, stats = meta_grad_sum(self.model, params, jobs, self.objective, self.head_keys, cfg.order,
                                     cfg.query_every, cfg.weighting, mode=cfg.env_batching, horizon=horizon)
        torch._foreach_div_(total, float(len(envs)))
        if cfg.couple_weight > 0:  # the same on every worker: each adds its 1/world share before the sum
            c, grad = self._coupling(params, it, sub)
            torch._foreach_add_(total, grad, alpha=cfg.couple_weight / self.world)
            fed["fts_couple"] = c
        self.allreduce(total + [stats])
        n = max(float(stats[2]), 1.0)
        for i, (key, w) in enumerate((("tail", cfg.tail_weight), ("curv", cfg.curv_weight))):
            if horizon is not None and w > 0:  # means over all environments of the step
                fed[f"fts_{key}"] = float(stats[3 + i]) / n
        if not all(bool(torch.isfinite(g).all()) for g in total):
            # a simulated fine-tuning diverged (e.g. SGD at the top of its lr range): no update from
            # this step, the same decision on every worker (after the all-reduce)
            return {"fts_loss": float("nan"), "sim_metric": float("nan"), "fts_skipped": 1.0, **fed}
        self._apply(self.fts_opt, total)
        return {"fts_loss": float(stats[0]) / n, "sim_metric": float(stats[1]) / n, "fts_skipped": 0.0, **fed}

    def _coupling(self, params: Params, it: int, sub: int) -> tuple[float, list[torch.Tensor]]:
        """SEAM's coupling at θ (core/horizon.py): cos(∇ fit loss on a restricted support batch of
        `query_batch`, ∇ NTR loss on an original batch of `ntr_batch`) and its gradient, on batches
        seeded by (seed, it, sub) alone, so every worker computes the same; buffers are copies."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(_seed(cfg.seed, it, sub, 5))
        restricted = self.make_batch(_draw(self.support, cfg.query_batch, g), g)
        original = self.make_batch(_draw(self.original, cfg.ntr_batch, g), g)
        buffers = {k: b.detach().clone() for k, b in self.model.named_buffers()}
        state = {**params, **buffers}
        return coupling(lambda st: self.objective.fit(self.model, st, restricted),
                        lambda st: self.objective.train_loss(Bound(self.model, st), original),
                        state, list(params), cfg.couple_eps)

    def _support(self, it: int, sub: int, e: int, env: Environment | None = None) -> tuple[torch.Tensor, ...]:
        """Environment e's support pool: all of it, or (`protect.support_per_class`; a fed-back
        recipe's own `support_per_class`) a fresh seeded draw of that many images per class, the
        data an attacker with a small budget holds."""
        n = env.support_per_class if env is not None and env.recipe else self.cfg.support_per_class
        if n is None:
            return self.support
        idx = per_class_subset(self.support[1], n, torch.Generator().manual_seed(_seed(self.cfg.seed, it, sub, 2, e, 2)))
        return tuple(t[idx] for t in self.support)

    def ntr_step(self, sub: int = 0) -> dict[str, float]:
        """One Normal Training Reinforcement step on an original-domain batch (data parallel)."""
        cfg = self.cfg
        g = torch.Generator().manual_seed(_seed(cfg.seed, self.iteration, sub, 3))
        batch = self.make_batch(_draw(self.original, cfg.ntr_batch, g), g)
        mine = tuple(t[self.rank :: self.world] for t in batch)
        self.model.train()
        loss = self.objective.train_loss(self.model, mine) * (len(mine[0]) / cfg.ntr_batch)
        grads = torch.autograd.grad(loss, list(self.model.parameters()), allow_unused=True)
        grads = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(self.model.parameters(), grads)]
        stat = torch.tensor([float(loss.detach())])
        self.allreduce(grads + [stat])
        self._apply(self.ntr_opt, grads)
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        if self.world > 1 and buffers:  # each worker saw its shard: average BN running statistics
            self.allreduce(buffers)
            torch._foreach_div_(buffers, float(self.world))
        return {"ntr_loss": float(stat[0])}

    def _apply(self, opt: OuterAdam, grads: list[torch.Tensor]) -> None:
        params = list(self.model.parameters())
        if self.cfg.clip > 0:  # torch's total-norm clip, on the gradients in place
            for p, g in zip(params, grads):
                p.grad = g
            torch.nn.utils.clip_grad_norm_(params, self.cfg.clip)
            for p in params:
                p.grad = None
        opt.step(grads)

    # -- guard ---------------------------------------------------------------------------

    def _ok(self, value: float) -> bool:
        if self.higher_is_better:
            return value >= self.source_value - self.cfg.guard_margin
        return value <= self.source_value * (1.0 + self.cfg.guard_margin)

    def check_guard(self) -> dict[str, float]:
        """Evaluate the original domain; keep a snapshot if it passes, else roll back and back off.
        Co-training from a fresh init (`protect.init=fresh`) starts far below the source: until the
        guard first passes there is nothing to roll back to, so it only measures."""
        value = self.evaluate_original()
        self.guard.last_value = value
        if not self._ok(value) and self.guard.best is None and self.cfg.init == "fresh":
            return {"orig_metric": value, "guard_rollback": 0.0}
        if self._ok(value):
            self.guard.passed_at = self.iteration
            self.guard.best = {
                "model": copy.deepcopy(self.model.state_dict()),
                "fts": copy.deepcopy(self.fts_opt.state_dict()),
                "ntr": copy.deepcopy(self.ntr_opt.state_dict()),
            }
            return {"orig_metric": value, "guard_rollback": 0.0}
        if self.guard.best is not None:
            self.model.load_state_dict(self.guard.best["model"])
            self.fts_opt.load_state_dict(self.guard.best["fts"])
            self.ntr_opt.load_state_dict(self.guard.best["ntr"])
        self.guard.rollbacks += 1
        self.guard.lr_scale *= self.cfg.guard_backoff
        self.fts_opt.lr = self.cfg.alpha * self.guard.lr_scale
        return {"orig_metric": value, "guard_rollback": 1.0}

    # -- the loop ------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One outer iteration: `ml_loop` FTS steps then `nl_loop` NTR steps (+ guard every N)."""
        if self.iteration == 0 and self.guard.best is None:
            self.check_guard()  # snapshot θ_0 so the first rollback has somewhere to go
        metrics: dict[str, float] = {}
        for sub in range(self.cfg.ml_loop):
            metrics.update(self.fts_step(sub))
        for sub in range(self.cfg.nl_loop):
            metrics.update(self.ntr_step(sub))
        self.iteration += 1
        if self.iteration % self.cfg.guard_every == 0 or self.iteration == self.cfg.iterations:
            metrics.update(self.check_guard())
        metrics["fts_lr"] = self.cfg.alpha * self.guard.lr_scale
        return metrics

    def state_dict(self) -> dict:
        """Everything needed to resume: weights, both optimizers, guard, iteration counter."""
        return {
            "model": self.model.state_dict(),
            "fts": self.fts_opt.state_dict(),
            "ntr": self.ntr_opt.state_dict(),
            "guard": {"lr_scale": self.guard.lr_scale, "rollbacks": self.guard.rollbacks, "best": self.guard.best,
                      "passed_at": self.guard.passed_at},
            "iteration": self.iteration,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.fts_opt.load_state_dict(state["fts"])
        self.ntr_opt.load_state_dict(state["ntr"])
        g = state["guard"]
        self.guard = GuardState(best=g["best"], lr_scale=g["lr_scale"], rollbacks=g["rollbacks"],
                                passed_at=g.get("passed_at", None if g["best"] is None else state["iteration"]))
        self.fts_opt.lr = self.cfg.alpha * self.guard.lr_scale
        self.iteration = state["iteration"]


def run(protection: Protection, on_step: Callable[[int, dict[str, float]], None] | None = None) -> Protection:
    """Drive `protection` to `cfg.iterations`. The last iteration always runs the guard, so the
    run ends on weights that pass it (or on the last snapshot that did)."""
    while protection.iteration < protection.cfg.iterations:
        m = protection.step()
        if on_step:
            on_step(protection.iteration, m)
    return protection
