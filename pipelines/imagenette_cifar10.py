"""imagenette-cifar10: the paper's classification setting, ImageNette (original) -> CIFAR-10 (restricted).

Needs data on disk (nothing is downloaded): ImageNette (fast.ai's `imagenette2`, 10 ImageNet classes)
as an image folder under `original.root` (default ~/data/imagenette2: train/<wnid>/*.JPEG and
val/<wnid>/*.JPEG), and CIFAR-10 in torchvision's layout under `restricted.0.root` (default ~/data:
~/data/cifar-10-batches-py/...). Either may instead be Parquet (`--set original.source=parquet`,
see docs/design.md). Without the data every job stops with a one-line error naming the folder.

10 classes on both sides (the label spaces differ in meaning; `direct-*` attacks keep the head
anyway, as in the paper). 3x32x32 with ImageNet normalisation (`--set input.size=64 --set
original.options.size=64` for 64x64), ResNet-18 with a CIFAR stem by default; `--set
arch.name=resnet50` or `--set arch.name=vgg13` selects the paper's other architectures.
"""

from __future__ import annotations

import dataclasses

from sophon_ray.config import (
    ArchSpec, AttackConfig, DomainSpec, EnvSpace, InputSpec, PipelineConfig, PretrainConfig, ProtectConfig,
)

SIZE = 32
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def get_config(smoke: bool = False) -> PipelineConfig:
    env = EnvSpace(
        optimizers=("sgd", "momentum", "adam"),
        lr={"sgd": (1e-3, 1e-1), "momentum": (1e-4, 1e-2), "adam": (1e-5, 1e-3)},
        batch_sizes=(32, 64),
        reinit_head_prob=0.5,
        head_only_prob=0.25,
    )
    cfg = PipelineConfig(
        name="imagenette-cifar10",
        description="ImageNette -> CIFAR-10 classification (paper setting; needs the data under original.root / restricted.0.root)",
        kind="classifier",
        input=InputSpec(channels=3, size=SIZE, resize="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD),
        original=DomainSpec(source="imagefolder", root="~/data/imagenette2", test_split="val",
                            options={"size": SIZE}),
        restricted=(DomainSpec(source="cifar10", root="~/data"),),
        arch=ArchSpec(name="resnet18"),
        pretrain=PretrainConfig(steps=8000, batch_size=128, lr=1e-3, weight_decay=5e-4),
        protect=ProtectConfig(iterations=1000, envs_per_step=2, inner_steps=10, loss="klu", query_batch=64,
                              ntr_batch=64, alpha=1e-4, beta=1e-4, clip=0.5, guard_margin=0.05, guard_every=50, env=env),
        attack=AttackConfig(budgets=(250, 500, 1000, 2000, 4000, 8000), eval_batch=512),
    )
    if smoke:
        cfg = dataclasses.replace(
            cfg,
            original=dataclasses.replace(cfg.original, options={"size": SIZE, "max_per_class": 20}),
            pretrain=dataclasses.replace(cfg.pretrain, steps=20, batch_size=16),
            protect=dataclasses.replace(cfg.protect, iterations=2, inner_steps=2, query_batch=8, ntr_batch=8,
                                        guard_every=1, env=dataclasses.replace(env, batch_sizes=(8,))),
            attack=dataclasses.replace(cfg.attack, budgets=(2, 4), eval_batch=256),
        )
    return cfg
