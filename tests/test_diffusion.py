"""Generation mode on unet-tiny: the ε-prediction objective, timestep sampling, evaluation,
protection end to end, attacks and bad input (fast: tiny seeded UNets, smoke settings), and the
same commands as classification for a diffusion pipeline: CLI pretrain/protect/attack/samples,
the Ray Tune audit (MSE, attacker goal min) and one-line bad-input errors."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sophon_ray
from sophon_ray import diffusion_jobs as dj
from sophon_ray import jobs
from sophon_ray.config import ArchSpec, InputSpec, ProtectConfig, Recipe
from sophon_ray.core import losses
from sophon_ray.core.diffusion import (
    DiffusionObjective, check_images, class_fraction, denoising_mse, eval_timesteps, noisy, sample,
)
from sophon_ray.core.inner import Environment, first_order_meta_grad
from sophon_ray.core.protect import Protection, ProtectData
from sophon_ray.errors import UserError
from sophon_ray.models import build_diffusion
from pipelines import digits_diffusion


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
    assert class_fraction(judge, s1, (5, 6, 7, 8, 9)) == 1.0 and class_fraction(judge, s1, (0,)) == 0.0


SMOKE = ["--smoke"]


@pytest.fixture(scope="module")
def cli_models(tmp_path_factory):
    """digits-diffusion smoke models made through the console script: source, protected (in-process)."""
    from sophon_ray.cli import main

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dd-cli")
    assert main(["pretrain", "digits-diffusion", *SMOKE, "--out", str(root / "source")]) == 0
    assert main(["protect", "digits-diffusion", *SMOKE, "--local", "--source", str(root / "source"),
                 "--out", str(root / "protected")]) == 0
    return root


@pytest.fixture(scope="module")
def smoke(cli_models):
    """(cfg, tensors, source dir, protected dir) of the smoke models (made by the console script)."""
    cfg = digits_diffusion.get_config(smoke=True)
    return cfg, dj.load_tensors(cfg), cli_models / "source", cli_models / "protected"


def test_protect_end_to_end_writes_a_valid_model_dir(smoke):
    cfg, t, src, prot = smoke
    assert sorted(p.name for p in prot.iterdir()) == ["metrics.json", "model.json", "model.safetensors"]
    card = json.loads((prot / "model.json").read_text())
    assert card["kind"] == "diffusion" and card["role"] == "protected" and card["arch"]["name"] == "unet-tiny"
    assert card["lineage"]["source"]["sha256"] == json.loads((src / "model.json").read_text())["sha256"]
    metrics = json.loads((prot / "metrics.json").read_text())
    assert metrics["iterations"] == 2 and {"original_test_mse", "source_original_test_mse"} <= set(metrics)
    # the guard holds: the protected model ends within 10 % of the source's original-domain MSE
    assert metrics["original_test_mse"] <= metrics["source_original_test_mse"] * 1.10 + 1e-9
    model, loaded = sophon_ray.load_model(prot)
    assert loaded["sha256"] == card["sha256"]
    x = t.original_test[0][:2]
    assert model(x, torch.tensor([1, 500])).sample.shape == x.shape


def test_attack_returns_mse_per_budget_and_respects_strategy(smoke):
    cfg, t, src, prot = smoke
    curve = dj.attack(cfg, prot, Recipe("all", "adam", 1e-3, 8), seed=0, t=t)
    assert list(curve) == list(cfg.attack.budgets) and all(0 < v < 5 for v in curve.values())
    res = dj.attack_run(cfg, src, Recipe("up", "sgd", 1e-2, 8), seed=0, t=t)
    assert list(res.original) == list(cfg.attack.budgets)
    before = dict(sophon_ray.load_model(src)[0].named_parameters())
    for k, p in res.model.named_parameters():
        assert torch.equal(p, before[k]) != k.startswith("up_blocks."), k
    assert list(dj.attack(cfg, None, Recipe("down", "momentum", 1e-2, 8), t=t)) == list(cfg.attack.budgets)
    with pytest.raises(UserError, match="is for classifiers"):
        dj.attack(cfg, prot, Recipe("initFC-all", "adam", 1e-3, 8), t=t)


def test_bad_size_and_channels_are_one_line_user_errors(smoke, tmp_path):
    cfg, t, src, _ = smoke
    bad_size = dataclasses.replace(cfg, input=dataclasses.replace(cfg.input, size=15))
    with pytest.raises(UserError, match="not divisible by the UNet's down-sampling factor 2") as e:
        dj.pretrain(bad_size, tmp_path / "x", log=lambda m: None)
    assert "\n" not in str(e.value)
    rgb = dataclasses.replace(cfg, input=InputSpec(channels=3, size=16, mean=(0.5,), std=(0.5,)))
    with pytest.raises(UserError, match="takes 1-channel images but pipeline") as e:
        jobs.protect(rgb, src, tmp_path / "y", log=lambda m: None)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="has 3 channels but the UNet takes 1"):
        check_images(torch.zeros(1, 3, 8, 8), 1, 2)
    with pytest.raises(UserError, match="not divisible"):
        check_images(torch.zeros(1, 1, 9, 9), 1, 2)


def test_core_diffusion_does_not_import_diffusers():
    code = "import sys, sophon_ray.core.diffusion; print('diffusers' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


# -- the same commands as classification: CLI, Ray Tune audit, bad input ----------------------


def test_cli_pretrain_protect_attack(cli_models, tmp_path, capsys):
    from sophon_ray.cli import main

    for role in ("source", "protected"):
        card = json.loads((cli_models / role / "model.json").read_text())
        assert card["kind"] == "diffusion" and card["role"] == role and card["lineage"]["stage_hash"]
        metrics = json.loads((cli_models / role / "metrics.json").read_text())
        assert {"original_test_mse", "restricted_test_mse"} <= set(metrics)
    rc = main(["attack", "digits-diffusion", *SMOKE, "--model", str(cli_models / "protected"),
               "--recipe", "strategy=up,optimizer=adam,lr=1e-3,batch_size=8", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "attack.json").read_text())
    assert result["metric"] == "mse" and list(result["curve"]) == ["2", "4"]
    assert all(0 < v < 5 for v in result["curve"].values())
    assert "restricted mse" in capsys.readouterr().out


@pytest.mark.slow  # ~25 s: real local Ray Tune, 12 trials, then sample grids + a freshly trained judge
def test_audit_on_ray_tune_minimises_mse_with_report_and_samples(cli_models, tmp_path):
    from sophon_ray.audit.driver import run_audit
    from sophon_ray.audit.space import SUBJECTS

    from sophon_ray.config import apply_overrides

    cheap = ["diffusion.eval_timesteps=2", "diffusion.samples=8", "diffusion.sample_steps=5"]
    cfg = apply_overrides(digits_diffusion.get_config(smoke=True), cheap)
    out, lines = tmp_path / "audit", []
    audit = run_audit(cfg, str(cli_models / "protected"), out=out, suite="diffusion-test-v1", seeds=1,
                      concurrency=2, top_k=1, log=lines.append)
    assert json.loads((out / "audit.json").read_text()) == audit
    assert audit["metric"] == "mse" and audit["attacker_goal"] == "min" and audit["budgets"] == [2, 4]
    assert {t["subject"] for t in audit["trials"]} == set(SUBJECTS) and len({t["id"] for t in audit["trials"]}) >= 6
    assert all(t["status"] == "ok" for t in audit["trials"])
    for subject, curve in audit["worst_case"].items():  # worst case = the LOWEST MSE any recipe reached
        values = [t["curve"][b] for t in audit["trials"] if t["subject"] == subject for b in ["4"]]
        assert curve["4"] == min(values)
    v, w = audit["verdict"], audit["worst_case"]
    assert v["epsilon"] == 0.005 and v["margin"] == pytest.approx(max(w["scratch"][b] - w["protected"][b] for b in w["scratch"]))
    for name in ("report.html", "curves.png", "scatter.png", "original.png", "samples.json"):
        assert (out / name).stat().st_size > 0
    page = (out / "report.html").read_text()
    assert "attacker goal min" in page and "lower is better for the attacker" in page and "recognised" in page
    samples = json.loads((out / "samples.json").read_text())
    assert set(samples["subjects"]) == set(SUBJECTS) and "before" not in samples["subjects"]["scratch"]
    assert 0.0 <= samples["subjects"]["protected"]["after"]["recognised"] <= 1.0
    assert (out / samples["subjects"]["protected"]["after"]["grid"]).is_file()
    assert samples["judge"]["test_accuracy"] > 0.5 and samples["judge"]["classes"] == [5, 6, 7, 8, 9]


def test_samples_command_writes_grids_and_judge_metric(cli_models, tmp_path):
    from sophon_ray.cli import main

    out = tmp_path / "samples"
    rc = main(["samples", "digits-diffusion", *SMOKE, "--model", str(cli_models / "protected"), "--steps", "2",
               "--set", "diffusion.samples=4", "--set", "diffusion.sample_steps=3",
               "--set", "diffusion.judge.pretrain.steps=20", "--out", str(out)])
    assert rc == 0
    info = json.loads((out / "samples.json").read_text())
    assert info["steps"] == 2 and info["recipe"]["strategy"] == "all" and set(info["subjects"]) == {
        "protected", "scratch", "original"}
    assert all((out / row["after"]["grid"]).is_file() for row in info["subjects"].values())
    assert (out / "judge" / "model.json").is_file()  # trained once, cached for the next call


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["pretrain", "digits-diffusion", "--set", "input.size=15"], "not divisible by the UNet's down-sampling factor"),
        (["attack", "digits-diffusion", "--model", "{protected}", "--set", "input.channels=3"],
         "takes 1-channel images but pipeline"),
        (["attack", "digits-diffusion", "--model", "{protected}", "--recipe", "strategy=direct-FC"], "is for classifiers"),
        (["attack", "digits-diffusion", "--model", "{classifier}"], "kind classifier != diffusion"),
        (["protect", "digits-diffusion", "--local", "--source", "{classifier}"], "kind classifier != diffusion"),
        (["audit", "digits-diffusion", "--model", "{protected}", "--suite", "default-v1"], "unknown diffusion attack suite"),
        (["attack", "digits", "--model", "{protected}"], "kind diffusion != classifier"),
        (["samples", "digits", "--model", "{protected}"], "needs a diffusion pipeline"),
    ],
)
def test_bad_input_is_one_line_exit_2(cli_models, classifier_dir, argv, needle, tmp_path, capsys):
    from sophon_ray.cli import main

    argv = [a.format(protected=cli_models / "protected", classifier=classifier_dir) for a in argv]
    rc = main([*argv, *SMOKE, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """An (untrained) digits classifier model directory: the wrong kind for digits-diffusion."""
    from sophon_ray import jobs
    from sophon_ray.card import save_model_dir

    cfg = jobs.get_pipeline("digits", smoke=True)
    t = jobs.load_tensors(cfg)
    d = tmp_path_factory.mktemp("classifier") / "model"
    return save_model_dir(d, jobs.new_model(cfg, t.num_classes, 0), jobs.make_card(cfg, t, "source", {}), {})
