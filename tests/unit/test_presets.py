"""The `paper` protection preset: the SOPHON paper's settings as `--set` overrides, and the two
readings of inverse cross-entropy it chooses between."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sophon_ray import tasks
from sophon_ray.app.cli import main
from sophon_ray.config import PRESETS, preset_overrides
from sophon_ray.core.losses import ice_comp, ice_neg
from sophon_ray.errors import UserError


def test_paper_preset_resolves_to_the_papers_settings_and_a_later_set_wins():
    cfg = tasks.get_pipeline("mnist-to-digits", overrides=[*preset_overrides("paper"), "protect.iterations=150"])
    p = cfg.protect
    assert (p.loss, p.iterations, p.envs_per_step, p.inner_steps, p.alpha, p.beta, p.clip) == (
        "ice-comp", 150, 1, 50, 3e-4, 5e-4, 0.5)
    assert p.env.optimizers == ("sgd",) and p.env.lr == {"sgd": (1e-4, 1e-4)} and p.env.reinit_head_prob == 1.0
    assert p.env.head_only_prob == 0.0 and p.env.batch_sizes == (130,) and (p.query_batch, p.ntr_batch) == (20, 150)
    assert (p.order, p.query_every, p.weighting, p.ml_loop, p.nl_loop) == ("first", 1, "uniform", 1, 1)
    assert tasks.get_pipeline("mnist-to-digits", overrides=list(PRESETS["paper"])).protect.iterations == 1000
    assert preset_overrides(None) == ()
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        preset_overrides("nope")


def test_hardened_preset_is_the_best_measured_compute_and_a_later_set_wins():
    cfg = tasks.get_pipeline("mnist-to-digits", overrides=[*preset_overrides("hardened"), "protect.iterations=200"])
    p = cfg.protect
    assert (p.inner_steps, p.query_every, p.iterations, p.loss) == (20, 4, 200, "klu")  # the pipeline's loss kept
    assert tasks.get_pipeline("mnist-to-digits", overrides=list(PRESETS["hardened"])).protect.iterations == 1600


def test_unknown_preset_is_exit_2(capsys):
    assert main(["pipelines", "--show", "digits", "--preset", "nope"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: unknown preset 'nope'")


def test_ice_readings():
    """The released code computes CrossEntropy(1 - logits): softmax is shift-invariant, so it is
    exactly `ice-neg` (CE on negated logits). The paper's formula -log(1 - p_y) is `ice-comp`,
    which the paper preset uses."""
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(16, 10, generator=g), torch.randint(10, (16,), generator=g)
    assert torch.allclose(F.cross_entropy(1 - z, y), ice_neg(z, y), atol=1e-6)
    p_y = F.softmax(z, -1).gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(ice_comp(z, y), (-torch.log1p(-p_y)).mean(), atol=1e-6)
    assert not torch.allclose(ice_comp(z, y), ice_neg(z, y), atol=1e-2)
