"""Batched FTS environments (core/batched.py) equal the sequential first-order loop.

In float64 the vmapped path agrees with `first_order_meta_grad` to ~1e-13 for every inner
optimizer; the 1e-5 checks below are the contract. In float32 the two paths differ by rounding
(vmap runs grouped convolutions), which sign-like adaptive updates (Adam, RMSprop on near-zero
gradients) can amplify over K steps, so the float32 check uses plain SGD and the relative
norm of the whole meta-gradient (a deep BN net differs ~1e-5 in single small tensors).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sophon_ray.config import ArchSpec
from sophon_ray.core import batched
from sophon_ray.core.batched import Job, meta_grad_sum, meta_grads, plan_batches
from sophon_ray.core.inner import Environment, first_order_meta_grad, second_order_meta_grad
from sophon_ray.core.losses import get_loss
from sophon_ray.core.objectives import ClassificationObjective
from sophon_ray.core.protect import LazyBatches
from sophon_ray.errors import UserError
from sophon_ray.models import build_classifier

HEAD = ("head.weight", "head.bias")
OBJ = ClassificationObjective(get_loss("klu"))
ARCHS = {"cnn-tiny": ({}, 8), "cnn-small": ({"width": 4}, 8), "resnet20": ({"width": 4}, 8)}
TOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads per process run far slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def f64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _model(arch: str, seed: int = 0) -> nn.Module:
    kwargs, size = ARCHS[arch]
    torch.manual_seed(seed)
    return build_classifier(ArchSpec(arch, kwargs), 5, 1, size).train()


def _jobs(envs: list[Environment], size: int, query_batch: int = 12) -> list[Job]:
    g = torch.Generator().manual_seed(1)
    pool = (torch.randn(64, 1, size, size, generator=g).to(torch.get_default_dtype()), torch.randint(5, (64,), generator=g))
    return [
        Job(e, LazyBatches(pool, e.batch_size, e.steps, (i, 0), lambda b, g: b),
            LazyBatches(pool, query_batch, e.steps, (i, 1), lambda b, g: b), torch.Generator().manual_seed(100 + i))
        for i, e in enumerate(envs)
    ]


def _sequential(model, jobs, **kw):
    return [first_order_meta_grad(model, dict(model.named_parameters()), j.env, j.support, j.query, OBJ, HEAD,
                                  torch.Generator().manual_seed(100 + i), **kw) for i, j in enumerate(jobs)]


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over the whole flattened gradient."""
    return float(torch.cat([(x - y).flatten() for x, y in zip(a, b)]).norm() / torch.cat([y.flatten() for y in b]).norm())


def _assert_same(seq, bat, tol=TOL, per_tensor=True):
    """Per tensor: max |a - b| <= tol * max |b| (float64); else the whole-gradient relative norm."""
    assert len(seq) == len(bat)
    for (gs, ss), (gb, sb) in zip(seq, bat):
        assert list(gs) == list(gb)
        if not per_tensor:
            assert _rel(list(gb.values()), list(gs.values())) <= tol
        for k in gs if per_tensor else ():
            scale = max(float(gs[k].abs().max()), 1e-12)
            assert float((gs[k] - gb[k]).abs().max()) <= tol * scale, k
        assert sb["loss"] == pytest.approx(ss["loss"], rel=tol, abs=tol)
        assert sb["metric"] == pytest.approx(ss["metric"], abs=tol)


ALL_OPTS = [
    Environment("sgd", 0.1, 8, 2, False), Environment("momentum", 0.05, 8, 2, True),
    Environment("adam", 1e-3, 8, 2, False), Environment("rmsprop", 1e-3, 8, 2, True),
    Environment("adagrad", 0.05, 8, 2, False), Environment("adadelta", 1.0, 8, 2, True),
    Environment("sgd", 0.01, 8, 2, True),
]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_batched_equals_sequential_all_optimizers_f64(arch, f64):
    model = _model(arch)
    jobs = _jobs(ALL_OPTS, ARCHS[arch][1])
    plan = plan_batches(model, jobs, OBJ)
    assert [g.batched for g in plan] == [True] and sorted(plan[0].jobs) == list(range(len(jobs)))
    before = {k: b.clone() for k, b in model.state_dict().items()}
    bat = meta_grads(model, dict(model.named_parameters()), jobs, OBJ, HEAD)
    for k, v in model.state_dict().items():  # parameters and BN running statistics untouched
        assert torch.equal(v, before[k]), k
    _assert_same(_sequential(model, jobs), bat)


@pytest.mark.parametrize("arch", ["cnn-small", "resnet20"])
def test_batched_equals_sequential_f32_sgd(arch):
    model = _model(arch)
    envs = [Environment("sgd", lr, 8, 2, reinit) for lr, reinit in ((0.05, False), (0.02, True), (0.1, False))]
    jobs = _jobs(envs, ARCHS[arch][1])
    _assert_same(_sequential(model, jobs), meta_grads(model, dict(model.named_parameters()), jobs, OBJ, HEAD),
                 per_tensor=False)


def test_query_every_and_linear_weighting(f64):
    model = _model("cnn-tiny")
    envs = [Environment(o, lr, 8, 5, False) for o, lr in (("adam", 1e-3), ("momentum", 0.05), ("adam", 3e-3))]
    jobs = _jobs(envs, 8)
    kw = {"query_every": 2, "weighting": "linear"}
    _assert_same(_sequential(model, jobs, **kw), meta_grads(model, dict(model.named_parameters()), jobs, OBJ, HEAD, **kw))


def test_groups_by_shape_and_head_only(f64):
    """Different support batch sizes or head-only training split groups; a group of one runs sequentially."""
    model = _model("cnn-tiny")
    envs = [
        Environment("sgd", 0.1, 8, 2, False), Environment("adam", 1e-3, 6, 2, True),
        Environment("rmsprop", 1e-3, 8, 2, False), Environment("sgd", 0.1, 8, 2, True, head_only=True),
        Environment("adagrad", 0.05, 8, 2, False, head_only=True),
    ]
    jobs = _jobs(envs, 8)
    plan = plan_batches(model, jobs, OBJ)
    by_jobs = {tuple(sorted(g.jobs)): g for g in plan}
    assert by_jobs[(0, 2)].batched and by_jobs[(3, 4)].batched
    assert not by_jobs[(1,)].batched and by_jobs[(1,)].reason == "group of one environment"
    assert by_jobs[(3, 4)].jobs == (4, 3)  # ordered by optimizer family: adagrad before sgd
    bat = meta_grads(model, dict(model.named_parameters()), jobs, OBJ, HEAD)
    _assert_same(_sequential(model, jobs), bat)
    for k in dict(model.named_parameters()):  # head-only envs: the query gradient still reaches every θ
        assert bat[4][0][k].abs().sum() > 0


def test_meta_grad_sum_matches_fts_loop(f64):
    model = _model("resnet20")
    jobs = _jobs(ALL_OPTS[:4], 8)
    params = dict(model.named_parameters())
    total, stats = meta_grad_sum(model, params, jobs, OBJ, HEAD)
    ref = [torch.zeros_like(p) for p in params.values()]  # fts_step's loop, verbatim
    ref_stats = torch.zeros(3)
    for grads, st in _sequential(model, jobs):
        torch._foreach_add_(ref, list(grads.values()))
        ref_stats += torch.tensor([st["loss"], st["metric"], 1.0])
    for a, b in zip(total, ref):
        assert float((a - b).abs().max()) <= TOL * max(float(b.abs().max()), 1e-12)
    assert torch.allclose(stats, ref_stats, rtol=TOL, atol=TOL) and stats[2] == 4
    empty, st0 = meta_grad_sum(model, params, [], OBJ, HEAD)  # a worker with no environment
    assert all(float(t.abs().sum()) == 0 for t in empty) and float(st0.sum()) == 0


def _no_vmap(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the vmapped path ran where the fallback was expected")

    monkeypatch.setattr(batched, "_batched_group", boom)


def test_fallback_second_order(monkeypatch, f64):
    model = _model("cnn-tiny")
    jobs = _jobs(ALL_OPTS[:3], 8)
    plan = plan_batches(model, jobs, OBJ, order="second")
    assert len(plan) == 1 and not plan[0].batched and "order=second" in plan[0].reason
    _no_vmap(monkeypatch)
    bat = meta_grads(model, dict(model.named_parameters()), jobs, OBJ, HEAD, order="second")
    seq = [second_order_meta_grad(model, dict(model.named_parameters()), j.env, j.support, j.query, OBJ, HEAD,
                                  torch.Generator().manual_seed(100 + i)) for i, j in enumerate(jobs)]
    _assert_same(seq, bat)


def test_fallback_dropout_in_train_mode(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.features = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Dropout(0.5))
    model.head = nn.Linear(8, 5)
    jobs = _jobs(ALL_OPTS[:2], 8)
    plan = plan_batches(model.train(), jobs, OBJ)
    assert not plan[0].batched and "dropout" in plan[0].reason
    with pytest.raises(UserError, match="dropout"):
        plan_batches(model, jobs, OBJ, mode="batched")
    assert plan_batches(model.eval(), jobs, OBJ)[0].batched  # dropout off: batching is exact
    model.train()
    _no_vmap(monkeypatch)
    torch.manual_seed(5)
    bat = meta_grads(model, dict(model.named_parameters()), jobs, OBJ, HEAD)
    torch.manual_seed(5)  # the sequential loop's own random draws, in the same order
    _assert_same(_sequential(model, jobs), bat)


def test_fallback_unknown_layer_and_objective_and_mode():
    model = _model("cnn-tiny")
    jobs = _jobs(ALL_OPTS[:2], 8)
    model.features.append(nn.Hardswish())
    assert "Hardswish" in plan_batches(model, jobs, OBJ)[0].reason
    model = _model("cnn-tiny")

    class Other:  # any objective other than ClassificationObjective
        fit, suppress = OBJ.fit, OBJ.suppress

    assert "Other" in plan_batches(model, jobs, Other())[0].reason
    assert plan_batches(model, jobs, OBJ, mode="sequential")[0].reason == "mode=sequential"
    with pytest.raises(UserError, match="mode"):
        plan_batches(model, jobs, OBJ, mode="fast")
