"""The attack space as Ray Tune search spaces, and the planner that turns an audit into trials.

`attack_space()` is the adversary's hyper-parameter space (strategy x optimizer x lr x batch
size x weight decay x schedule) as Tune domains; `to_recipe` maps one sampled point to a
`Recipe`. `AuditPlanner` is a Tune `Searcher` that plans every trial of one audit inside ONE
Tuner run:

1. explore: every recipe of a suite, or N suggestions of an inner searcher (Optuna TPE over
   `attack_space()`, optimising the protected model's restricted metric in the attacker's
   direction: maximising accuracy, minimising diffusion MSE; optionally starting from a suite's
   recipes), each applied to every subject (protected, scratch, original) with seed 0;
2. re-run: once every explore trial has finished, the top-k recipes by the protected model's
   score, plus the top-k by the scratch model's (so both sides of the margin get the same extra
   seeds), re-run on every subject with seeds 1..S at the full budget.

A trial's score is the mean of its curve over the budgets (`trial.py`), not its best value at
any budget: on an easy benchmark every recipe reaches the same ceiling late, and the best value
would tie them all instead of ranking them by how fast they get there.

No trial is stopped early: every trial runs every budget (protected models are built to look
flat early, so early stopping must not decide the worst case).

The classifier search draws all six strategies of `core.attack.STRATEGIES` (the driver passes
`ClassifierTask.strategies`), including `renorm-all` and `bnrecal-all` (issue 29, part 4): a
search that cannot draw them is fooled by a model whose BN-fed weights were re-scaled, and a
search seeded with `--suite default-v2` needs its recipes inside the space. The cost: since
2026-12-04 a `--search N` with the same seed draws other recipes than before (a 6-way instead of a
4-way strategy choice); an older audit's recipes stay in its audit.json and re-run unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from typing import Any

from ray import tune
from ray.tune.search import Searcher

from sophon_ray.config import Recipe
from sophon_ray.core.attack import OPTIMIZERS, SCHEDULES, STRATEGIES
from sophon_ray.errors import UserError
from sophon_ray.tasks.base import ACCURACY, Metric

LR_RANGE = (1e-5, 1e-1)
BATCH_SIZES = (16, 32, 64)
WEIGHT_DECAYS = (0.0, 1e-4, 1e-3, 1e-2)
# Adadelta's lr multiplies its own adaptive step (PyTorch default 1.0): a sampled lr in
# 1e-5..1e-1 is scaled by 10 for it, so the search covers 1e-4..1 where Adadelta is useful.
LR_SCALE = {"adadelta": 10.0}
SUBJECTS = ("protected", "scratch", "original")


def attack_space(
    strategies: tuple[str, ...] = STRATEGIES,
    optimizers: tuple[str, ...] = OPTIMIZERS,
    lr: tuple[float, float] = LR_RANGE,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS,
    schedules: tuple[str, ...] = SCHEDULES,
) -> dict[str, Any]:
    """The attacker's hyper-parameter space as Ray Tune domains.

    Args:
        strategies, optimizers, batch_sizes, weight_decays, schedules: categorical choices.
        lr: (low, high) of the log-uniform learning rate.
    Returns:
        {"strategy", "optimizer", "lr", "batch_size", "weight_decay", "schedule"} -> Tune domain.
    """
    return {
        "strategy": tune.choice(list(strategies)),
        "optimizer": tune.choice(list(optimizers)),
        "lr": tune.loguniform(*lr),
        "batch_size": tune.choice(list(batch_sizes)),
        "weight_decay": tune.choice(list(weight_decays)),
        "schedule": tune.choice(list(schedules)),
    }


def to_recipe(point: dict[str, Any]) -> Recipe:
    """A sampled point of `attack_space()` as the Recipe that is run (Adadelta's lr scaled).

    Args:
        point: values for the keys of `attack_space()`.
    Returns:
        The Recipe; its lr is the effective learning rate.
    """
    lr = float(point["lr"]) * LR_SCALE.get(point["optimizer"], 1.0)
    return Recipe(
        strategy=point["strategy"], optimizer=point["optimizer"], lr=float(f"{lr:.3g}"),
        batch_size=int(point["batch_size"]), weight_decay=float(point["weight_decay"]),
        schedule=point["schedule"],
    )


def to_point(recipe: Recipe, strategies: tuple[str, ...] = STRATEGIES) -> dict[str, Any]:
    """A Recipe as a point of `attack_space(strategies)` (the inverse of `to_recipe`).

    Args:
        recipe: a suite recipe.
        strategies: the strategies of the space.
    Returns:
        {"strategy", "optimizer", "lr", "batch_size", "weight_decay", "schedule"}. Raises
        UserError when the recipe lies outside the space (it could then not seed a search).
    """
    lr = recipe.lr / LR_SCALE.get(recipe.optimizer, 1.0)
    inside = (recipe.strategy in strategies and recipe.optimizer in OPTIMIZERS
              and LR_RANGE[0] * (1 - 1e-9) <= lr <= LR_RANGE[1] * (1 + 1e-9) and recipe.batch_size in BATCH_SIZES
              and recipe.weight_decay in WEIGHT_DECAYS and recipe.schedule in SCHEDULES)
    point = {"strategy": recipe.strategy, "optimizer": recipe.optimizer, "lr": min(max(lr, LR_RANGE[0]), LR_RANGE[1]),
             "batch_size": recipe.batch_size, "weight_decay": recipe.weight_decay, "schedule": recipe.schedule}
    if not inside or to_recipe(point) != recipe:  # e.g. a warm-up length the space does not draw
        raise UserError(f"recipe {recipe} lies outside the search space (lr {LR_RANGE[0]:g}..{LR_RANGE[1]:g}, batch "
                        f"{BATCH_SIZES}, weight decay {WEIGHT_DECAYS}); seed the search with another --suite")
    return point


def optuna_searcher(seed: int = 0, n_trials: int = 64, metric: Metric = ACCURACY,
                    strategies: tuple[str, ...] = STRATEGIES, start_from: tuple[Recipe, ...] = ()) -> Searcher:
    """Optuna TPE over `attack_space(strategies)`, optimising the trial metric "score" towards `metric.goal`.

    Args:
        seed: sampler seed.
        n_trials: planned suggestions (sets the random start-up phase: a quarter, 4..16).
        metric: the restricted metric; its goal ("max" accuracy, "min" diffusion MSE) is Tune's mode.
        strategies: the strategies of the model kind (classifier head strategies or UNet all/up/down).
        start_from: recipes (a suite) suggested first, in order (`points_to_evaluate`); TPE then
            learns from their results like from its own.
    Returns:
        An OptunaSearch to pass to `AuditPlanner(inner=...)`.
    """
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    startup = max(4, min(16, n_trials // 4))
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)
    space = OptunaSearch.convert_search_space(attack_space(strategies=strategies))
    points = [to_point(r, strategies) for r in start_from] or None
    return OptunaSearch(space=space, metric="score", mode=metric.goal, sampler=sampler, points_to_evaluate=points)


def trial_id(subject: str, index: int, seed: int) -> str:
    """Deterministic trial id, e.g. "protected-r07-s0" (recipe index 7, seed 0)."""
    return f"{subject}-r{index:02d}-s{seed}"


class AuditPlanner(Searcher):
    """Plans the trials of one audit (see the module docstring) as a Tune Searcher.

    Args:
        subjects: subject names in order, e.g. ("protected", "scratch", "original").
        recipes: the suite's recipes (suite mode), or None.
        inner: a searcher over `attack_space()` (search mode), or None.
        n_search: how many recipes to ask `inner` for (search mode).
        seeds: re-run seeds per top recipe (seeds 1..S).
        top_k: how many top recipes per ranking subject are re-run.
        metric: the restricted metric; its goal on "score" decides what "top" means.
        fault: (substring, "once"|"always", marker dir) marks trials for injected failures
            (tests only); "once" trials leave a marker file there when they fail.
    """

    def __init__(self, subjects: tuple[str, ...], *, recipes: tuple[Recipe, ...] | None = None,
                 inner: Searcher | None = None, n_search: int = 0, seeds: int = 3, top_k: int = 3,
                 metric: Metric = ACCURACY, fault: tuple[str, str, str] | None = None):
        super().__init__(metric="score", mode=metric.goal)
        self.sign = metric.sign
        assert (recipes is None) != (inner is None), "suite XOR search"
        self.subjects, self.inner, self.seeds, self.top_k, self.fault = subjects, inner, seeds, top_k, fault
        self.recipes: list[Recipe] = list(recipes or ())
        self.n_explore = len(self.recipes) if recipes is not None else n_search
        self.phase = "explore"
        self.planned: dict[str, dict[str, Any]] = {}  # trial id -> config, in hand-out order
        self.scores: dict[str, float] = {}  # trial id -> score of an ok trial
        self.finished: set[str] = set()  # ok or failed for good
        self._queue: deque[dict[str, Any]] = deque()
        self._tune_to_id: dict[str, str] = {}
        self._inner_ids: set[str] = set()
        if recipes is not None:
            for i, r in enumerate(self.recipes):
                self._queue.extend(self._configs(i, r, 0))

    # -- planning ------------------------------------------------------------------------
    @property
    def total(self) -> int:
        """Trials planned so far (explore in full; re-runs once planned, else their maximum)."""
        reruns = self._rerun_count if self.phase == "rerun" else 2 * self.top_k * self.seeds * len(self.subjects)
        return self.n_explore * len(self.subjects) + reruns

    def _configs(self, index: int, recipe: Recipe, seed: int) -> list[dict[str, Any]]:
        out = []
        for s in self.subjects:
            tid = trial_id(s, index, seed)
            fault = None
            if self.fault and self.fault[0] in tid:
                fault = {"mode": self.fault[1], "marker": f"{self.fault[2]}/{tid}"}
            out.append({"id": tid, "subject": s, "index": index, "recipe": dataclasses.asdict(recipe),
                        "seed": seed, "fault": fault})
        return out

    def _explore_done(self) -> bool:
        explore = [t for t, c in self.planned.items() if c["seed"] == 0]
        return len(explore) == self.n_explore * len(self.subjects) and all(t in self.finished for t in explore)

    def ranking(self, subject: str) -> list[tuple[int, float]]:
        """(recipe index, score) of the subject's ok seed-0 trials, best for the attacker first."""
        rows = [(c["index"], self.scores[t]) for t, c in self.planned.items()
                if c["subject"] == subject and c["seed"] == 0 and t in self.scores and math.isfinite(self.scores[t])]
        return sorted(rows, key=lambda r: (-self.sign * r[1], r[0]))

    def rerun_indices(self) -> list[int]:
        """Recipe indices to re-run: top-k by protected, then top-k by scratch (deduplicated)."""
        out: list[int] = []
        for subject in ("protected", "scratch"):
            for index, _ in self.ranking(subject)[: self.top_k]:
                if index not in out:
                    out.append(index)
        return out

    def _plan_reruns(self) -> None:
        self.phase = "rerun"
        indices = self.rerun_indices()
        for seed in range(1, self.seeds + 1):
            for i in indices:
                self._queue.extend(self._configs(i, self.recipes[i], seed))
        self._rerun_count = len(self._queue)

    def _suggest_recipe(self, tune_id: str) -> dict[str, Any] | None:
        point = self.inner.suggest(tune_id)
        if point is None or point == Searcher.FINISHED:
            return None
        self._inner_ids.add(tune_id)
        index = len(self.recipes)
        self.recipes.append(to_recipe(point))
        first, *rest = self._configs(index, self.recipes[index], 0)
        self._queue.extend(rest)
        return first

    # -- Searcher API -----------------------------------------------------------------------
    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        config = self._queue.popleft() if self._queue else None
        if config is None and self.phase == "explore":
            if self.inner is not None and len(self.recipes) < self.n_explore:
                config = self._suggest_recipe(trial_id)
            elif self._explore_done():
                self._plan_reruns()
                config = self._queue.popleft() if self._queue else None
        if config is None:
            return Searcher.FINISHED if self.phase == "rerun" else None
        self.planned[config["id"]] = config
        self._tune_to_id[trial_id] = config["id"]
        return config

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        tid = self._tune_to_id.get(trial_id)
        if tid is None:
            return
        self.finished.add(tid)
        if not error and result and "score" in result:
            self.scores[tid] = float(result["score"])
        if trial_id in self._inner_ids:
            self.inner.on_trial_complete(trial_id, result=result, error=error or not result or "score" not in result)

    def save(self, checkpoint_path: str) -> None:  # resume is not supported: nothing to save
        pass

    def restore(self, checkpoint_path: str) -> None:
        pass
