"""Suppression losses (pure functions) for the FTS phase.

Classification losses take logits `z` (B, C) and labels `y` (B,) and are minimised by the
protector, i.e. they are small when the (simulated fine-tuned) model is BAD on the restricted
domain:

- `ice-neg` (default): the reference code's inverse cross-entropy, CE on negated logits,
  -log softmax(-z)_y; minimal when the true class gets the lowest logit.
- `ice-comp`: the other reading of "inverse" CE, -log(1 - p_y), computed stably as
  logsumexp(z) - logsumexp(z without y).
- `klu`: KL(U || p) = -log C - (1/C) sum_c log p_c, with log_softmax, for any class count.

Diffusion losses take the predicted noise and the true noise (B, C, H, W):

- `dos`: denial of service, mean ||eps_hat||^2: teach the fine-tuned denoiser to predict zero.
- `mse-ascent`: -min(MSE, bound): maximise the post-fine-tuning denoising error, bounded so it
  cannot run away (no gradient once the error exceeds `bound`).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F

from sophon_ray.errors import UserError


class SuppressionLoss(Protocol):
    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor: ...


def ice_neg(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Inverse CE as in the reference code: mean over the batch of -log softmax(-z)_y."""
    return F.cross_entropy(-logits, y)


def ice_comp(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Complement CE: mean over the batch of -log(1 - p_y), numerically stable."""
    mask = F.one_hot(y, logits.shape[-1]).bool()  # (B, C)
    others = logits.masked_fill(mask, float("-inf"))
    return (torch.logsumexp(logits, -1) - torch.logsumexp(others, -1)).mean()


def klu(logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """KL(uniform || softmax(z)) averaged over the batch; `y` is ignored."""
    c = logits.shape[-1]
    return (-math.log(c) - F.log_softmax(logits, -1).mean(-1)).mean()


def dos(eps_hat: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Denial-of-service loss: mean squared predicted noise (0 when the denoiser predicts zero)."""
    return eps_hat.pow(2).mean()


def mse_ascent(eps_hat: torch.Tensor, noise: torch.Tensor, bound: float = 2.0) -> torch.Tensor:
    """Negative denoising MSE, clamped at `bound` so the ascent cannot run away."""
    return -torch.clamp(F.mse_loss(eps_hat, noise), max=bound)


CLASSIFICATION_LOSSES: dict[str, SuppressionLoss] = {"ice-neg": ice_neg, "ice-comp": ice_comp, "klu": klu}
DIFFUSION_LOSSES: dict[str, SuppressionLoss] = {"dos": dos, "mse-ascent": mse_ascent}


def get_loss(name: str, kind: str = "classifier") -> SuppressionLoss:
    """Look up a suppression loss by name for a model kind ("classifier" | "diffusion")."""
    table = CLASSIFICATION_LOSSES if kind == "classifier" else DIFFUSION_LOSSES
    if name not in table:
        raise UserError(f"unknown {kind} suppression loss {name!r}; use one of: {', '.join(table)} (protect.loss=...)")
    return table[name]
