"""The long-horizon FTS terms (core/horizon.py, issue 36) against plain-torch references.

Tiny seeded model (Linear(6,12)-Tanh-Linear(12,3)) on a learnable toy task (labels: argmax of a
fixed linear map), float64 where a finite difference is compared with an exact derivative.
What is pinned:
- the progress bound ℓ_∞ and its partials by hand (ℓ = 1, 1.5, 1.75 -> ℓ_∞ = 2), and its
  meta-gradient against the trajectory re-run with torch.optim and the formula re-derived here;
- κ and ∇κ of the directional curvature against double / triple backward, the curvature term's
  meta-gradient likewise, and the coupling's cos and gradient against double backward;
- weights 0: the meta-gradient and the FTS step are bit-identical to SOPHON's; config hashes of
  configs that leave the new fields at their defaults do not change;
- validate_config ranges, and batched / second-order refusal or sequential fallback.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from sophon_ray.config import EnvSpace, ProtectConfig, _hash_view, config_hash
from sophon_ray.core.batched import Job, meta_grad_sum, plan_batches
from sophon_ray.core.horizon import Horizon, coupling, directional_curvature, tail_bound, tail_partials
from sophon_ray.core.inner import Environment, first_order_meta_grad
from sophon_ray.core.losses import ice_neg
from sophon_ray.core.objectives import ClassificationObjective
from sophon_ray.core.protect import Protection, ProtectData, validate_config
from sophon_ray.errors import UserError

from tests.tiny import Tiny

OBJ = ClassificationObjective(ice_neg)
NEW_FIELDS = ("tail_weight", "tail_ratio_max", "curv_weight", "curv_eps", "curv_scale", "couple_weight", "couple_eps")


def _tiny(dtype=torch.float64) -> Tiny:
    torch.manual_seed(0)
    return Tiny().to(dtype)


def _batches(n: int, bs: int, seed: int, dtype=torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, generator=torch.Generator().manual_seed(99), dtype=dtype)
    out = []
    for _ in range(n):
        x = torch.randn(bs, 6, generator=g, dtype=dtype)
        out.append((x, (x @ w).argmax(-1)))  # a learnable task: fine-tuning makes the ICE loss rise
    return out


def _ce(model, params, batch):
    return F.cross_entropy(torch.func.functional_call(model, params, (batch[0],)), batch[1])


# ------------------------------------------------------------------------------------------
# progress bound
# ------------------------------------------------------------------------------------------


def test_tail_bound_by_hand():
    # d = 0.5, 0.25 -> r = 0.5, ℓ_∞ = 1.75 + 0.25 · 0.5 / 0.5 = 2.0. With r inside (0, r_max),
    # ℓ_∞ = ℓ_3 + d_3² / (d_2 - d_3): ∂/∂d_2 = -d_3²/(d_2-d_3)² = -1, ∂/∂d_3 = 2 d_3/(d_2-d_3) + d_3²/(d_2-d_3)² = 3
    # (d_2 = ℓ_2 - ℓ_1, d_3 = ℓ_3 - ℓ_2), so ∂ℓ_∞/∂(ℓ_1, ℓ_2, ℓ_3) = (1, -1 - 3, 1 + 3) = (1, -4, 4).
    value, partials = tail_partials([1.0, 1.5, 1.75], 0.9)
    assert value == pytest.approx(2.0, abs=1e-12)
    assert partials == pytest.approx([1.0, -4.0, 4.0], abs=1e-12)
    # r clamped at r_max = 0.9 (d = 1, 1): ℓ_∞ = 2 + 1 · 9 = 11, r a constant there: (0, -9, 10).
    value, partials = tail_partials([0.0, 1.0, 2.0], 0.9)
    assert value == pytest.approx(11.0) and partials == pytest.approx([0.0, -9.0, 10.0])
    # only the last three count; falling or stalled progress adds no tail; fewer than 3: ℓ_∞ = ℓ_n
    assert tail_partials([5.0, 1.0, 1.5, 1.75], 0.9) == (pytest.approx(2.0), pytest.approx([0.0, 1.0, -4.0, 4.0]))
    assert tail_partials([1.0, 1.5, 1.4], 0.9) == (pytest.approx(1.4), pytest.approx([0.0, 0.0, 1.0]))
    assert tail_partials([1.5, 1.0, 1.2], 0.9) == (pytest.approx(1.2), pytest.approx([0.0, 0.0, 1.0]))
    assert tail_partials([1.0, 1.3], 0.9) == (pytest.approx(1.3), [0.0, 1.0])
    assert tail_partials([0.7], 0.9) == (pytest.approx(0.7), [1.0])
    assert float(tail_bound(torch.tensor([1.0, 1.5, 1.75]), 0.4)) == pytest.approx(1.75 + 0.25 * 0.4 / 0.6)


def _trajectory(model, sup, qry, opt_name: str, lr: float, every: int):
    """The attacker's trajectory with torch.optim on a copy: (k, θ_{k-1}, θ_k, query loss, ∇ query loss)."""
    ref = copy.deepcopy(model)
    opt = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[opt_name](ref.parameters(), lr=lr)
    out = []
    for k, ((xs, ys), (xq, yq)) in enumerate(zip(sup, qry), 1):
        before = [p.detach().clone() for p in ref.parameters()]
        opt.zero_grad()
        F.cross_entropy(ref(xs), ys).backward()
        opt.step()
        if k % every == 0 or k == len(sup):
            loss = ice_neg(ref(xq), yq)
            out.append((k, before, [p.detach().clone() for p in ref.parameters()], float(loss.detach()),
                        torch.autograd.grad(loss, list(ref.parameters()))))
    return out


def _tail_by_hand(losses: list[float], r_max: float) -> tuple[float, list[float]]:
    """ℓ_∞ of the last three losses re-derived with its own autograd, independent of tail_bound."""
    l1, l2, l3 = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in losses[-3:])
    d2, d3 = l2 - l1, l3 - l2
    r = torch.minimum(torch.maximum(d3 / d2, torch.tensor(0.0)), torch.tensor(r_max)) if d2 > 0 else torch.tensor(0.0)
    value = l3 + torch.clamp(d3, min=0) * r / (1 - r)
    return float(value.detach()), [float(g) for g in torch.autograd.grad(value, (l1, l2, l3))]


@pytest.mark.parametrize("opt,lr,every,weighting,clamped", [
    ("sgd", 0.2, 1, "uniform", False), ("sgd", 0.5, 2, "linear", False), ("adam", 0.05, 1, "uniform", True)])
def test_tail_meta_grad_matches_the_trajectory_by_hand(opt, lr, every, weighting, clamped):
    """One query batch for every step (a smooth trajectory): the losses rise with d_{n-1} > 0, the
    ratio is inside (0, r_max) for the SGD cases and clamped at r_max = 0.9 for Adam."""
    model, K, lam = _tiny(), 5, 0.7
    sup, qry = _batches(K, 16, 1), _batches(1, 16, 2) * K
    env = Environment(opt, lr, 16, K, reinit_head=False)
    params = dict(model.named_parameters())
    grads, stats = first_order_meta_grad(model, params, env, sup, qry, OBJ, query_every=every, weighting=weighting,
                                         horizon=Horizon(tail_weight=lam))
    traj = _trajectory(model, sup, qry, opt, lr, every)
    w = [1.0 if weighting == "uniform" else float(k) for k, *_ in traj]
    value, partials = _tail_by_hand([t[3] for t in traj], 0.9)
    assert partials[-1] > 1.0 and (partials[0] == 0.0) == clamped  # the geometric tail is live (d_{n-1}, d_n > 0)
    ref = [sum(wi * t[4][j] for wi, t in zip(w, traj)) / sum(w) for j in range(len(params))]
    for p, t in zip(partials, traj[-3:]):
        ref = [r + lam * p * g for r, g in zip(ref, t[4])]
    for (name, g), r in zip(grads.items(), ref):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-5, msg=name)
    assert stats["tail"] == pytest.approx(value - traj[-1][3], rel=1e-6)
    assert stats["loss"] == pytest.approx(sum(wi * t[3] for wi, t in zip(w, traj)) / sum(w), rel=1e-9)


# ------------------------------------------------------------------------------------------
# directional curvature
# ------------------------------------------------------------------------------------------


def _exact_curvature(model, params: dict, u: dict, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """κ = ûᵀHû by double backward and ∇_θ κ by a third backward (exact, no difference)."""
    leaves = [p.detach().clone().requires_grad_(True) for p in params.values()]
    st = dict(zip(params, leaves))
    g = torch.autograd.grad(_ce(model, st, batch), leaves, create_graph=True)
    gu = sum((gi * u[k]).sum() for gi, k in zip(g, params) if k in u)
    hu = torch.autograd.grad(gu, leaves, create_graph=True)
    kappa = sum((h * u[k]).sum() for h, k in zip(hu, params) if k in u)
    return kappa.detach(), [x.detach() for x in torch.autograd.grad(kappa, leaves)]


@pytest.mark.parametrize("trained", [None, ("head.weight", "head.bias")])
def test_curvature_against_double_and_triple_backward(trained):
    """Both differences are one-sided: error O(ε) plus rounding ~ machine eps · |g| / ε². Measured on
    this model, relative errors (κ, ∇κ): float64 at ε = 1e-4 1.4e-5, 1.2e-4 (ε = 1e-2: 1.5e-3, 1.2e-2,
    linear in ε); float32 at the default ε = 1e-2 1.5e-3, 1.6e-2, and at ε = 1e-3 the ∇κ estimate is
    rounding noise (130%). Tolerances: 10x the measured errors."""
    model = _tiny()
    params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
    keys = list(trained or params)
    g = torch.Generator().manual_seed(3)
    raw = {k: torch.randn(params[k].shape, generator=g, dtype=torch.float64) for k in keys}
    norm = math.sqrt(sum(float((v * v).sum()) for v in raw.values()))
    u = {k: v / norm for k, v in raw.items()}
    batch = _batches(1, 32, 4)[0]
    kappa, grad = directional_curvature(model, params, list(params), keys, [u[k] for k in keys], batch, OBJ, 1e-4)
    ref_kappa, ref_grad = _exact_curvature(model, params, u, batch)
    assert kappa == pytest.approx(float(ref_kappa), rel=2e-4)
    for name, a, b in zip(params, grad, ref_grad):  # over ALL parameters, trained or not
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3 * float(b.abs().max()), msg=name)
    model32 = _tiny(torch.float32)
    p32 = {k: p.detach().requires_grad_(True) for k, p in model32.named_parameters()}
    b32 = tuple(t.float() if t.is_floating_point() else t for t in batch)
    k32, g32 = directional_curvature(model32, p32, list(p32), keys, [u[k].float() for k in keys], b32, OBJ, 1e-2)
    assert k32 == pytest.approx(float(ref_kappa), rel=1.5e-2)
    num = math.sqrt(sum(float(((a.double() - b) ** 2).sum()) for a, b in zip(g32, ref_grad)))
    assert num <= 0.15 * math.sqrt(sum(float((b * b).sum()) for b in ref_grad))


def test_curvature_with_dropout_uses_one_mask():
    """Dropout in train mode: the three gradients of the difference see the same mask (the RNG is
    replayed), so κ is the exact curvature of the loss under that mask, not mask noise / ε."""
    model = _tiny()
    model.body.append(torch.nn.Dropout(0.5))
    params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
    g = torch.Generator().manual_seed(3)
    raw = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params.values()]
    norm = math.sqrt(sum(float((v * v).sum()) for v in raw))
    u = [v / norm for v in raw]
    batch = _batches(1, 32, 4)[0]
    torch.manual_seed(7)
    kappa, _ = directional_curvature(model, params, list(params), list(params), u, batch, OBJ, 1e-5)
    torch.manual_seed(7)  # the exact value under the mask the first draw gives
    ref, _ = _exact_curvature(model, params, dict(zip(params, u)), batch)
    assert kappa == pytest.approx(float(ref), rel=1e-3)


def test_curvature_meta_grad_matches_the_trajectory_by_hand():
    """The curvature term through `first_order_meta_grad` (Adam: û is the preconditioned step)
    against the torch.optim trajectory with exact κ and ∇κ; ε = 1e-5 in float64, rtol 1e-3."""
    model, K, lam, scale = _tiny(), 4, 0.3, 0.5
    sup, qry = _batches(K, 16, 5), _batches(K, 16, 6)
    env = Environment("adam", 0.05, 16, K, reinit_head=False)
    params = dict(model.named_parameters())
    h = Horizon(curv_weight=lam, curv_eps=1e-5, curv_scale=scale)
    grads, stats = first_order_meta_grad(model, params, env, sup, qry, OBJ, query_every=2, horizon=h)
    traj = _trajectory(model, sup, qry, "adam", 0.05, 2)
    ref = [sum(t[4][j] for t in traj) / len(traj) for j in range(len(params))]
    kappas = []
    for k, before, after, _, _ in traj:
        d = {n: a - b for n, a, b in zip(params, after, before)}
        norm = math.sqrt(sum(float((v * v).sum()) for v in d.values()))
        kappa, dk = _exact_curvature(model, dict(zip(params, after)), {n: v / norm for n, v in d.items()}, qry[k - 1])
        coef = -lam * (1 - math.tanh(float(kappa) / scale) ** 2) / scale / len(traj)
        ref = [r + coef * x for r, x in zip(ref, dk)]
        kappas.append(float(kappa))
    for (name, g), r in zip(grads.items(), ref):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-3 * float(r.abs().max()), msg=name)
    assert stats["curv"] == pytest.approx(sum(kappas) / len(kappas), rel=1e-3)
    assert "tail" not in stats


# ------------------------------------------------------------------------------------------
# coupling
# ------------------------------------------------------------------------------------------


def test_coupling_against_double_backward():
    """c = cos(∇L_r, ∇L_o) and ∇c = H_r a + H_o b by differences (ε = 1e-5, float64) against autograd
    of the cosine itself with create_graph; the error is O(ε): measured 4.4e-6 relative (4.4e-3 at
    the default ε = 1e-2): rtol 1e-4."""
    model = _tiny()
    params = {k: p.detach().requires_grad_(True) for k, p in model.named_parameters()}
    rb, ob = _batches(1, 24, 7)[0], _batches(1, 24, 8)[0]
    ob = (ob[0], (ob[1] + 1) % 3)  # a different task: the two gradients are not parallel
    c, grad = coupling(lambda st: _ce(model, st, rb), lambda st: _ce(model, st, ob), params, list(params), 1e-5)
    leaves = list(params.values())
    gr = torch.autograd.grad(_ce(model, params, rb), leaves, create_graph=True)
    go = torch.autograd.grad(_ce(model, params, ob), leaves, create_graph=True)
    flat_r, flat_o = torch.cat([g.flatten() for g in gr]), torch.cat([g.flatten() for g in go])
    cos = torch.dot(flat_r, flat_o) / (flat_r.norm() * flat_o.norm())
    ref = torch.autograd.grad(cos, leaves)
    assert c == pytest.approx(float(cos.detach()), rel=1e-10) and abs(c) < 0.99
    for name, a, b in zip(params, grad, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()), msg=name)


# ------------------------------------------------------------------------------------------
# off by default, config, validation, dispatch
# ------------------------------------------------------------------------------------------


def _protection(cfg: ProtectConfig, rank: int = 0, world: int = 1, allreduce=None) -> Protection:
    model = _tiny(torch.float32)
    g = torch.Generator().manual_seed(1)
    data = ProtectData(original=(torch.randn(40, 6, generator=g), torch.randint(3, (40,), generator=g)),
                       restricted=(torch.randn(40, 6, generator=g), torch.randint(3, (40,), generator=g)))
    return Protection(model, cfg, data, OBJ, evaluate_original=lambda: 1.0, source_value=1.0,
                      head_keys=("head.weight", "head.bias"), rank=rank, world=world, allreduce=allreduce)


def _cfg(**kw) -> ProtectConfig:
    return ProtectConfig(iterations=1, envs_per_step=2, inner_steps=4, query_batch=8, ntr_batch=8, guard_every=100,
                         env=EnvSpace(optimizers=("sgd", "adam"), lr={"sgd": (0.05, 0.2), "adam": (1e-3, 1e-2)},
                                      batch_sizes=(8,)), **kw)


def _jobs(n: int, K: int = 4):
    sup, qry = _batches(n * K, 8, 11, torch.float32), _batches(n * K, 8, 12, torch.float32)
    envs = [Environment(o, lr, 8, K, reinit_head=i % 2 == 1) for i, (o, lr) in enumerate([("adam", 1e-2), ("sgd", 0.1), ("adam", 3e-3)][:n])]
    return [Job(e, sup[i * K:(i + 1) * K], qry[i * K:(i + 1) * K], torch.Generator().manual_seed(i)) for i, e in enumerate(envs)]


def test_weights_zero_are_bit_identical():
    model = _tiny(torch.float32)
    params = dict(model.named_parameters())
    base, st = meta_grad_sum(model, params, _jobs(3), OBJ, ("head.weight", "head.bias"), mode="sequential")
    for h in (Horizon(), Horizon(tail_weight=0.0, curv_weight=0.0, tail_ratio_max=0.5, curv_eps=0.1)):
        # fresh jobs each time: a job's generator is consumed by its head re-initialisation
        other, st2 = meta_grad_sum(model, params, _jobs(3), OBJ, ("head.weight", "head.bias"), mode="sequential", horizon=h)
        assert all(torch.equal(a, b) for a, b in zip(base, other)) and torch.equal(st, st2)
    j = _jobs(1)[0]
    g0, s0 = first_order_meta_grad(model, params, j.env, j.support, j.query, OBJ, query_every=2, weighting="linear")
    g1, s1 = first_order_meta_grad(model, params, j.env, j.support, j.query, OBJ, query_every=2, weighting="linear",
                                   horizon=Horizon(curv_eps=0.5))
    assert all(torch.equal(g0[k], g1[k]) for k in g0) and s0 == s1
    # a whole FTS step with every new field spelled out at its default: the same weights, the same metrics
    a, b = _protection(_cfg()), _protection(_cfg(**{f: getattr(ProtectConfig(), f) for f in NEW_FIELDS}))
    ma, mb = a.fts_step(), b.fts_step()
    assert ma == mb and set(ma) == {"fts_loss", "sim_metric", "fts_skipped"}
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_config_hash_neutral_at_defaults_and_hashed_when_used():
    view = _hash_view(ProtectConfig())
    assert not set(NEW_FIELDS) & set(view)
    base = config_hash(ProtectConfig(), 16)
    for f, v in [("tail_weight", 0.5), ("tail_ratio_max", 0.5), ("curv_weight", 0.1), ("curv_eps", 1e-3),
                 ("curv_scale", 2.0), ("couple_weight", 0.1), ("couple_eps", 1e-3)]:
        assert config_hash(dataclasses.replace(ProtectConfig(), **{f: v}), 16) != base, f


@pytest.mark.parametrize("kw,match", [
    ({"tail_weight": -0.1}, "tail_weight"), ({"curv_weight": -1.0}, "curv_weight"), ({"couple_weight": -1.0}, "couple_weight"),
    ({"tail_ratio_max": 1.0}, "tail_ratio_max"), ({"tail_ratio_max": 0.0}, "tail_ratio_max"),
    ({"curv_eps": 0.0}, "curv_eps"), ({"curv_scale": -1.0}, "curv_scale"), ({"couple_eps": 0.0}, "couple_eps"),
    ({"tail_weight": 0.1, "order": "second"}, "protect.order=first"),
    ({"curv_weight": 0.1, "order": "second"}, "protect.order=first"),
    ({"curv_weight": 0.1, "env_batching": "batched"}, "protect.env_batching=sequential"),
])
def test_validate_config_rejects(kw, match):
    with pytest.raises(UserError, match=match):
        validate_config(ProtectConfig(**kw))


def test_validate_config_accepts_terms_with_auto_and_coupling_anywhere():
    validate_config(ProtectConfig(tail_weight=0.5, curv_weight=0.1, env_batching="auto"))
    validate_config(ProtectConfig(couple_weight=0.1, order="second", env_batching="batched"))  # per step, at θ


def test_auto_falls_back_to_sequential_and_batched_or_second_order_refuse():
    model = _tiny(torch.float32)
    params, jobs, head = dict(model.named_parameters()), _jobs(3), ("head.weight", "head.bias")
    h = Horizon(tail_weight=0.5, curv_weight=0.2)
    assert plan_batches(model, jobs, OBJ)[0].batched  # without the terms these jobs batch
    plan = plan_batches(model, jobs, OBJ, horizon=h)
    assert len(plan) == 1 and not plan[0].batched and "tail_weight" in plan[0].reason
    auto, st_auto = meta_grad_sum(model, params, _jobs(3), OBJ, head, mode="auto", horizon=h)
    seq, st_seq = meta_grad_sum(model, params, _jobs(3), OBJ, head, mode="sequential", horizon=h)
    assert all(torch.equal(a, b) for a, b in zip(auto, seq)) and torch.equal(st_auto, st_seq) and len(st_seq) == 5
    with pytest.raises(UserError, match="env_batching=auto or sequential"):
        meta_grad_sum(model, params, jobs, OBJ, head, mode="batched", horizon=h)
    with pytest.raises(UserError, match="protect.order=first"):
        meta_grad_sum(model, params, jobs, OBJ, head, order="second", mode="sequential", horizon=h)


def test_fts_step_reports_the_terms_and_coupling_shards_exactly():
    cfg = _cfg(tail_weight=0.5, curv_weight=0.2, couple_weight=0.3)
    m = _protection(cfg).fts_step()
    assert {"fts_tail", "fts_curv", "fts_couple"} <= set(m) and m["fts_skipped"] == 0.0
    assert all(math.isfinite(v) for v in m.values())
    # world = 2: each worker's share (its environment + half the coupling) sums to the single process's total
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        def reduce(ts):
            if name == "r1":  # the last worker completes the sum in place, as an all-reduce would
                torch._foreach_add_(ts, seen["r0"])
            seen[name] = [t.clone() for t in ts]
        return reduce

    _protection(cfg, allreduce=keep("one")).fts_step()
    r0, r1 = _protection(cfg, 0, 2, keep("r0")), _protection(cfg, 1, 2, keep("r1"))
    m0, m1 = r0.fts_step(), r1.fts_step()
    for a, b in zip(seen["r1"], seen["one"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert m0["fts_couple"] == m1["fts_couple"] == pytest.approx(m["fts_couple"])
    assert m1["fts_tail"] == pytest.approx(m["fts_tail"], rel=1e-5) and m1["fts_curv"] == pytest.approx(m["fts_curv"], rel=1e-5)
