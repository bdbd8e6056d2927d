"""Unconditional DDPM denoisers: a diffusers `UNet2DModel` plus a `DDPMScheduler`.

diffusers is imported inside `build_diffusion` only, so `import sophon_ray.models` stays light.
All UNets keep diffusers' default mid block (ResNet + self-attention + ResNet). Note: attention
uses scaled_dot_product_attention, whose fused CUDA kernels have no double backward; for
second-order FTS on GPU use `arch.kwargs.mid_attention=False` (tiny/small) or the first order.
"""

from __future__ import annotations

from typing import Any

from sophon_ray.config import ArchSpec
from sophon_ray.errors import UserError
from sophon_ray.models.classifiers import check_kwargs

_ACCEPTED = ("timesteps", "dropout", "mid_attention")

_UNETS: dict[str, dict[str, Any]] = {
    "unet-tiny": dict(  # tests: ~0.16 M params (1 channel, any size)
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ),
    "unet-small": dict(  # digits default: 0.65 M params (1 channel, any size)
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ),
    "unet-paper": dict(  # DDPM CIFAR-10 (Ho et al. 2020): 35.7 M params, attention at 16x16
        block_out_channels=(128, 256, 256, 256),
        layers_per_block=2,
        norm_num_groups=32,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        attention_head_dim=None,  # one head over all channels, as in DDPM
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        dropout=0.1,
    ),
}


# arch.name for any UNet2DModel: arch.kwargs holds its config (block_out_channels, layers_per_block,
# down_block_types, up_block_types, ...; what `sophon-ray import` reads from a config.json), plus
# the keys of _ACCEPTED. sample_size, in_channels and out_channels come from the pipeline's input.
DIFFUSERS_UNET = "diffusers-unet"
_SIZED = ("sample_size", "in_channels", "out_channels")


def diffusion_names() -> list[str]:
    """Names accepted by `build_diffusion`."""
    return [*_UNETS, DIFFUSERS_UNET]


def unet_config_keys() -> tuple[str, ...]:
    """The UNet2DModel constructor arguments a `diffusers-unet` arch may set."""
    import inspect

    from diffusers import UNet2DModel

    return tuple(k for k in inspect.signature(UNet2DModel.__init__).parameters if k not in ("self", *_SIZED))


def _spec(arch: ArchSpec) -> dict[str, Any]:
    if arch.name == DIFFUSERS_UNET:
        kw = dict(arch.kwargs)
        check_kwargs(arch.name, kw, (*unet_config_keys(), "timesteps", "mid_attention"))
        missing = [k for k in ("block_out_channels", "down_block_types", "up_block_types") if k not in kw]
        if missing:
            raise UserError(f"arch {DIFFUSERS_UNET} needs arch.kwargs {missing} (a UNet2DModel config)")
        return {k: (tuple(v) if isinstance(v, list) else v) for k, v in kw.items() if k not in ("timesteps", "mid_attention")}
    if arch.name not in _UNETS:
        raise UserError(f"unknown diffusion arch {arch.name!r}; choose one of {diffusion_names()} (arch.name=...)")
    check_kwargs(arch.name, dict(arch.kwargs), _ACCEPTED)
    return _UNETS[arch.name]


def downsample_factor(arch: ArchSpec) -> int:
    """How many times the UNet shrinks its input: 2 ** (number of levels - 1).

    Args:
        arch: a diffusion arch (see `diffusion_names()`).

    Returns:
        The factor the image size must be divisible by.
    """
    return 2 ** (len(_spec(arch)["block_out_channels"]) - 1)


def build_diffusion(arch: ArchSpec, channels: int, size: int):
    """Build an unseeded UNet2DModel and its DDPM noise scheduler.

    Args:
        arch: name plus optional kwargs `timesteps` (scheduler steps, default 1000),
            `dropout` (default 0.1 for unet-paper, else 0.0), `mid_attention` (default True).
        channels: image channels (in = out).
        size: square image side; must be divisible by `downsample_factor(arch)`.

    Returns:
        (unet, scheduler): `unet(x, t).sample` predicts the noise epsilon of x (B, C, S, S).
    """
    spec = dict(_spec(arch))
    kw = dict(arch.kwargs)
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise UserError(f"input.channels must be an integer >= 1, got {channels!r}")
    factor = downsample_factor(arch)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % factor:
        raise UserError(
            f"image size {size} is not divisible by the UNet's down-sampling factor {factor}; "
            f"use a size that is a multiple of {factor} (input.size=...)"
        )
    if "dropout" in kw and arch.name != DIFFUSERS_UNET:
        dropout = kw["dropout"]
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise UserError(f"arch.kwargs.dropout must be a number in [0, 1), got {dropout!r}")
        spec["dropout"] = float(dropout)
    if arch.name != DIFFUSERS_UNET or "mid_attention" in kw:
        spec["add_attention"] = bool(kw.get("mid_attention", True))

    scheduler = build_scheduler(arch)
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, **spec)
    return unet, scheduler


def build_scheduler(arch: ArchSpec):
    """The DDPM noise scheduler of a diffusion arch (linear betas, ε-prediction).

    Args:
        arch: a diffusion arch; `arch.kwargs.timesteps` sets the schedule length (default 1000).

    Returns:
        A diffusers `DDPMScheduler`.
    """
    _spec(arch)
    timesteps = dict(arch.kwargs).get("timesteps", 1000)
    if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
        raise UserError(f"arch.kwargs.timesteps must be an integer >= 1, got {timesteps!r}")
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=timesteps, beta_schedule="linear", prediction_type="epsilon")
