"""Named, versioned classifier attack suites: fixed lists of recipes for reproducible audits.

A suite name carries its version (`quick-v1`); changing a suite means adding a new name, so an
old audit can always be re-run with the recipes it used.
"""

from __future__ import annotations

import dataclasses

from sophon_ray.config import Recipe
from sophon_ray.errors import UserError
from sophon_ray.tasks.base import SuiteProtocol

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

# 18 recipes: quick-v1 plus the two recipes that train a random init fastest on digits among
# default-v1's 48 (direct-all Adadelta 1.0, 0.848 at 10 steps / 0.966 at 25; initFC-all Nesterov
# 3e-2 cosine, 0.837 at 10). Without them quick-v1's from-scratch reference is far weaker than
# default-v1's (0.674 vs 0.848 at 10 steps), so its verdict did not approximate the default
# suite's. The quick default of `sophon-ray run` since 2026-12-02 (docs/design.md).
QUICK_V2: tuple[Recipe, ...] = QUICK_V1 + (
    R("direct-all", "adadelta", 1.0, 32),
    R("initFC-all", "nesterov", 3e-2, 64, weight_decay=1e-4, schedule="cosine"),
)

# 19 recipes: quick-v2 plus the protected digits model's weakness that the adversarial search
# found (docs/results.md: TPE scored by the mean over budgets converged on `initFC-all adadelta`
# at lr 0.39-0.49 with weight decay). On the demo model of the fourth session (sha256 e1f55362…)
# lr 0.5 wd1e-3 reaches 0.837 at 10 steps (seed 0) where quick-v2's worst case was 0.781, so
# without it the demo audit underestimates the attacker. The quick default of `sophon-ray run`
# since 2026-12-03 (docs/design.md).
QUICK_V3: tuple[Recipe, ...] = QUICK_V2 + (
    R("initFC-all", "adadelta", 0.5, 32, weight_decay=1e-3),
)

# 48 recipes, the default of `sophon-ray audit`. First 32: every strategy x every optimizer at a
# standard learning rate (head-only strategies get the larger lrs a linear probe wants). Then 16
# variations: lr decades 1e-4 .. 1e-1 (incl. the paper's SGD 1e-4 attack), batch 16/64, weight
# decay, cosine and warm-up schedules.
_FULL_LR = {"sgd": 1e-2, "momentum": 1e-2, "nesterov": 1e-2, "adam": 1e-3, "adamw": 1e-3,
            "rmsprop": 1e-4, "adagrad": 1e-2, "adadelta": 1.0}
_HEAD_LR = {"sgd": 1e-1, "momentum": 1e-2, "nesterov": 1e-2, "adam": 1e-2, "adamw": 1e-2,
            "rmsprop": 1e-3, "adagrad": 1e-1, "adadelta": 1.0}


def _grid() -> tuple[Recipe, ...]:
    out = []
    for strategy in ("direct-all", "direct-FC", "initFC-all", "initFC-FC"):
        table = _HEAD_LR if strategy.endswith("-FC") else _FULL_LR
        for opt, lr in table.items():
            out.append(R(strategy, opt, lr, 32, weight_decay=1e-2 if opt == "adamw" else 0.0))
    return tuple(out)


DEFAULT_V1: tuple[Recipe, ...] = _grid() + (
    R("direct-all", "sgd", 1e-4, 32),
    R("direct-all", "sgd", 1e-1, 32, schedule="cosine"),
    R("direct-all", "adam", 1e-4, 32),
    R("direct-all", "adam", 1e-2, 32, schedule="warmup"),
    R("direct-all", "adamw", 3e-4, 64, weight_decay=1e-2, schedule="cosine"),
    R("direct-all", "momentum", 1e-3, 16),
    R("direct-FC", "adam", 1e-3, 64, schedule="cosine"),
    R("initFC-all", "sgd", 1e-1, 32),
    R("initFC-all", "momentum", 1e-1, 32, schedule="cosine"),
    R("initFC-all", "adam", 1e-4, 32),
    R("initFC-all", "adam", 3e-3, 64, schedule="warmup"),
    R("initFC-all", "rmsprop", 1e-3, 32, schedule="cosine"),
    R("initFC-all", "adadelta", 1e-1, 16),
    R("initFC-all", "nesterov", 3e-2, 64, weight_decay=1e-4, schedule="cosine"),
    R("initFC-all", "adagrad", 1e-1, 32),
    R("initFC-FC", "adam", 1e-1, 32),
)

# 60 recipes: default-v1's 48 unchanged, then 12 that undo obfuscation before fine-tuning like
# direct-all (core/attack.py, issue 29 part 4): `renorm-all` (each BN-fed conv/linear re-scaled to
# unit norm per output channel, BN compensated) and `bnrecal-all` (BN statistics recomputed on the
# attacker's data), each with default-v1's strongest direct-all recipes: the adaptive optimizers
# that broke the default protection (Adadelta 1.0, RMSprop 1e-3, Adagrad 1e-2, Adam 1e-3) and
# SGD / momentum 1e-2, the optimizers a x10 re-scaling of BN-fed weights slows 100-fold.
_UNDO = (("adadelta", 1.0), ("rmsprop", 1e-3), ("adagrad", 1e-2), ("adam", 1e-3), ("sgd", 1e-2), ("momentum", 1e-2))
DEFAULT_V2: tuple[Recipe, ...] = DEFAULT_V1 + tuple(
    R(strategy, opt, lr, 32) for strategy in ("renorm-all", "bnrecal-all") for opt, lr in _UNDO
)

# 4 recipes, one per strategy: for tests and quick demos only.
TEST_V1: tuple[Recipe, ...] = (
    R("initFC-all", "adam", 1e-3, 32),
    R("direct-all", "sgd", 1e-2, 32),
    R("initFC-FC", "sgd", 1e-1, 32),
    R("direct-FC", "adam", 1e-2, 32, schedule="cosine"),
)

# 9 recipes: the SOPHON paper's own evaluation (docs/design.md, "The paper's protocol"). First the
# released code's attack exactly (classification/finetune_test.py: SGD momentum 0.9, weight decay
# 1e-4, lr 1e-4, batch 200, every weight trained, head kept), then the axes the abstract names at
# the paper's scale: the three fine-tuning methods (head re-initialised + all weights, head only),
# five optimizers at lr 1e-4 (SGD, momentum, Nesterov, Adam, Adagrad), one more lr decade for the
# headline optimizer, and batch 64. Budgets 5 / 10 / 20 epochs over the WHOLE restricted training
# split (PAPER_V1_PROTOCOL), whatever the pipeline's attack.train_per_class.
_PAPER = {"weight_decay": 1e-4}
PAPER_V1: tuple[Recipe, ...] = (
    R("direct-all", "momentum", 1e-4, 200, **_PAPER),
    R("initFC-all", "momentum", 1e-4, 200, **_PAPER),
    R("direct-FC", "momentum", 1e-4, 200, **_PAPER),
    R("direct-all", "sgd", 1e-4, 200, **_PAPER),
    R("direct-all", "nesterov", 1e-4, 200, **_PAPER),
    R("direct-all", "adam", 1e-4, 200, **_PAPER),
    R("direct-all", "adagrad", 1e-4, 200, **_PAPER),
    R("direct-all", "momentum", 1e-3, 200, **_PAPER),
    R("direct-all", "momentum", 1e-4, 64, **_PAPER),
)
PAPER_V1_PROTOCOL = SuiteProtocol(
    budgets=(5, 10, 20), unit="epochs", attacker_data="full", certifies=False,
    note="the SOPHON paper's evaluation (gentle: lr 1e-4, 9 recipes): recorded, never certifies")

# 5 recipes: issue 29's fixed screen, for comparing protections quickly (never certifies: too few
# recipes): the four that break the default mnist-to-digits protection (docs/results.md) plus the
# paper's SGD 1e-4. `--suite screen-v1 --budgets 10,25` is the screen of docs/history/results-2026-12-07.md, "Hardening (issue 29)".
SCREEN_V1: tuple[Recipe, ...] = (
    R("direct-all", "adadelta", 1.0, 32),
    R("direct-all", "rmsprop", 1e-3, 32),
    R("direct-all", "adagrad", 1e-2, 32),
    R("initFC-all", "adadelta", 0.5, 32, weight_decay=1e-3),
    R("direct-all", "sgd", 1e-4, 32),
)

# Issue 36's fixed judge of protection objectives, beyond the simulated horizon (`--budgets 10,25,100`):
# screen-v1 plus two attackers that train on their whole 100 images as one batch (a batch size the
# default FTS environments never draw: 16 / 32 / 64; one such recipe broke the 16x model at 25 steps).
HORIZON_V1: tuple[Recipe, ...] = SCREEN_V1 + (
    R("direct-all", "adam", 1e-3, 100),
    R("direct-all", "rmsprop", 1e-3, 100),
)
# ... and the paper protocol's threats that break protections: its adaptive optimizers at lr 1e-4
# (adam, adagrad, and rmsprop, which an independent check used) and momentum at 1e-3, 20 epochs on
# the whole restricted split. A protocol suite: recorded, never certifies.
PAPER_ADAPTIVE_V1: tuple[Recipe, ...] = (
    R("direct-all", "adam", 1e-4, 200, **_PAPER),
    R("direct-all", "adagrad", 1e-4, 200, **_PAPER),
    R("direct-all", "rmsprop", 1e-4, 200, **_PAPER),
    R("direct-all", "momentum", 1e-3, 200, **_PAPER),
)
PAPER_ADAPTIVE_V1_PROTOCOL = dataclasses.replace(
    PAPER_V1_PROTOCOL, note="paper-v1's adaptive recipes + momentum 1e-3 (issue 36's judge): recorded, never certifies")

DEFAULT_SUITE = "default-v1"
SUITES: dict[str, tuple[Recipe, ...]] = {"quick-v1": QUICK_V1, "quick-v2": QUICK_V2, "quick-v3": QUICK_V3,
                                         "default-v1": DEFAULT_V1, "test-v1": TEST_V1, "paper-v1": PAPER_V1,
                                         "default-v2": DEFAULT_V2,
                                         "screen-v1": SCREEN_V1, "horizon-v1": HORIZON_V1,
                                         "paper-adaptive-v1": PAPER_ADAPTIVE_V1}
PROTOCOLS: dict[str, SuiteProtocol] = {"paper-v1": PAPER_V1_PROTOCOL, "paper-adaptive-v1": PAPER_ADAPTIVE_V1_PROTOCOL}


def get_suite(name: str) -> tuple[Recipe, ...]:
    """The recipes of a named suite.

    Args:
        name: a key of `SUITES` (e.g. "default-v1").
    Returns:
        The suite's recipes, in their fixed order.
    """
    if name not in SUITES:
        raise UserError(f"unknown attack suite {name!r}; use one of: {', '.join(SUITES)}")
    return SUITES[name]
