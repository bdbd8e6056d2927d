"""The tiny seeded test model of the engine's unit tests: Linear(6, 12) - Tanh - Linear(12, 3), with
the head as `head.*` (what a re-initialising environment replaces)."""

from __future__ import annotations

import torch


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh())
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x):  # (B, 6) -> (B, 3)
        return self.head(self.body(x))
