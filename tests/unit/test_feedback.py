"""The hardening loop's feedback: audit recipes as FTS environments (core/feedback.py), exact,
and chosen from an audit.json (audit/rounds.py); a config without them protects as before."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F

from sophon_ray.config import ArchSpec, EnvRecipe, EnvSpace, PipelineConfig, ProtectConfig, Recipe, config_hash
from sophon_ray.core import accuracy, losses
from sophon_ray.core.attack import lr_factor, make_optimizer
from sophon_ray.core.batched import Job, plan_batches
from sophon_ray.core.feedback import as_env_recipe, env_recipe, environment_of, with_recipes
from sophon_ray.core.inner import Environment, first_order_meta_grad, second_order_meta_grad
from sophon_ray.core.objectives import ClassificationObjective
from sophon_ray.core.protect import Protection, ProtectData
from sophon_ray.errors import UserError
from sophon_ray.models import build_classifier


def _protection(env: EnvSpace, seed: int = 0) -> tuple[torch.nn.Module, Protection]:
    torch.manual_seed(seed)
    model = build_classifier(ArchSpec("cnn-tiny"), 3, 1, 8)
    cfg = ProtectConfig(iterations=3, envs_per_step=3, inner_steps=3, guard_every=2, query_batch=8, ntr_batch=16,
                        support_per_class=4, env=env)
    g = torch.Generator().manual_seed(0)
    orig = (torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
    restr = (torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
    return model, Protection(model, cfg, ProtectData(orig, restr), ClassificationObjective(losses.klu),
                             evaluate_original=lambda: accuracy(model, *orig), source_value=accuracy(model, *orig),
                             head_keys=("head.weight", "head.bias"))


def _weights(model: torch.nn.Module) -> tuple[float, float]:
    w = torch.cat([v.flatten().double() for v in model.state_dict().values() if v.is_floating_point()])
    return float(w.sum()), float(w.abs().sum())


def test_a_config_without_fed_back_recipes_protects_and_hashes_as_before():
    """The figures were made by the commit before EnvSpace.recipes existed (same tiny run), and the
    bundled pipelines' config hashes are the ones their results and Ray Train run names carry."""
    model, prot = _protection(EnvSpace())
    metrics = [prot.step() for _ in range(3)]
    assert _weights(model) == pytest.approx((40.55826710880501, 133.4016271077271), abs=1e-4)
    assert metrics[-1]["fts_loss"] == pytest.approx(0.029231990377108257, abs=1e-6)
    assert "fts_recipe_envs" not in metrics[-1]
    other, prot2 = _protection(EnvSpace(recipes=(), recipe_prob=0.9))  # no recipes: recipe_prob does nothing
    for _ in range(3):
        prot2.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    from sophon_ray.pipelines import load

    assert config_hash(load("digits")) == "38a54fa1" and config_hash(load("mnist-to-digits").protect) == "163358ed"
    assert config_hash(EnvSpace()) != config_hash(EnvSpace(recipes=(EnvRecipe(),)))
    assert config_hash(EnvSpace()) != config_hash(EnvSpace(recipe_prob=0.25))


@pytest.mark.parametrize("strategy,reinit,head_only,note", [
    ("direct-all", False, False, None), ("direct-FC", False, True, "head-only"),
    ("initFC-all", True, False, None), ("initFC-FC", True, True, "head-only"),
    ("renorm-all", False, False, "renorm-all"), ("bnrecal-all", False, False, "bnrecal-all"),
    ("all", False, False, None), ("up", False, False, "up"),
])
def test_env_recipe_maps_the_strategy(strategy, reinit, head_only, note):
    env, notes = env_recipe(Recipe(strategy, "rmsprop", 1e-3, 32), steps=10, total=100, support_per_class=None)
    assert (env.reinit_head, env.head_only) == (reinit, head_only)
    assert (note is None and notes == ()) or (len(notes) == 1 and notes[0].startswith(note))


def test_env_recipe_maps_every_field_exactly():
    recipe = Recipe("initFC-all", "adamw", 3e-4, 64, weight_decay=1e-2, schedule="warmup", warmup_steps=20)
    env, notes = env_recipe(recipe, steps=25, total=400, support_per_class=10)
    assert env == EnvRecipe(optimizer="adam", lr=3e-4, batch_size=64, steps=25, reinit_head=True, head_only=False,
                            weight_decay=1e-2, decoupled_decay=True, schedule="warmup", schedule_total=400,
                            warmup_steps=20, support_per_class=10, label="initFC-all adamw lr0.0003 bs64 wd0.01 warmup @25")
    assert notes == ()
    nesterov, _ = env_recipe(Recipe("direct-all", "nesterov", 3e-2, 16, weight_decay=1e-4), 10, 100, None)
    assert (nesterov.optimizer, nesterov.decoupled_decay, nesterov.weight_decay) == ("nesterov", False, 1e-4)
    assert (nesterov.schedule, nesterov.schedule_total, nesterov.warmup_steps) == ("constant", 0, 0)
    plain, _ = env_recipe(Recipe("direct-all", "adamw", 1e-3, 32), 10, 100, None)
    assert (plain.optimizer, plain.decoupled_decay) == ("adam", False)  # AdamW without decay is Adam
    e = environment_of(env)
    assert (e.optimizer, e.lr, e.batch_size, e.steps, e.support_per_class, e.recipe) == ("adam", 3e-4, 64, 25, 10, env.label)
    with pytest.raises(UserError, match="horizon"):
        env_recipe(recipe, steps=500, total=400, support_per_class=None)


@pytest.mark.parametrize("recipe", [
    Recipe("direct-all", "nesterov", 3e-2, 16, weight_decay=1e-2, schedule="cosine"),
    Recipe("direct-all", "adamw", 3e-3, 16, weight_decay=0.5, schedule="warmup", warmup_steps=2),
    Recipe("direct-all", "rmsprop", 1e-3, 16, weight_decay=1e-1),
    Recipe("direct-all", "adadelta", 1.0, 16, schedule="cosine"),
])
def test_the_inner_loop_follows_the_recipe_as_torch_optim_does(recipe):
    """The simulated fine-tuning of a fed-back recipe is the attack's own: torch.optim's optimizer
    with the recipe's weight decay, lr set per step from its schedule over its whole length
    (core.attack.finetune's loop). Checked through the query gradient at the last of K = 5 steps
    (query_every = K), in the sequential first-order path; second order takes the same steps."""
    torch.manual_seed(0)
    model = build_classifier(ArchSpec("cnn-small", {"width": 4, "norm": "none"}), 3, 1, 8)
    g = torch.Generator().manual_seed(1)
    sup = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(5)]
    qry = [(torch.randn(8, 1, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(5)]
    fixed, _ = env_recipe(recipe, steps=5, total=12, support_per_class=None)
    env = environment_of(fixed)
    obj = ClassificationObjective(losses.klu)
    params = dict(model.named_parameters())
    grads, _ = first_order_meta_grad(model, params, env, sup, qry, obj, query_every=5)
    ref = copy.deepcopy(model)
    opt = make_optimizer(recipe.optimizer, list(ref.parameters()), recipe.lr, recipe.weight_decay)
    for step, (x, y) in enumerate(sup):
        for group in opt.param_groups:
            group["lr"] = recipe.lr * lr_factor(recipe.schedule, step, 12, recipe.warmup_steps)
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    expect = torch.autograd.grad(losses.klu(ref(qry[-1][0]), qry[-1][1]), list(ref.parameters()))
    for (name, got), want in zip(grads.items(), expect):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4, msg=name)
    # second order runs the same inner steps (out of place): its last-step metric is the same model's
    _, s1 = first_order_meta_grad(model, params, env, sup, qry, obj)
    _, s2 = second_order_meta_grad(model, params, env, sup, qry, obj)
    assert s1["metric"] == pytest.approx(s2["metric"])


def test_with_recipes_replaces_drawn_environments_from_its_own_generator():
    drawn = [Environment("sgd", 0.1, 16, 3, reinit_head=False) for _ in range(8)]
    fixed = (EnvRecipe("rmsprop", 1e-3, 32, 7, label="a"), {"optimizer": "adagrad", "lr": 1e-2, "steps": 4, "label": "b"})
    assert with_recipes(drawn, (), 1.0, random.Random(0)) is drawn
    assert with_recipes(drawn, fixed, 0.0, random.Random(0)) == drawn
    every = with_recipes(drawn, fixed, 1.0, random.Random(0))
    assert {e.recipe for e in every} == {"a", "b"} and {e.steps for e in every} == {7, 4}
    half = with_recipes(drawn, fixed, 0.5, random.Random(3))
    assert half == with_recipes(drawn, fixed, 0.5, random.Random(3)) and 0 < sum(bool(e.recipe) for e in half) < 8
    with pytest.raises(UserError, match="unknown key"):
        as_env_recipe({"optimiser": "adam"})
    with pytest.raises(UserError, match="optimizer 'adamw'"):
        as_env_recipe({"optimizer": "adamw"})  # AdamW is adam + decoupled_decay
    with pytest.raises(UserError, match="recipe_prob"):
        _protection(EnvSpace(recipes=fixed, recipe_prob=1.5))


def test_fed_back_recipes_are_simulated_with_their_own_horizon_and_support():
    """With recipe_prob 1 every environment of a step is a fed-back recipe: K = its budget, the
    support drawn with its attacker's images per class; a scheduled one runs sequentially under
    env_batching=auto (vmap applies one lr per environment and step)."""
    recipe = EnvRecipe("adam", 1e-3, 8, steps=5, support_per_class=2, schedule="cosine", schedule_total=10, label="r")
    model, prot = _protection(EnvSpace(recipes=(recipe,), recipe_prob=1.0))
    m = prot.fts_step()
    assert m["fts_recipe_envs"] == 3.0 and m["fts_skipped"] == 0.0
    env = environment_of(recipe)
    x, y = prot._support(0, 0, 0, env)
    assert torch.bincount(y).tolist() == [2, 2, 2]  # the recipe's own support, not protect.support_per_class=4
    assert len(prot._support(0, 0, 0)[0]) == 12
    jobs = [Job(env, [prot.support] * 5, [prot.query] * 5), Job(env, [prot.support] * 5, [prot.query] * 5)]
    plan = plan_batches(model, jobs, prot.objective, mode="auto")
    assert [g.batched for g in plan] == [False, False] and "schedule" in plan[0].reason


def _audit(trials, residual, budgets=(10, 25), epsilon=0.02):
    worst = {}
    for t in trials:
        if t["status"] == "ok":
            for b, v in t["curve"].items():
                worst.setdefault(t["subject"], {})[b] = max(worst.get(t["subject"], {}).get(b, v), v)
    return {"metric": "accuracy", "budgets": list(budgets), "trials": trials, "worst_case": worst,
            "verdict": {"epsilon": epsilon, "residual": residual}}


def _trial(i, recipe, curve, subject="protected", status="ok", **extra):
    return {"id": f"{subject}-r{i:02d}-s0", "subject": subject, "recipe": recipe, "seed": 0, "status": status,
            "curve": curve, **extra}


def test_the_strongest_recipes_are_the_ones_behind_the_largest_residuals():
    from sophon_ray.audit.rounds import feedback, merged, winners
    from sophon_ray import tasks

    adam = {**Recipe("initFC-all", "adam", 1e-3, 32).__dict__}
    rms = {**Recipe("direct-all", "rmsprop", 1e-3, 32, schedule="cosine").__dict__}
    trials = [_trial(0, adam, {"10": 0.5, "25": 0.9}), _trial(1, rms, {"10": 0.7, "25": 0.85}),
              _trial(2, rms, {"10": 0.9, "25": 0.99}, status="failed"), _trial(0, adam, {"10": 0.3, "25": 0.8}, "scratch")]
    audit = _audit(trials, {"10": 0.4, "25": 0.1})
    got = winners(audit, top=3)
    # pairs scored by their advantage over scratch's worst: r01@10 0.4, r00@10 0.2, r00@25 0.1, r01@25 0.05;
    # each recipe once, at its strongest budget
    assert [(w["budget"], w["steps"], w["total"], w["trial"]) for w in got] == [
        (10, 10, 25, "protected-r01-s0"), (10, 10, 25, "protected-r00-s0")]
    assert [round(w["score"], 6) for w in got] == [0.4, 0.2]
    assert [w["budget"] for w in winners(audit, top=1)] == [10]
    # --feedback K is not capped by the number of budgets: K distinct recipes from one budget
    many = [_trial(i, {**adam, "lr": 1e-3 * (i + 1)}, {"10": 0.4 + 0.01 * i, "25": 0.9}) for i in range(5)]
    assert len(winners(_audit(many + trials[3:], {"10": 0.4, "25": 0.1}), top=4)) == 4
    # no budget above epsilon: the one with the largest residual still feeds back, both recipes
    assert [w["budget"] for w in winners(_audit(trials, {"10": 0.01, "25": 0.015}), top=3)] == [25, 25]
    # epochs: the horizon and the schedule's length are the trial's optimizer steps
    epochs = [_trial(0, adam, {"10": 0.5, "25": 0.9}, step_budgets=[40, 100])]
    assert [(w["steps"], w["total"]) for w in winners(_audit(epochs, {"10": 0.3, "25": 0.2}), 3)] == [(100, 100)]
    cfg = PipelineConfig(name="t", description="t")
    cfg = cfg.__class__(**{**cfg.__dict__, "attack": cfg.attack.__class__(train_per_class=20)})
    task = tasks.of(cfg)
    fed = feedback(audit, task, tasks.STEPS_PROTOCOL, top=3)
    assert fed[0]["env"] == {"optimizer": "rmsprop", "lr": 1e-3, "batch_size": 32, "steps": 10, "reinit_head": False,
                             "head_only": False, "weight_decay": 0.0, "decoupled_decay": False, "schedule": "cosine",
                             "schedule_total": 25, "warmup_steps": 0, "support_per_class": 20,
                             "label": "direct-all rmsprop lr0.001 bs32 cosine @10"}
    full = tasks.SuiteProtocol(attacker_data="full")
    assert feedback(audit, task, full, top=1)[0]["env"]["support_per_class"] is None
    both = merged((), [f["env"] for f in fed])
    assert merged(both, [fed[1]["env"]]) == both and len(both) == 2
