"""digits-diffusion: bundled digits as a generation task (DDPM, ε-prediction UNet).

Original domain: digits 0-4; restricted domain: digits 5-9 (the `digits` split: test = i % 5 == 0).
1 channel at the digits' native 8x8 (16x16 upsampling added no information and cost 3.2x per UNet
step, which put `sophon-ray run` far beyond 20 minutes on 2 cores), pixels in [-1, 1] (mean 0.5,
std 0.5). The source model is a unet-small (unet-tiny in the smoke config). A UNet has no head, so the simulated environments
never re-initialise or probe one. The judge, a cnn-small trained on all ten digits and a "no digit" class with the same
input spec (`judge_config`, carried as `diffusion.judge`), labels generated samples for the
"recognised as restricted" metric (`diffusion.judge_classes` = 5-9) after the audit.
"""

from __future__ import annotations

import dataclasses

from sophon_ray.config import (
    ArchSpec, AttackConfig, DiffusionConfig, DiffusionPipelineConfig, DomainSpec, EnvSpace, InputSpec,
    PipelineConfig, PretrainConfig, ProtectConfig,
)

INPUT = InputSpec(channels=1, size=8, resize="bilinear", mean=(0.5,), std=(0.5,))
RESTRICTED_DIGITS = (5, 6, 7, 8, 9)  # the judge's labels that count as restricted
NONE = 10  # the judge's "no digit" label (digits' none_class option)


def get_config(smoke: bool = False) -> DiffusionPipelineConfig:
    # The simulated attackers match the audit's (suite diffusion-v2): the same optimizer families,
    # lr ranges and batch sizes 16/32 (not the one batch-64 recipe), inner paths of 20 steps.
    env = EnvSpace(
        optimizers=("sgd", "momentum", "adam", "rmsprop", "adagrad"),
        lr={"sgd": (1e-2, 3e-2), "momentum": (1e-3, 3e-3), "adam": (1e-4, 3e-3), "rmsprop": (1e-4, 1e-3),
            "adagrad": (3e-3, 1e-2)},
        batch_sizes=(16, 32),
        reinit_head_prob=0.0,
        head_only_prob=0.0,
    )
    cfg = DiffusionPipelineConfig(
        name="digits-diffusion",
        description="bundled digits as DDPM generation: keep 0-4 (original), resist fine-tuning on 5-9, small UNet",
        kind="diffusion",
        input=INPUT,
        original=DomainSpec(source="digits", classes=(0, 1, 2, 3, 4)),
        restricted=(DomainSpec(source="digits", classes=RESTRICTED_DIGITS),),
        arch=ArchSpec(name="unet-small"),
        pretrain=PretrainConfig(steps=3000, batch_size=64, lr=1e-3),
        protect=ProtectConfig(
            iterations=100, envs_per_step=2, inner_steps=20, query_every=4, nl_loop=1, loss="mse-ascent", query_batch=32,
            ntr_batch=32, alpha=1e-3, beta=3e-4, clip=0.5, guard_margin=0.10, guard_every=10, env=env,
        ),
        attack=AttackConfig(budgets=(25, 50, 100, 200, 400)),
        diffusion=DiffusionConfig(t_range=None, retain="teacher", judge=judge_config(), judge_classes=RESTRICTED_DIGITS,
                                  judge_confidence=0.9, judge_none_class=NONE),
    )
    if smoke:
        cfg = dataclasses.replace(
            cfg,
            arch=ArchSpec(name="unet-tiny"),
            pretrain=dataclasses.replace(cfg.pretrain, steps=20, batch_size=16),
            protect=dataclasses.replace(cfg.protect, iterations=2, inner_steps=2, query_batch=8, ntr_batch=8,
                                        guard_every=1, env=dataclasses.replace(env, batch_sizes=(8,))),
            attack=dataclasses.replace(cfg.attack, budgets=(2, 4)),
            diffusion=dataclasses.replace(cfg.diffusion, samples=16, sample_steps=10, judge=judge_config(smoke=True)),
        )
    return cfg


def judge_config(smoke: bool = False) -> PipelineConfig:
    """The judge: a cnn-small classifier of all ten digits plus "no digit" (label `NONE`: noise,
    shuffled-pixel digits, smooth blobs) on the same 8x8 [-1, 1] inputs."""
    ten = DomainSpec(source="digits", options={"none_class": True})
    cfg = PipelineConfig(
        name="digits-diffusion-judge",
        description="digit classifier (0-9 and 10 = no digit) that labels generated samples",
        kind="classifier",
        input=INPUT,
        original=ten,
        restricted=(ten,),
        arch=ArchSpec(name="cnn-small"),
        pretrain=PretrainConfig(steps=800, batch_size=64, lr=2e-3),
    )
    return dataclasses.replace(cfg, pretrain=dataclasses.replace(cfg.pretrain, steps=60)) if smoke else cfg
