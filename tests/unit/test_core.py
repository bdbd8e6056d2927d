"""Correctness of the pure engine: inner optimizers, meta-gradients, losses, BN, boundary."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from sophon_ray.config import ArchSpec, ProtectConfig
from sophon_ray.errors import UserError
from sophon_ray.core import losses
from sophon_ray.core.inner import (
    SGD, Adadelta, Adagrad, Adam, Environment, RMSprop, first_order_meta_grad, second_order_meta_grad,
)
from sophon_ray.core.objectives import ClassificationObjective
from sophon_ray.core.protect import LazyBatches, Protection, ProtectData
from sophon_ray.models import build_classifier


def tiny(seed=0, norm="bn"):
    torch.manual_seed(seed)
    if norm == "bn":
        return build_classifier(ArchSpec("cnn-tiny"), 3, 1, 8)
    return build_classifier(ArchSpec("cnn-small", {"width": 4, "norm": "none"}), 3, 1, 8)


def batches(n, bs, seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 1, 8, 8, generator=g), torch.randint(0, 3, (bs,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize(
    "ours,ref",
    [
        (lambda: SGD(0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
        (lambda: SGD(0.05, momentum=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
        (lambda: SGD(0.05, momentum=0.9, nesterov=True), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
        (lambda: Adam(1e-2), lambda p: torch.optim.Adam(p, lr=1e-2)),
        (lambda: RMSprop(1e-2), lambda p: torch.optim.RMSprop(p, lr=1e-2)),
        (lambda: Adagrad(5e-2), lambda p: torch.optim.Adagrad(p, lr=5e-2)),
        (lambda: Adadelta(1.0), lambda p: torch.optim.Adadelta(p, lr=1.0)),
    ],
)
@pytest.mark.parametrize("inplace", [False, True])
def test_inner_optimizers_match_torch_optim(ours, ref, inplace):
    model = tiny(norm="none")
    ref_model = copy.deepcopy(model)
    names = [k for k, _ in model.named_parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    opt, ref_opt = ours(), ref(list(ref_model.parameters()))
    state = opt.init(params)
    for x, y in batches(5, 16, 1):
        fast = dict(zip(names, [p.requires_grad_(True) for p in params]))
        loss = F.cross_entropy(torch.func.functional_call(model, fast, (x,)), y)
        grads = list(torch.autograd.grad(loss, params))
        with torch.no_grad():
            if inplace:
                state = opt.step_(params, grads, state)
            else:
                params, state = opt.step([p.detach() for p in params], grads, state)
        ref_opt.zero_grad()
        F.cross_entropy(ref_model(x), y).backward()
        ref_opt.step()
    for p, q in zip(params, ref_model.parameters()):
        torch.testing.assert_close(p, q.detach(), atol=1e-5, rtol=0)


def test_outer_adam_matches_torch_optim():
    from sophon_ray.core.optim import OuterAdam

    model = tiny(norm="none")
    ref_model = copy.deepcopy(model)
    opt, ref = OuterAdam(list(model.parameters()), lr=1e-2), torch.optim.Adam(ref_model.parameters(), lr=1e-2)
    for i, (x, y) in enumerate(batches(6, 16, 2)):
        if i == 3:  # the guard's back-off changes lr mid-run; a state round-trip must not change the path
            opt.lr, ref.param_groups[0]["lr"] = 5e-3, 5e-3
            saved = copy.deepcopy(opt.state_dict())
            opt = OuterAdam(list(model.parameters()), lr=1.0)
            opt.load_state_dict(saved)
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        opt.step(list(grads))
        ref.zero_grad()
        F.cross_entropy(ref_model(x), y).backward()
        ref.step()
    assert opt.lr == 5e-3
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0)


def test_first_order_meta_grad_is_mean_of_query_grads():
    model = tiny(norm="none")
    obj = ClassificationObjective(losses.ice_neg)
    env = Environment("sgd", 0.1, 16, 4, reinit_head=False)
    sup, qry = batches(4, 16, 2), batches(4, 8, 3)
    params = dict(model.named_parameters())
    grads, stats = first_order_meta_grad(model, params, env, sup, qry, obj)
    # Reference: run torch.optim.SGD on a copy, collect query gradients at each θ_k.
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    acc = [torch.zeros_like(p) for p in ref.parameters()]
    for (xs, ys), (xq, yq) in zip(sup, qry):
        opt.zero_grad()
        F.cross_entropy(ref(xs), ys).backward()
        opt.step()
        gq = torch.autograd.grad(losses.ice_neg(ref(xq), yq), list(ref.parameters()))
        acc = [a + g / 4 for a, g in zip(acc, gq)]
    for (k, g), a in zip(grads.items(), acc):
        torch.testing.assert_close(g, a, atol=1e-6, rtol=1e-5, msg=k)
    # The model itself is untouched.
    for p, q in zip(model.parameters(), tiny(norm="none").parameters()):
        assert torch.equal(p, q)


def test_query_every_and_linear_weighting_match_the_torch_reference():
    """K=4, query after steps 2 and 4 only, step k weighing k: (2 g_2 + 4 g_4) / 6."""
    model = tiny(norm="none")
    obj = ClassificationObjective(losses.ice_neg)
    env = Environment("sgd", 0.1, 16, 4, reinit_head=False)
    sup, qry = batches(4, 16, 2), batches(4, 8, 3)
    params = dict(model.named_parameters())
    grads, stats = first_order_meta_grad(model, params, env, sup, qry, obj, query_every=2, weighting="linear")
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    acc, losses_seen = [torch.zeros_like(p) for p in ref.parameters()], []
    for k, ((xs, ys), (xq, yq)) in enumerate(zip(sup, qry), 1):
        opt.zero_grad()
        F.cross_entropy(ref(xs), ys).backward()
        opt.step()
        if k % 2 == 0:
            loss = losses.ice_neg(ref(xq), yq)
            gq = torch.autograd.grad(loss, list(ref.parameters()))
            acc = [a + k * g / 6 for a, g in zip(acc, gq)]
            losses_seen.append(k * float(loss) / 6)
    for (name, g), a in zip(grads.items(), acc):
        torch.testing.assert_close(g, a, atol=1e-6, rtol=1e-5, msg=name)
    assert stats["loss"] == pytest.approx(sum(losses_seen), rel=1e-5)
    same, _ = first_order_meta_grad(model, params, env, sup, qry, obj, query_every=1, weighting="uniform")
    default, _ = first_order_meta_grad(model, params, env, sup, qry, obj)
    assert all(torch.equal(a, b) for a, b in zip(same.values(), default.values()))
    with pytest.raises(UserError):
        first_order_meta_grad(model, params, env, sup, qry, obj, weighting="cubic")


def test_lazy_batches_are_stable_and_give_the_same_meta_grad_as_a_list():
    pool = tuple(batches(1, 40, 7)[0])
    lazy = LazyBatches(pool, 16, 4, (1, 2, 3), lambda b, g: b)
    assert len(lazy) == 4 and len(lazy[1:3]) == 2
    # Batch i is a function of (key, i) only: reading out of order or twice changes nothing.
    for a, b in zip(lazy[::-1], [lazy[i] for i in (3, 2, 1, 0)]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(lazy[0][0], lazy[1][0])
    with pytest.raises(IndexError):
        lazy[4]
    model, obj = tiny(norm="none"), ClassificationObjective(losses.ice_neg)
    env = Environment("adam", 1e-2, 16, 4, reinit_head=False)
    qry = LazyBatches(pool, 8, 4, (1, 2, 4), lambda b, g: b)
    params = dict(model.named_parameters())
    lazy_grads, _ = first_order_meta_grad(model, params, env, lazy, qry, obj)
    list_grads, _ = first_order_meta_grad(model, params, env, list(lazy), list(qry), obj)
    for k in lazy_grads:
        assert torch.equal(lazy_grads[k], list_grads[k]), k


def test_first_order_reinit_head_gives_zero_head_grad():
    model = tiny(norm="none")
    obj = ClassificationObjective(losses.klu)
    env = Environment("adam", 1e-2, 16, 3, reinit_head=True)
    grads, _ = first_order_meta_grad(model, dict(model.named_parameters()), env, batches(3, 16, 4), batches(3, 8, 5), obj,
                                     head_keys=("head.weight", "head.bias"))
    assert float(grads["head.weight"].abs().sum()) == 0.0
    assert float(sum(g.abs().sum() for k, g in grads.items() if not k.startswith("head"))) > 0


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam", "rmsprop", "adagrad", "adadelta"])
def test_second_order_matches_finite_differences(opt):
    torch.manual_seed(0)
    model = tiny(norm="none").double()
    obj = ClassificationObjective(losses.ice_comp)
    env = Environment(opt, {"sgd": 0.05, "momentum": 0.05, "adadelta": 1.0}.get(opt, 1e-2), 8, 3, reinit_head=False)
    sup = [(x.double(), y) for x, y in batches(3, 8, 6)]
    qry = [(x.double(), y) for x, y in batches(3, 8, 7)]
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads, stats = second_order_meta_grad(model, params, env, sup, qry, obj)
    direction = {k: torch.randn_like(v) for k, v in params.items()}

    def objective(eps):
        shifted = {k: v + eps * direction[k] for k, v in params.items()}
        _, st = second_order_meta_grad(model, shifted, env, sup, qry, obj)
        return st["loss"]

    h = 1e-7  # ReLU/max-pool kinks make larger steps inaccurate; float64 keeps this exact enough
    fd = (objective(h) - objective(-h)) / (2 * h)
    analytic = float(sum((grads[k] * direction[k]).sum() for k in params))
    assert analytic == pytest.approx(fd, rel=1e-4, abs=1e-7)


def test_losses_match_reference_formulas():
    torch.manual_seed(0)
    z, y = torch.randn(6, 7), torch.randint(0, 7, (6,))
    p = z.softmax(-1)
    py = p[torch.arange(6), y]
    assert float(losses.ice_neg(z, y)) == pytest.approx(float(-(torch.softmax(-z, -1)[torch.arange(6), y]).log().mean()), rel=1e-5)
    assert float(losses.ice_comp(z, y)) == pytest.approx(float(-(1 - py).log().mean()), rel=1e-5)
    klu_ref = (-math.log(7) - p.log().mean(-1)).mean()
    assert float(losses.klu(z, y)) == pytest.approx(float(klu_ref), rel=1e-5)
    # KLU is finite where log(softmax) underflows, and zero at the uniform distribution.
    assert math.isfinite(float(losses.klu(torch.tensor([[1000.0, -1000.0, 0.0]]))))
    assert float(losses.klu(torch.zeros(2, 10))) == pytest.approx(0.0, abs=1e-6)
    eps, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert float(losses.dos(eps)) == pytest.approx(float((eps**2).mean()))
    assert float(losses.mse_ascent(eps, noise, bound=100.0)) == pytest.approx(-float(((eps - noise) ** 2).mean()))
    assert float(losses.mse_ascent(eps, noise + 100, bound=2.0)) == -2.0


def _protection(model, **over):
    cfg = ProtectConfig(iterations=4, envs_per_step=2, inner_steps=3, guard_every=2, query_batch=8, ntr_batch=16, **over)
    g = torch.Generator().manual_seed(0)
    orig = (torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
    restr = (torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
    from sophon_ray.core import accuracy

    return Protection(
        model, cfg, ProtectData(orig, restr), ClassificationObjective(losses.ice_neg),
        evaluate_original=lambda: accuracy(model, *orig), source_value=accuracy(model, *orig),
        head_keys=("head.weight", "head.bias"),
    )


def test_fts_step_leaves_batchnorm_statistics_untouched():
    model = tiny(norm="bn")
    before = {k: v.clone() for k, v in model.named_buffers()}
    prot = _protection(model)
    prot.fts_step()
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k
    prot.ntr_step()  # NTR is ordinary training: it does update the statistics
    assert any(not torch.equal(v, before[k]) for k, v in model.named_buffers() if "running_mean" in k)


def test_a_diverged_simulation_skips_the_fts_update():
    """An environment whose simulated fine-tuning blows up (SGD at lr 1e30) gives a non-finite
    meta-gradient: the step changes nothing and says so; a finite step does update."""
    from sophon_ray.config import EnvSpace

    model = tiny(norm="bn")
    before = copy.deepcopy(model.state_dict())
    env = EnvSpace(optimizers=("sgd",), lr={"sgd": (1e30, 1e30)}, batch_sizes=(8,), reinit_head_prob=0.0)
    m = _protection(model, env=env).fts_step()
    assert m["fts_skipped"] == 1.0 and math.isnan(m["fts_loss"])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    m = _protection(model).fts_step()
    assert m["fts_skipped"] == 0.0 and math.isfinite(m["fts_loss"])
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_support_per_class_gives_each_environment_its_own_small_draw():
    """protect.support_per_class: every environment's support batches come from N images per class
    of the support pool, a different seeded draw per environment; None keeps the whole pool."""
    from sophon_ray.core.protect import per_class_subset

    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 0])
    idx = per_class_subset(y, 2, torch.Generator().manual_seed(0))
    assert idx.tolist() == sorted(idx.tolist()) and torch.bincount(y[idx]).tolist() == [2, 2, 2]
    assert torch.equal(idx, per_class_subset(y, 2, torch.Generator().manual_seed(0)))
    prot = _protection(tiny(), support_per_class=2)
    pools = [prot._support(0, 0, e) for e in range(2)]
    for x, labels in pools:
        assert len(x) == len(labels) == 2 * len(torch.unique(prot.support[1]))
        assert torch.bincount(labels).tolist() == [2] * len(torch.unique(prot.support[1]))
    assert not torch.equal(pools[0][0], pools[1][0])  # a fresh draw per environment
    assert torch.equal(prot._support(0, 0, 1)[0], pools[1][0])  # ... seeded: the same on every worker
    assert _protection(tiny())._support(0, 0, 0) is not None and len(_protection(tiny())._support(0, 0, 0)[0]) == 48
    assert math.isfinite(prot.fts_step()["fts_loss"])
    with pytest.raises(UserError, match="support_per_class"):
        _protection(tiny(), support_per_class=0)


def test_guard_rolls_back_and_backs_off():
    model = tiny(norm="bn")
    prot = _protection(model, alpha=1e-2)
    prot.check_guard()
    snapshot = copy.deepcopy(model.state_dict())
    prot.fts_step()
    prot.source_value = 2.0  # impossible to meet: the next check must roll back
    m = prot.check_guard()
    assert m["guard_rollback"] == 1.0 and prot.guard.lr_scale == 0.5
    assert prot.fts_opt.lr == pytest.approx(5e-3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_protection_is_deterministic_and_resumable():
    a, b = tiny(), tiny()
    pa, pb = _protection(a), _protection(b)
    for _ in range(2):
        pa.step()
        pb.step()
    state = copy.deepcopy(pb.state_dict())
    c = tiny()
    pc = _protection(c)
    pc.load_state_dict(state)
    for _ in range(2):
        pa.step()
        pc.step()
    for p, q in zip(a.parameters(), c.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)
