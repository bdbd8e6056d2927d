"""Raw uint8 images -> normalised float model inputs, as described by an `InputSpec`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sophon_ray.config import InputSpec
from sophon_ray.data.images import Images
from sophon_ray.errors import UserError

_RESIZE_MODES = ("bilinear", "nearest")
_CHUNK = 4096  # images per interpolate call, bounds the float intermediate's memory


def _per_channel(values: tuple[float, ...], channels: int, what: str) -> torch.Tensor:
    vals = tuple(float(v) for v in values)
    if len(vals) == 1:
        vals = vals * channels
    if len(vals) != channels:
        raise UserError(
            f"input.{what} has {len(vals)} values but input.channels={channels}; give 1 or {channels} values"
        )
    return torch.tensor(vals, dtype=torch.float32).view(1, channels, 1, 1)  # (1, C, 1, 1)


def _check_channels(c: int, channels: int) -> None:
    if c != channels and (c, channels) not in ((1, 3), (3, 1)):
        raise UserError(
            f"images have {c} channels but input.channels={channels}; only 1->3 and 3->1 are converted, "
            f"set input.channels={c}"
        )


def _match_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """x: float (n, C, H, W) -> (n, channels, H, W); C must pass `_check_channels`."""
    if x.shape[1] == channels:
        return x
    if channels == 3:
        return x.expand(-1, 3, -1, -1)  # grey -> RGB by repetition
    return x.mean(dim=1, keepdim=True)  # RGB -> grey, plain channel mean


def check_input(spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate an input spec without any data; returns per-channel (mean, std), each (1, C, 1, 1)."""
    if spec.resize not in _RESIZE_MODES:
        raise UserError(f"input.resize={spec.resize!r} is unknown; use one of {', '.join(_RESIZE_MODES)}")
    if spec.size < 1:
        raise UserError(f"input.size={spec.size} must be a positive number of pixels")
    mean = _per_channel(spec.mean, spec.channels, "mean")
    std = _per_channel(spec.std, spec.channels, "std")
    if bool((std == 0).any()):
        raise UserError("input.std contains 0; every channel needs a non-zero std")
    return mean, std


def preprocess(images: Images, spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize, scale to [0, 1] and normalise raw images.

    Args:
        images: uint8 (N, H, W, C) images with int64 labels.
        spec: target channels, size S, resize mode ("bilinear" | "nearest"), per-channel mean/std.

    Returns:
        (x, y): x float32 (N, channels, S, S) equal to (resize(raw) / 255 - mean) / std; y int64 (N,).
    """
    mean, std = check_input(spec)
    _check_channels(images.x.shape[-1], spec.channels)
    n, s = len(images), spec.size
    out = torch.empty(n, spec.channels, s, s, dtype=torch.float32)  # (N, C', S, S)
    for i in range(0, n, _CHUNK):
        x = images.x[i : i + _CHUNK].permute(0, 3, 1, 2).float()  # (n, H, W, C) -> (n, C, H, W)
        x = _match_channels(x, spec.channels)
        if tuple(x.shape[-2:]) != (s, s):
            if spec.resize == "bilinear":
                x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
            else:
                x = F.interpolate(x, size=(s, s), mode="nearest")
        out[i : i + _CHUNK] = (x / 255.0 - mean) / std
    return out, images.y
