"""Evaluation over batches (eval mode, no grad; the module's mode is restored)."""

from __future__ import annotations

import torch


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` on (x, y) in eval mode.

    Args:
        model: a classifier returning logits (B, C).
        x: inputs (N, C, H, W); y: labels (N,).
        batch_size: evaluation batch size.
    Returns:
        Fraction of correct predictions in [0, 1] (NaN logits count as wrong).
    """
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, len(x), batch_size):
            logits = model(x[i : i + batch_size])
            ok = (logits.argmax(-1) == y[i : i + batch_size]) & torch.isfinite(logits).all(-1)
            correct += int(ok.sum())
    finally:
        model.train(was_training)
    return correct / max(len(x), 1)
