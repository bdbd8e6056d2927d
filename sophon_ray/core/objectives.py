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
    `loss` (ICE / KLU). The metric is the simulated fine-tuned model's query accuracy.

    `teacher` (a frozen source model, co-training from a fresh init): the NTR loss adds the
    distillation term KL(teacher's softmax || the model's) on the same original-domain batch, so the
    model learns the source's behaviour on the original task, not only its labels."""

    loss: SuppressionLoss
    teacher: torch.nn.Module | None = None

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
        logits = model(x)  # (B, C)
        if self.teacher is None:
            return F.cross_entropy(logits, y)
        return F.cross_entropy(logits, y) + distillation(logits, self.teacher, x)


def distillation(logits: torch.Tensor, teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher(x)) || softmax(logits)), batch mean; the teacher runs in eval mode, no grad.

    Args:
        logits: (B, C) the student's logits on x; teacher: the frozen source; x: (B, C_in, H, W).
    Returns:
        A scalar.
    """
    teacher.eval()
    with torch.no_grad():
        target = F.log_softmax(teacher(x), -1)  # (B, C)
    return F.kl_div(F.log_softmax(logits, -1), target, reduction="batchmean", log_target=True)
