"""Issue 35: whether a protection's guard ever passed is recorded (metrics.json, the card, MLflow)
and a model whose guard never passed cannot certify (tests/unit/test_certification.py)."""

from __future__ import annotations

import torch

from sophon_ray.config import EnvSpace, ProtectConfig
from sophon_ray.core.losses import klu
from sophon_ray.core.objectives import ClassificationObjective
from sophon_ray.core.protect import Protection, ProtectData, run
from sophon_ray.tasks.base import guard_record


def _protection(value: float, init: str = "source") -> Protection:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    data = ProtectData(original=(torch.randn(32, 6, generator=g), torch.randint(3, (32,), generator=g)),
                       restricted=(torch.randn(32, 6, generator=g), torch.randint(3, (32,), generator=g)))
    cfg = ProtectConfig(iterations=4, envs_per_step=1, inner_steps=2, query_batch=4, ntr_batch=8, guard_every=2,
                        init=init, env=EnvSpace(optimizers=("sgd",), lr={"sgd": (0.01, 0.01)}, batch_sizes=(4,),
                                                reinit_head_prob=0.0, head_only_prob=0.0))
    return Protection(model, cfg, data, ClassificationObjective(klu), evaluate_original=lambda: value,
                      source_value=0.9)


def test_a_guard_that_passes_records_its_last_passing_iteration():
    prot = run(_protection(0.9))
    assert prot.guard.summary() == {"guard_passed": True, "guard_last_pass": 4}
    assert guard_record(prot.guard) == {"passed": True, "last_pass": 4, "rollbacks": 0}


def test_a_guard_that_never_passes_is_recorded_as_such():
    prot = run(_protection(0.1, init="fresh"))  # co-training far below the source: the guard only measures
    assert prot.guard.summary() == {"guard_passed": False, "guard_last_pass": None}
    assert guard_record(prot.guard)["passed"] is False
    state = prot.state_dict()  # and a resumed run keeps it
    again = _protection(0.1, init="fresh")
    again.load_state_dict(state)
    assert again.guard.summary() == prot.guard.summary()
