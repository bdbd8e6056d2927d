"""cifar100-celeba: the paper's generation setting, CIFAR-100 (original) -> CelebA (restricted).

Needs data on disk (nothing is downloaded): CIFAR-100 in torchvision's layout under
`original.root` (default ~/data: ~/data/cifar-100-python/...), and CelebA as an image folder under
`restricted.0.root` (default ~/data/celeba: celeba/train/<any class folder>/*.jpg and
celeba/test/<any class folder>/*.jpg). Without them every job stops with a one-line error
naming the folder. 3x32x32, pixels in [-1, 1], the DDPM CIFAR-10 UNet (unet-paper, 35.7 M).
There is no judge classifier for faces yet: the audit draws sample grids only (no "recognised" metric).
"""

from __future__ import annotations

import dataclasses

from sophon_ray.config import (
    ArchSpec, AttackConfig, DiffusionConfig, DiffusionPipelineConfig, DomainSpec, EnvSpace, InputSpec,
    PretrainConfig, ProtectConfig,
)


def get_config(smoke: bool = False) -> DiffusionPipelineConfig:
    env = EnvSpace(
        optimizers=("sgd", "momentum", "adam"),
        lr={"sgd": (1e-3, 3e-2), "momentum": (1e-4, 3e-3), "adam": (2e-5, 1e-3)},
        batch_sizes=(32, 64),
        reinit_head_prob=0.0,
        head_only_prob=0.0,
    )
    cfg = DiffusionPipelineConfig(
        name="cifar100-celeba",
        description="CIFAR-100 -> CelebA generation (paper setting; needs the data under original.root / restricted.0.root)",
        kind="diffusion",
        input=InputSpec(channels=3, size=32, resize="bilinear", mean=(0.5,), std=(0.5,)),
        original=DomainSpec(source="cifar100", root="~/data"),
        restricted=(DomainSpec(source="imagefolder", root="~/data/celeba", options={"size": 32}),),
        arch=ArchSpec(name="unet-paper"),
        pretrain=PretrainConfig(steps=100_000, batch_size=128, lr=2e-4),
        protect=ProtectConfig(
            iterations=2000, envs_per_step=2, inner_steps=5, loss="dos", query_batch=64, ntr_batch=64,
            alpha=1e-4, beta=2e-5, clip=0.5, guard_margin=0.10, guard_every=50, env=env,
        ),
        attack=AttackConfig(budgets=(500, 1000, 2000, 4000, 8000), eval_batch=256),
        diffusion=DiffusionConfig(t_range=(0, 500)),
    )
    if smoke:
        cfg = dataclasses.replace(
            cfg,
            pretrain=dataclasses.replace(cfg.pretrain, steps=20, batch_size=8),
            protect=dataclasses.replace(cfg.protect, iterations=2, inner_steps=2, query_batch=4, ntr_batch=4,
                                        guard_every=1, env=dataclasses.replace(env, batch_sizes=(4,))),
            attack=dataclasses.replace(cfg.attack, budgets=(2, 4)),
            diffusion=dataclasses.replace(cfg.diffusion, samples=8, sample_steps=10),
        )
    return cfg
