"""Named, versioned attack suites: fixed lists of recipes for reproducible audits.

A suite name carries its version (`quick-v1`); changing a suite means adding a new name, so an
old audit can always be re-run with the recipes it used.
"""

from __future__ import annotations

from sophon_ray.config import Recipe
from sophon_ray.errors import UserError

R = Recipe

# 16 recipes: all four strategies; SGD, momentum, Adam, AdamW, RMSprop, Adagrad, Adadelta;
# lr 1e-4 .. 1e-1; constant, cosine and warm-up schedules. Used by `sophon-ray run` locally and
# by the digits results in docs/results.md.
QUICK_V1: tuple[Recipe, ...] = (
    R("direct-all", "sgd", 1e-2, 32),
    R("direct-all", "momentum", 1e-2, 32),
    R("direct-all", "adam", 1e-3, 32),
    R("direct-all", "adam", 1e-4, 32),
    R("direct-all", "rmsprop", 1e-3, 32),
    R("direct-all", "adagrad", 1e-2, 32),
    R("direct-FC", "adam", 1e-2, 32),
    R("direct-FC", "sgd", 1e-1, 32),
    R("initFC-all", "adam", 1e-3, 32),
    R("initFC-all", "adamw", 1e-3, 32, weight_decay=1e-2, schedule="cosine"),
    R("initFC-all", "sgd", 1e-1, 32),
    R("initFC-all", "rmsprop", 1e-4, 32, schedule="warmup"),
    R("initFC-all", "adagrad", 1e-1, 32),
    R("initFC-all", "adadelta", 1.0, 32),
    R("initFC-FC", "adam", 1e-2, 32),
    R("initFC-FC", "sgd", 1e-1, 32),
)

SUITES: dict[str, tuple[Recipe, ...]] = {"quick-v1": QUICK_V1}


def get_suite(name: str) -> tuple[Recipe, ...]:
    if name not in SUITES:
        raise UserError(f"unknown attack suite {name!r}; use one of: {', '.join(SUITES)}")
    return SUITES[name]


def recipe_label(r: Recipe) -> str:
    extra = (f" wd{r.weight_decay:g}" if r.weight_decay else "") + (f" {r.schedule}" if r.schedule != "constant" else "")
    return f"{r.strategy} {r.optimizer} lr{r.lr:g} bs{r.batch_size}{extra}"
