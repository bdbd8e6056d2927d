"""Generation mode: the DDPM ε-prediction objective, its evaluation and sampling (pure torch).

A batch of the objective is (x0, noise, t): clean images (B, C, H, W), the noise ε to add
(B, C, H, W) and integer timesteps (B,). The noisy input is

    x_t = sqrt(ā_t) x0 + sqrt(1 - ā_t) ε,      ā = `alphas_cumprod` of the noise schedule,

and the denoiser predicts ε̂ = model(x_t, t).sample. Fine-tuning (the attacker, FTS support
steps, NTR) minimises MSE(ε̂, ε); FTS suppresses with a diffusion loss on query batches
(`dos`: mean ε̂², `mse-ascent`: bounded negative MSE). Timesteps are drawn uniformly from a
configurable range [lo, hi) (the reference fixes t = 1, a nearly noise-free step, which is
easy to game). Nothing here imports diffusers: the schedule is passed as a tensor and sampling
takes any scheduler with diffusers' `set_timesteps` / `timesteps` / `step(...).prev_sample`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sophon_ray.core.inner import Batch, Params, call
from sophon_ray.core.losses import SuppressionLoss
from sophon_ray.errors import UserError


def check_images(x: torch.Tensor, channels: int, factor: int, where: str = "data") -> None:
    """Raise UserError when images (N, C, S, S) do not fit a UNet with `channels` in/out channels
    whose input must be divisible by `factor`."""
    if x.dim() != 4:
        raise UserError(f"{where}: expected images (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise UserError(
            f"{where} has {x.shape[1]} channels but the UNet takes {channels}; "
            f"set input.channels={channels} or use a model built for {x.shape[1]} channels"
        )
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise UserError(
            f"{where}: image size {h}x{w} is not divisible by the UNet's down-sampling factor {factor}; "
            f"use input.size=<multiple of {factor}>"
        )


def noisy(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """q(x_t | x0): sqrt(ā_t) x0 + sqrt(1 - ā_t) ε, with ā_t broadcast over (B, C, H, W)."""
    a = alphas_cumprod.to(x0.device, x0.dtype)[t].view(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1)
    return a.sqrt() * x0 + (1.0 - a).sqrt() * noise


def check_t_range(t_range: tuple[int, int], num_timesteps: int) -> tuple[int, int]:
    """Validate a timestep range [lo, hi) against the schedule length; returns it as ints."""
    lo, hi = (int(v) for v in t_range)
    if not 0 <= lo < hi <= num_timesteps:
        raise UserError(
            f"timestep range [{lo}, {hi}) must satisfy 0 <= lo < hi <= {num_timesteps} (the schedule length); "
            f"fix diffusion.t_range"
        )
    return lo, hi


@dataclass(frozen=True, eq=False)
class DiffusionObjective:
    """ε-prediction fine-tuning and its suppression, for the SOPHON inner loop and the attacks.

    Args:
        loss: the suppression loss on (ε̂, ε): `losses.dos` or `losses.mse_ascent`.
        alphas_cumprod: ā of the noise schedule, (T,).
        t_range: [lo, hi) range of timesteps that `make_batch` draws uniformly (None = whole schedule).
        teacher: a frozen copy of the source model; when given, the NTR (retain) loss is
            MSE(ε̂_θ, ε̂_teacher) on original-domain batches (distil the source's own predictions,
            as ResAlign does) instead of MSE(ε̂_θ, ε) against the drawn noise.
    """

    loss: SuppressionLoss
    alphas_cumprod: torch.Tensor
    t_range: tuple[int, int] | None = None
    teacher: torch.nn.Module | None = None
    _range: tuple[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.alphas_cumprod)
        object.__setattr__(self, "_range", check_t_range(self.t_range or (0, n), n))

    def make_batch(self, batch: Batch, generator: torch.Generator) -> Batch:
        """A drawn batch (x0, ...) -> (x0, noise, t): noise N(0, I), t uniform in [lo, hi)."""
        x0 = batch[0]
        lo, hi = self._range
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)  # (B, C, H, W)
        t = torch.randint(lo, hi, (len(x0),), generator=generator).to(x0.device)  # (B,)
        return x0, noise, t

    def predict(self, model: torch.nn.Module, state: Params | None, batch: Batch) -> torch.Tensor:
        """ε̂ for (x0, noise, t) with `state` (functional) or the module's own weights (None)."""
        x0, noise, t = batch
        x_t = noisy(x0, noise, t, self.alphas_cumprod)
        out = model(x_t, t) if state is None else call(model, state, x_t, t)
        return out.sample if hasattr(out, "sample") else out  # (B, C, H, W)

    def fit(self, model: torch.nn.Module, state: Params, batch: Batch) -> torch.Tensor:
        """The attacker's loss: MSE(ε̂, ε)."""
        return F.mse_loss(self.predict(model, state, batch), batch[1])

    def suppress(self, model: torch.nn.Module, state: Params, batch: Batch) -> tuple[torch.Tensor, float]:
        """(suppression loss, denoising MSE) of the simulated fine-tuned weights on a query batch."""
        eps_hat = self.predict(model, state, batch)
        mse = float(F.mse_loss(eps_hat.detach(), batch[1]))
        return self.loss(eps_hat, batch[1]), mse

    def train_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """NTR loss on an original-domain objective batch, with the module's own parameters:
        MSE to the drawn noise, or to the frozen teacher's prediction when there is one."""
        if self.teacher is None:
            return F.mse_loss(self.predict(model, None, batch), batch[1])
        return retain_loss(self.predict(model, None, batch), self.teacher_predict(batch))

    @torch.no_grad()
    def teacher_predict(self, batch: Batch) -> torch.Tensor:
        """ε̂ of the frozen teacher (eval mode) for (x0, noise, t)."""
        assert self.teacher is not None
        self.teacher.eval()
        return self.predict(self.teacher, None, batch)

    def fit_loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Plain ε-prediction MSE with the module's own parameters (pretraining and attacks)."""
        return F.mse_loss(self.predict(model, None, batch), batch[1])

    def loss_fn(self, generator: torch.Generator) -> Callable[[torch.nn.Module, Batch], torch.Tensor]:
        """The attack loss for `core.attack.finetune`: noise and timesteps drawn from `generator`."""
        return lambda model, batch: self.fit_loss(model, self.make_batch(batch, generator))


def retain_loss(eps_hat: torch.Tensor, eps_teacher: torch.Tensor) -> torch.Tensor:
    """The frozen-teacher retain loss: mean (ε̂_θ - ε̂_teacher)², the teacher side a constant."""
    return F.mse_loss(eps_hat, eps_teacher.detach())


def eval_timesteps(num_timesteps: int, n: int = 10) -> list[int]:
    """`n` evenly spaced timesteps over the schedule, at the midpoints of n equal bins
    (T=1000, n=10: 50, 150, ..., 950)."""
    if n < 1 or n > num_timesteps:
        raise UserError(f"the evaluation grid needs 1 <= n <= {num_timesteps} timesteps, got {n}")
    return [((2 * i + 1) * num_timesteps) // (2 * n) for i in range(n)]


@torch.no_grad()
def denoising_mse_by_t(
    model: torch.nn.Module,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: list[int],
    seed: int = 0,
    batch_size: int = 512,
) -> list[tuple[float, int]]:
    """Per timestep of `timesteps`: (sum of squared errors, element count) of ε̂ - ε on images `x`.

    Eval mode, no grad; the module's mode is restored. The noise for the j-th timestep is drawn
    for the whole set from a generator seeded (seed, j), so a value does not depend on `batch_size`
    or on the timesteps listed after it. A non-finite model output
    makes that timestep's sum NaN/inf.
    """
    was_training = model.training
    model.eval()
    out = []
    try:
        for j, step in enumerate(timesteps):
            g = torch.Generator().manual_seed(seed * 1_000_003 + j)
            noise = torch.randn(x.shape, generator=g, dtype=x.dtype)  # (N, C, H, W), on CPU
            total = 0.0
            for i in range(0, len(x), batch_size):
                x0 = x[i : i + batch_size]
                eps = noise[i : i + batch_size].to(x0.device)
                t = torch.full((len(x0),), step, dtype=torch.long, device=x0.device)
                res = model(noisy(x0, eps, t, alphas_cumprod), t)
                eps_hat = res.sample if hasattr(res, "sample") else res
                total += float((eps_hat.float() - eps.float()).pow(2).sum())
            out.append((total, noise.numel()))
    finally:
        model.train(was_training)
    return out


def denoising_mse(
    model: torch.nn.Module,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: list[int] | None = None,
    seed: int = 0,
    batch_size: int = 512,
) -> float:
    """Denoising MSE of `model` on images `x`, averaged over a fixed timestep grid and fixed noise.

    Args:
        model: ε-predicting denoiser, `model(x_t, t).sample` (B, C, H, W).
        x: clean images (N, C, H, W) in the model's pixel range.
        alphas_cumprod: ā of the schedule, (T,).
        timesteps: the grid (default `eval_timesteps(T, 10)`).
        seed: noise seed (see `denoising_mse_by_t`).
        batch_size: evaluation batch size.
    Returns:
        mean over timesteps, images and pixels of (ε̂ - ε)²; NaN if the model output is not finite.
    """
    grid = timesteps if timesteps is not None else eval_timesteps(len(alphas_cumprod))
    return _pooled(denoising_mse_by_t(model, x, alphas_cumprod, grid, seed, batch_size))


def _pooled(parts: list[tuple[float, int]]) -> float:
    """Mean squared error over (sum, count) parts: total sum / total count."""
    return sum(s for s, _ in parts) / max(sum(n for _, n in parts), 1)


def mse_buckets(
    model: torch.nn.Module,
    x: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    timesteps: list[int],
    seed: int = 0,
    batch_size: int = 512,
) -> dict[str, float]:
    """{"overall": `denoising_mse` over `timesteps`, "t1": MSE at t = 1, "low"/"mid"/"high": the
    grid's timesteps in the first/second/last third of the schedule} (a bucket with no grid
    timestep is left out). "overall" equals `denoising_mse(model, x, alphas_cumprod, timesteps, seed)`;
    t = 1 uses its own noise (index len(timesteps)), so adding it changes no other value."""
    n_t = len(alphas_cumprod)
    parts = denoising_mse_by_t(model, x, alphas_cumprod, [*timesteps, 1], seed, batch_size)
    grid = parts[:-1]
    out = {"overall": _pooled(grid), "t1": _pooled(parts[-1:])}
    for k, name in enumerate(("low", "mid", "high")):
        inside = [p for step, p in zip(timesteps, grid) if k * n_t <= 3 * step < (k + 1) * n_t]
        if inside:
            out[name] = _pooled(inside)
    return out


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    scheduler: Any,
    n: int,
    shape: tuple[int, int, int],
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Ancestral DDPM sampling with a diffusers-style scheduler (eval mode, fixed seed).

    Args:
        model: ε-predicting denoiser.
        scheduler: has `set_timesteps(steps)`, `timesteps` and `step(eps, t, x, generator=g).prev_sample`.
        n: number of samples; shape: (C, H, W).
        steps: inference steps.
        seed: seeds the initial noise and every sampling step.
    Returns:
        Samples (n, C, H, W) clamped to [-1, 1] (the model's pixel range when mean = std = 0.5).
    """
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    out = []
    try:
        scheduler.set_timesteps(steps)
        for i in range(0, n, batch_size):
            b = min(batch_size, n - i)
            x = torch.randn((b, *shape), generator=g).to(device)  # (b, C, H, W)
            for t in scheduler.timesteps:
                tt = torch.full((b,), int(t), dtype=torch.long, device=x.device)
                res = model(x, tt)
                eps = res.sample if hasattr(res, "sample") else res
                x = scheduler.step(eps.cpu(), t, x.cpu(), generator=g).prev_sample.to(device)
            out.append(x.clamp(-1.0, 1.0).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def judge_samples(classifier: torch.nn.Module, x: torch.Tensor, classes: tuple[int, ...],
                  confidence: float = 0.0, none_class: int | None = None) -> dict[str, float]:
    """What a judge classifier makes of images `x` (N, C, H, W), eval mode, with a rejection option.

    A sample is *rejected* (not a recognisable digit) when the judge's top softmax probability is
    below `confidence` or its label is `none_class` (the judge's "no digit" class, if it has one);
    only the accepted ones can count as one of `classes`.
    Returns:
        {"recognised": fraction accepted AND labelled one of `classes`, "rejected": fraction
        rejected} (fractions of all N).
    """
    was_training = classifier.training
    classifier.eval()
    try:
        prob = torch.softmax(classifier(x).float(), -1)  # (N, K)
    finally:
        classifier.train(was_training)
    top, pred = prob.max(-1)  # (N,), (N,)
    accepted = (top >= confidence) & (pred != (-1 if none_class is None else none_class))
    hit = accepted & torch.isin(pred, torch.tensor(classes, device=pred.device))
    return {"recognised": float(hit.float().mean()), "rejected": float((~accepted).float().mean())}

