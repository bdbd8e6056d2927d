"""Audit recipes as FTS environments: the hardening loop's feedback (pure).

`env_recipe` turns a real attack (`config.Recipe`), the budget where it won and the attacker's
data into the fixed environment (`config.EnvRecipe`) that the inner loop simulates:

| attack                      | simulated environment                                            |
|-----------------------------|------------------------------------------------------------------|
| strategy `initFC-*`         | `reinit_head` (a fresh Xavier head, as the attack's)             |
| strategy `*-FC`             | `head_only` (only the head is trained)                           |
| `direct-all`, `renorm-all`, `bnrecal-all`, `all` | every weight trained, head kept             |
| optimizer                   | the same inner optimizer; `adamw` -> `adam` + decoupled decay    |
| lr, batch_size              | the same                                                         |
| weight_decay                | the same (L2 on the gradient, AdamW's decoupled form for adamw)  |
| schedule, warmup_steps      | the same schedule over the attack's own length (`schedule_total`, its largest budget in steps) |
| the budget where it won     | the horizon K (`steps`), in optimizer steps                      |
| `attack.train_per_class`    | `support_per_class`: each simulation draws that many images per class |

Every optimizer of the attacks has an inner version (`core.inner.INNER_OPTIMIZERS`: nesterov is
torch's SGD(momentum=0.9, nesterov=True); AdamW is Adam with the weights shrunk by lr * wd before
each step, as torch.optim.AdamW does), so the optimizer, lr, batch size, decay and schedule are
exact. What the inner loop does not reproduce is returned as notes (`env_recipe`) and recorded:
`renorm-all`'s re-normalisation (a re-parametrisation the first-order meta-gradient cannot pass
through), `bnrecal-all`'s recalibration (nothing to simulate: the inner loop runs BatchNorm on
batch statistics), the eval-mode features of a `-FC` attack (the inner loop runs in train mode),
and the diffusion `up` / `down` strategies (the inner loop trains the whole UNet).

`with_recipes` puts them into a step's environments: each drawn environment is replaced, with
probability `protect.env.recipe_prob`, by one of the recipes chosen uniformly, from its own seeded
generator, so a config without recipes draws exactly what it drew before.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping
from typing import Any

from sophon_ray.config import EnvRecipe, EnvSpace, Recipe, recipe_label
from sophon_ray.core.attack import DIFFUSION_STRATEGIES, HEAD_STRATEGIES, PREPROCESSING, SCHEDULES, validate_recipe
from sophon_ray.core.inner import INNER_OPTIMIZERS, Environment
from sophon_ray.errors import UserError

# attack optimizer -> (inner optimizer, decoupled weight decay)
OPTIMIZER_MAP = {"adamw": ("adam", True)}
NOTES = {
    "renorm-all": "renorm-all: the re-normalisation before fine-tuning is not simulated (simulated as direct-all)",
    "bnrecal-all": "bnrecal-all: BatchNorm recalibration not simulated (the inner loop uses batch statistics)",
    "-FC": "head-only: the attack's frozen features run in eval mode, the inner loop's in train mode",
    "up": "up: the inner loop trains the whole UNet, the attack only up_blocks",
    "down": "down: the inner loop trains the whole UNet, the attack only down_blocks",
}


def env_recipe(recipe: Recipe, steps: int, total: int, support_per_class: int | None) -> tuple[EnvRecipe, tuple[str, ...]]:
    """The fixed FTS environment that simulates `recipe` up to the budget where it won.

    Args:
        recipe: the audit's attack (validated like any recipe).
        steps: the simulated horizon K: the budget (in optimizer steps) where the recipe won.
        total: the attack's length in optimizer steps (its largest budget), over which its lr
            schedule runs.
        support_per_class: the attacker's restricted images per class (None: the whole pool).
    Returns:
        (the environment, notes on what the inner loop does not reproduce; empty when exact).
    """
    validate_recipe(recipe)
    if steps < 1 or total < steps:
        raise UserError(f"a fed-back recipe needs 1 <= horizon ({steps}) <= the attack's length ({total})")
    s = recipe.strategy
    if s not in HEAD_STRATEGIES + PREPROCESSING + DIFFUSION_STRATEGIES:
        raise UserError(f"strategy {s!r} cannot be simulated")
    optimizer, decoupled = OPTIMIZER_MAP.get(recipe.optimizer, (recipe.optimizer, False))
    notes = [NOTES[k] for k in (s, "-FC" if s.endswith("-FC") else "") if k in NOTES]
    env = EnvRecipe(
        optimizer=optimizer, lr=float(recipe.lr), batch_size=int(recipe.batch_size), steps=int(steps),
        reinit_head=s.startswith("initFC"), head_only=s.endswith("-FC"),
        weight_decay=float(recipe.weight_decay), decoupled_decay=decoupled and recipe.weight_decay > 0,
        schedule=recipe.schedule, schedule_total=int(total) if recipe.schedule != "constant" else 0,
        warmup_steps=int(recipe.warmup_steps) if recipe.schedule == "warmup" else 0,
        support_per_class=support_per_class, label=f"{recipe_label(recipe)} @{steps}",
    )
    return env, tuple(notes)


def as_env_recipe(item: Any, where: str = "protect.env.recipes") -> EnvRecipe:
    """An `EnvRecipe` from itself or a mapping of its fields (`--set`, a YAML pipeline file, a
    state file), every field checked; UserError naming the fix otherwise."""
    if isinstance(item, Mapping):
        names = {f.name for f in dataclasses.fields(EnvRecipe)}
        unknown = sorted(set(item) - names)
        if unknown:
            raise UserError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
        item = EnvRecipe(**item)
    if not isinstance(item, EnvRecipe):
        raise UserError(f"{where}: expected a mapping of EnvRecipe fields, got {item!r}")
    r = item
    checks = [
        (r.optimizer in INNER_OPTIMIZERS, f"optimizer {r.optimizer!r} is not one of {', '.join(INNER_OPTIMIZERS)}"),
        (isinstance(r.lr, (int, float)) and math.isfinite(r.lr) and r.lr > 0, "lr must be > 0"),
        (type(r.batch_size) is int and r.batch_size >= 1, "batch_size must be a positive integer"),
        (type(r.steps) is int and r.steps >= 1, "steps (the horizon K) must be a positive integer"),
        (r.weight_decay >= 0, "weight_decay must be >= 0"),
        (r.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
        (r.schedule_total == 0 or r.schedule_total >= r.steps, "schedule_total must be 0 or >= steps"),
        (r.warmup_steps >= 0, "warmup_steps must be >= 0"),
        (r.support_per_class is None or (type(r.support_per_class) is int and r.support_per_class >= 1),
         "support_per_class must be a positive integer or None"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(f"{where}: {message} (in {r})")
    return r


def validate_space(space: EnvSpace) -> tuple[EnvRecipe, ...]:
    """The space's fixed recipes, checked (UserError naming the field), and its `recipe_prob`."""
    if not 0.0 <= space.recipe_prob <= 1.0:
        raise UserError("protect.env.recipe_prob must be in [0, 1]")
    return tuple(as_env_recipe(r, f"protect.env.recipes.{i}") for i, r in enumerate(space.recipes))


def environment_of(r: EnvRecipe) -> Environment:
    """The inner loop's `Environment` for a fixed recipe."""
    return Environment(optimizer=r.optimizer, lr=float(r.lr), batch_size=r.batch_size, steps=r.steps,
                       reinit_head=r.reinit_head, head_only=r.head_only, weight_decay=float(r.weight_decay),
                       decoupled_decay=r.decoupled_decay, schedule=r.schedule, schedule_total=r.schedule_total,
                       warmup_steps=r.warmup_steps, support_per_class=r.support_per_class, recipe=r.label or "fed-back")


def with_recipes(envs: list[Environment], recipes: tuple[Any, ...], prob: float, rng: random.Random) -> list[Environment]:
    """`envs` with each replaced, with probability `prob`, by one of `recipes` (uniformly), drawn
    from `rng` (its own seeded generator: the sampled environments stay what they were)."""
    if not recipes:
        return envs
    fixed = [environment_of(as_env_recipe(r)) for r in recipes]
    out = []
    for env in envs:
        hit, pick = rng.random() < prob, rng.randrange(len(fixed))
        out.append(fixed[pick] if hit else env)
    return out
