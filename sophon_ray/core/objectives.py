"""Objectives binding a model kind to the inner loop: what fine-tuning fits, what FTS suppresses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sophon_ray.core.inner import Batch, Params, call
from sophon_ray.core.losses import SuppressionLoss


@dataclass(frozen=True)
class ClassificationObjective:
    """Support batches (x, y) are fitted with cross-entropy; query batches are suppressed with
    `loss` (ICE / KLU). The metric is the simulated fine-tuned model's query accuracy."""

    loss: SuppressionLoss

    def fit(self, model: torch.nn.Module, state: Params, batch: Batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(call(model, state, x), y)

    def suppress(self, model: torch.nn.Module, state: Params, batch: Batch) -> tuple[torch.Tensor, float]:
        x, y = batch
        logits = call(model, state, x)  # (B, C)
        acc = float((logits.detach().argmax(-1) == y).float().mean())
        return self.loss(logits, y), acc

    def train_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The NTR loss on an original-domain batch, with the module's own parameters."""
        x, y = batch
        return F.cross_entropy(model(x), y)
