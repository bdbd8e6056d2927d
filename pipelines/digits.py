"""digits: bundled, offline, real handwritten digits (scikit-learn load_digits, 1797 8x8 images).

Original domain: digits 0-4 (labels 0-4). Restricted domain: digits 5-9 (labels y-5), so both
share a 5-way label space and `direct-*` attacks can keep the head. Split by index: test =
i % 5 == 0. Images are resized 8x8 -> 16x16 (bilinear), scaled to [0, 1], normalised with
mean 0.5 / std 0.5.

Protection simulates E = 4 environments per FTS step from the default six-optimizer
distribution (E = 2, or SGD/momentum/Adam only, let RMSprop/Adagrad/Adadelta attackers
through: docs/results.md). Attack budgets stop at 100 steps, where training from scratch has
converged on every measured run (pass --budgets 10,25,50,100,200,400 to audit longer).
"""

from __future__ import annotations

import dataclasses

from sophon_ray.config import (
    ArchSpec, AttackConfig, DomainSpec, InputSpec, PipelineConfig, PretrainConfig, ProtectConfig,
)


def get_config(smoke: bool = False) -> PipelineConfig:
    cfg = PipelineConfig(
        name="digits",
        description="bundled real digits: protect 0-4 (original) against fine-tuning on 5-9 (restricted), small CNN",
        kind="classifier",
        input=InputSpec(channels=1, size=16, resize="bilinear", mean=(0.5,), std=(0.5,)),
        original=DomainSpec(source="digits", classes=(0, 1, 2, 3, 4)),
        restricted=(DomainSpec(source="digits", classes=(5, 6, 7, 8, 9)),),
        arch=ArchSpec(name="cnn-small"),
        pretrain=PretrainConfig(steps=600, batch_size=64, lr=2e-3),
        protect=ProtectConfig(iterations=200, envs_per_step=4, inner_steps=10, loss="klu", alpha=1e-3),
        attack=AttackConfig(budgets=(10, 25, 50, 100)),  # scratch has converged (0.994) by 100 steps
    )
    if smoke:
        cfg = dataclasses.replace(
            cfg,
            pretrain=dataclasses.replace(cfg.pretrain, steps=60),
            protect=dataclasses.replace(cfg.protect, iterations=6, inner_steps=3, guard_every=3),
            attack=dataclasses.replace(cfg.attack, budgets=(5, 10)),
        )
    return cfg
