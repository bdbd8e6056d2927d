"""The two data containers: raw uint8 `Images` and a labelled train/test `Domain`."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Images:
    """Raw images and labels.

    Attributes:
        x: uint8 (N, H, W, C), raw pixels 0..255.
        y: int64 (N,), class labels.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"Images.x must be uint8 (N, H, W, C), got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.dim() != 1:
            raise ValueError(f"Images.y must be int64 (N,), got {self.y.dtype} {tuple(self.y.shape)}")
        if len(self.x) != len(self.y):
            raise ValueError(f"Images has {len(self.x)} images but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Domain:
    """A labelled image domain: train and test images sharing labels 0..num_classes-1."""

    name: str
    train: Images
    test: Images
    num_classes: int
