"""Generation mode's engine on unet-tiny: the ε-prediction objective, timestep sampling, FTS on a
UNet, the denoising MSE and sampling (tiny seeded UNets, no data, no training)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sophon_ray.config import ArchSpec, ProtectConfig
from sophon_ray.core import losses
from sophon_ray.core.diffusion import (
    DiffusionObjective, check_images, denoising_mse, eval_timesteps, mse_buckets, judge_samples, noisy,
    retain_loss, sample,
)
from sophon_ray.core.inner import Environment, first_order_meta_grad
from sophon_ray.core.protect import Protection, ProtectData
from sophon_ray.errors import UserError
from sophon_ray.models import build_diffusion


def tiny_unet(seed=0, size=8):
    torch.manual_seed(seed)
    return build_diffusion(ArchSpec("unet-tiny"), 1, size)


def images(n, seed, size=8):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g) * 2 - 1  # (N, 1, S, S) in [-1, 1]


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.mark.parametrize("name", ["dos", "mse-ascent"])
def test_objective_matches_reference_formulas(unet, name):
    model, sched = unet
    a = sched.alphas_cumprod
    obj = DiffusionObjective(losses.get_loss(name, "diffusion"), a)
    x0, g = images(4, 1), torch.Generator().manual_seed(2)
    batch = obj.make_batch((x0,), g)
    _, noise, t = batch
    ref_noisy = a[t].sqrt().view(-1, 1, 1, 1) * x0 + (1 - a[t]).sqrt().view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(noisy(x0, noise, t, a), ref_noisy)
    with torch.no_grad():
        eps_hat = model(ref_noisy, t).sample
        state = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        ref_mse = ((eps_hat - noise) ** 2).mean()
        torch.testing.assert_close(obj.fit(model, state, batch), ref_mse)
        torch.testing.assert_close(obj.train_loss(model, batch), ref_mse)
        loss, metric = obj.suppress(model, state, batch)
    assert metric == pytest.approx(float(ref_mse), rel=1e-5)
    ref_loss = (eps_hat**2).mean() if name == "dos" else -torch.clamp(ref_mse, max=2.0)
    torch.testing.assert_close(loss, ref_loss)
    # mse-ascent is bounded: no gradient once the error exceeds the bound
    big = torch.full((2, 3), 10.0, requires_grad=True)
    losses.mse_ascent(big, torch.zeros(2, 3)).backward()
    assert float(losses.mse_ascent(big.detach(), torch.zeros(2, 3))) == -2.0 and big.grad.abs().sum() == 0


def test_suppression_and_retain_gradients_on_tiny_tensors():
    """The three generation losses, formula and gradient by hand on 2x1x2x2 tensors."""
    eps_hat = torch.tensor([[[[1.0, -2.0], [0.5, 0.0]]], [[[3.0, 1.0], [-1.0, 2.0]]]], requires_grad=True)
    noise = torch.tensor([[[[0.0, -1.0], [1.0, 0.0]]], [[[1.0, 1.0], [0.0, 0.0]]]])
    n = eps_hat.numel()  # 8
    # dos = mean ε̂², toward the fixed target 0 (bounded below): d/dε̂ = 2 ε̂ / n
    dos = losses.dos(eps_hat, noise)
    assert float(dos) == pytest.approx((1 + 4 + 0.25 + 0 + 9 + 1 + 1 + 4) / n)
    (g,) = torch.autograd.grad(dos, eps_hat)
    torch.testing.assert_close(g, 2 * eps_hat.detach() / n)
    # mse-ascent = -MSE below the bound: d/dε̂ = -2 (ε̂ - ε) / n
    mse = float(((eps_hat.detach() - noise) ** 2).mean())
    asc = losses.mse_ascent(eps_hat, noise, bound=10.0)
    assert float(asc) == pytest.approx(-mse)
    (g,) = torch.autograd.grad(asc, eps_hat)
    torch.testing.assert_close(g, -2 * (eps_hat.detach() - noise) / n)
    # retain = mean (ε̂ - ε̂_teacher)²: d/dε̂ = 2 (ε̂ - ε̂_t) / n, and nothing flows into the teacher
    teacher = noise.clone().requires_grad_(True)
    ret = retain_loss(eps_hat, teacher)
    assert float(ret) == pytest.approx(mse)
    g, gt = torch.autograd.grad(ret, [eps_hat, teacher], allow_unused=True)
    torch.testing.assert_close(g, 2 * (eps_hat.detach() - noise) / n)
    assert gt is None


def test_teacher_retain_loss_distils_the_frozen_source(unet):
    """With a teacher, NTR fits the teacher's prediction: zero loss and zero gradient for the
    teacher's own weights, the MSE to the teacher's ε̂ for any other weights; attacks still fit ε."""
    model, sched = unet
    a = sched.alphas_cumprod
    teacher = copy.deepcopy(model).requires_grad_(False)
    obj = DiffusionObjective(losses.dos, a, teacher=teacher)
    batch = obj.make_batch((images(4, 5),), torch.Generator().manual_seed(6))
    student = copy.deepcopy(model)
    loss = obj.train_loss(student, batch)
    grads = torch.autograd.grad(loss, list(student.parameters()), allow_unused=True)
    assert float(loss) == 0.0 and all(g is None or float(g.abs().max()) == 0.0 for g in grads)
    with torch.no_grad():
        next(student.parameters()).add_(0.05)
        x_t = noisy(batch[0], batch[1], batch[2], a)
        ref = F.mse_loss(student(x_t, batch[2]).sample, teacher.eval()(x_t, batch[2]).sample)
        torch.testing.assert_close(obj.train_loss(student, batch), ref)
        torch.testing.assert_close(obj.fit_loss(student, batch), F.mse_loss(student(x_t, batch[2]).sample, batch[1]))
    assert all(not p.requires_grad for p in teacher.parameters())


def test_mse_buckets_split_the_grid_and_add_t1(unet):
    model, sched = unet
    a = sched.alphas_cumprod
    x, grid = images(6, 3), eval_timesteps(1000, 10)
    b = mse_buckets(model, x, a, grid, seed=1, batch_size=4)
    assert set(b) == {"overall", "t1", "low", "mid", "high"}
    # "overall" is the audit's metric itself (batch size changes only float summation order)
    assert b["overall"] == pytest.approx(denoising_mse(model, x, a, grid, seed=1), rel=1e-6)
    # low = 50/150/250, mid = 350..650, high = 750/850/950: the first three keep their noise index
    assert b["low"] == pytest.approx(denoising_mse(model, x, a, grid[:3], seed=1), rel=1e-6)
    assert b["overall"] == pytest.approx((3 * b["low"] + 4 * b["mid"] + 3 * b["high"]) / 10, rel=1e-9)
    # t = 1 (the reference code's only timestep) is nearly noise-free: predicting ε there is hardest
    assert b["t1"] > b["high"] > 0


def test_make_batch_honours_timestep_range(unet):
    a = unet[1].alphas_cumprod
    obj = DiffusionObjective(losses.dos, a, t_range=(100, 104))
    g = torch.Generator().manual_seed(0)
    ts = torch.cat([obj.make_batch((images(64, i),), g)[2] for i in range(8)])
    assert set(ts.tolist()) == {100, 101, 102, 103}  # lo included, hi excluded
    full = torch.cat([DiffusionObjective(losses.dos, a).make_batch((images(64, 0),), g)[2] for _ in range(20)])
    assert 0 <= int(full.min()) and int(full.max()) < len(a) and int(full.max()) > 900
    b1 = obj.make_batch((images(4, 0),), torch.Generator().manual_seed(5))
    b2 = obj.make_batch((images(4, 0),), torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(b1, b2))
    for bad in ((5, 5), (-1, 10), (0, 1001)):
        with pytest.raises(UserError, match="timestep range"):
            DiffusionObjective(losses.dos, a, t_range=bad)


def test_fts_leaves_module_and_buffers_untouched():
    model, sched = tiny_unet(1)
    model.register_buffer("probe", torch.randn(3))  # a UNet has no buffers of its own; FTS must not touch any
    obj = DiffusionObjective(losses.dos, sched.alphas_cumprod)
    before = copy.deepcopy(model.state_dict())
    g = torch.Generator().manual_seed(0)
    sup = [obj.make_batch((images(4, i),), g) for i in range(2)]
    qry = [obj.make_batch((images(4, 10 + i),), g) for i in range(2)]
    env = Environment("adam", 1e-2, 4, 2, reinit_head=False)
    grads, stats = first_order_meta_grad(model, dict(model.named_parameters()), env, sup, qry, obj)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # GroupNorm affine weights included
    assert set(grads) == {k for k, _ in model.named_parameters()} and stats["loss"] > 0

    cfg = ProtectConfig(iterations=1, envs_per_step=1, inner_steps=2, query_batch=4, ntr_batch=4, loss="dos")
    cfg = dataclasses.replace(cfg, env=dataclasses.replace(cfg.env, batch_sizes=(4,), reinit_head_prob=0.0, head_only_prob=0.0))
    data = ProtectData(original=(images(16, 20), torch.zeros(16)), restricted=(images(16, 21), torch.zeros(16)))
    prot = Protection(model, cfg, data, obj, lambda: 0.0, 1.0, higher_is_better=False, make_batch=obj.make_batch)
    prot.fts_step()
    now = model.state_dict()
    assert torch.equal(now["probe"], before["probe"])
    norm = "down_blocks.0.resnets.0.norm1.weight"
    assert not torch.equal(now[norm], before[norm])  # the meta-update itself does move parameters


def test_denoising_mse_is_fixed_and_batch_independent(unet):
    model, sched = unet
    a = sched.alphas_cumprod
    assert eval_timesteps(1000, 10) == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    x = images(6, 3)
    model.train()
    m1 = denoising_mse(model, x, a, [10, 500], seed=1, batch_size=6)
    m2 = denoising_mse(model, x, a, [10, 500], seed=1, batch_size=4)
    assert model.training and m1 == pytest.approx(m2, rel=1e-6)
    total = 0.0
    with torch.no_grad():
        for j, step in enumerate([10, 500]):
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1_000_003 + j))
            t = torch.full((6,), step)
            total += F.mse_loss(model.eval()(noisy(x, noise, t, a), t).sample, noise).item() / 2
    assert m1 == pytest.approx(total, rel=1e-5)
    assert denoising_mse(model, x, a, [10, 500], seed=2) != m1


def test_sampling_is_seeded_and_bounded(unet):
    model, sched = unet
    s1 = sample(model, sched, 3, (1, 8, 8), steps=4, seed=0)
    s2 = sample(model, sched, 3, (1, 8, 8), steps=4, seed=0)
    assert s1.shape == (3, 1, 8, 8) and torch.equal(s1, s2) and s1.abs().max() <= 1.0
    judge = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with torch.no_grad():
        judge[1].weight.zero_()
        judge[1].bias.copy_(torch.arange(10.0))  # always predicts 9
    assert judge_samples(judge, s1, (5, 6, 7, 8, 9))["recognised"] == 1.0 and judge_samples(judge, s1, (0,))["recognised"] == 0.0


def test_judge_none_class_rejects():
    """A sample the judge labels as its "no digit" class is rejected, whatever its confidence."""
    judge = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1, 11))
    with torch.no_grad():
        judge[1].weight.zero_()
        judge[1].weight[10, 0] = 10.0  # x > 0: "no digit" (label 10); x < 0: label 9, both confident
        judge[1].weight[9, 0] = -10.0
    x = torch.tensor([1.0, 2.0, -1.0, -2.0]).view(4, 1, 1, 1)
    assert judge_samples(judge, x, (5, 6, 7, 8, 9), 0.9) == {"recognised": 0.5, "rejected": 0.0}  # 10 is just a label
    assert judge_samples(judge, x, (5, 6, 7, 8, 9), 0.9, none_class=10) == {"recognised": 0.5, "rejected": 0.5}


def test_check_images_refuses_wrong_channels_and_sizes():
    with pytest.raises(UserError, match="has 3 channels but the UNet takes 1"):
        check_images(torch.zeros(1, 3, 8, 8), 1, 2)
    with pytest.raises(UserError, match="not divisible"):
        check_images(torch.zeros(1, 1, 9, 9), 1, 2)
    check_images(torch.zeros(1, 1, 8, 8), 1, 2)  # fits: no error
