"""Co-training (`protect.init=fresh`): protection starts from a seeded random init and learns the
original task from the frozen source (CE + distillation), with no source weights to fall back to."""

from __future__ import annotations

import torch

from sophon_ray import tasks
from sophon_ray.core.objectives import ClassificationObjective, distillation
from sophon_ray.core.losses import klu
from sophon_ray.tasks import load_model

SETTINGS = ["pretrain.steps=150", "protect.iterations=60", "protect.nl_loop=4", "protect.beta=3e-3",
            "protect.inner_steps=2", "protect.envs_per_step=1", "protect.guard_every=20"]


def test_fresh_init_learns_the_original_task_from_the_teacher(tmp_path):
    torch.set_num_threads(1)
    cfg = tasks.get_pipeline("digits", smoke=True, overrides=SETTINGS)
    task = tasks.of(cfg)
    src = task.pretrain(tmp_path / "source", log=lambda m: None)
    source_acc = task.original_metric(load_model(src)[0], task.load_tensors())
    fresh = tasks.of(tasks.get_pipeline("digits", smoke=True, overrides=[*SETTINGS, "protect.init=fresh"]))
    lines: list[str] = []
    out = fresh.protect(src, tmp_path / "protected", log=lines.append)
    model, card = load_model(out)
    t = fresh.load_tensors()
    acc = fresh.original_metric(model, t)
    assert card["lineage"]["protect"]["init"] == "fresh"
    assert source_acc >= 0.95 and acc >= source_acc - 0.03, (source_acc, acc)  # within 3 points of the source
    # protection started from the seeded fresh init, the source is only the frozen teacher
    start, _ = load_model(src)
    prot = fresh.build_protection(start, t, source_acc)
    init = fresh.new_model(t.num_classes, cfg.protect.seed).state_dict()
    assert all(torch.equal(v, init[k]) for k, v in start.state_dict().items())
    teacher = prot.objective.teacher
    assert not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, load_model(src)[0].state_dict()[k]) for k, v in teacher.state_dict().items())


def test_distillation_is_kl_to_the_teacher_and_zero_on_itself():
    g = torch.Generator().manual_seed(0)
    teacher = torch.nn.Linear(6, 4)
    x = torch.randn(8, 6, generator=g)
    assert float(distillation(teacher(x), teacher, x)) < 1e-6
    z = torch.randn(8, 4, generator=g)
    p, logq = torch.softmax(teacher(x), -1), torch.log_softmax(z, -1)
    expected = (p * (torch.log(p) - logq)).sum(-1).mean()
    assert torch.allclose(distillation(z, teacher, x), expected, atol=1e-5)
    y = torch.randint(4, (8,), generator=g)
    obj = ClassificationObjective(klu, teacher)
    student = torch.nn.Linear(6, 4)
    loss = obj.train_loss(student, (x, y))
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(student(x), y) + distillation(student(x), teacher, x))
