"""Every registered pipeline's config (smoke and full) binds to the builders without loading any
data or training: data specs validate, the model builds for the config's input and class count,
the protect config, suites and budgets validate; pipelines whose data is absent stop with one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipelines import PIPELINES
from sophon_ray import jobs
from sophon_ray.audit.driver import check_budgets
from sophon_ray.cli import main
from sophon_ray.config import apply_overrides
from sophon_ray.core.protect import validate_config
from sophon_ray.data import check_input, check_spec
from sophon_ray.models import build_classifier, build_diffusion, downsample_factor

CASES = [(name, smoke) for name in PIPELINES for smoke in (True, False)]


def _classes(cfg) -> int:
    """The class count the config implies (original and restricted must agree for classifiers)."""
    counts = [check_spec(cfg.original)] + [check_spec(d) for d in cfg.restricted]
    known = [c for c in counts if c is not None]
    assert known, f"{cfg.name}: no domain with a class count known without data"
    if cfg.kind == "classifier":
        assert len(set(known)) == 1, f"{cfg.name}: original/restricted class counts differ: {counts}"
    return counts[0] if counts[0] is not None else known[0]


def _check_model(cfg, num_classes: int) -> None:
    c, s = cfg.input.channels, cfg.input.size
    x = torch.zeros(2, c, s, s)  # (B, C, S, S)
    with torch.no_grad():
        if cfg.kind == "classifier":
            model = build_classifier(cfg.arch, num_classes, c, s).eval()
            assert model(x).shape == (2, num_classes)
        else:
            assert s % downsample_factor(cfg.arch) == 0
            unet, sched = build_diffusion(cfg.arch, c, s)
            assert unet.config.in_channels == c and unet(x[:1], torch.tensor([10])).sample.shape == (1, c, s, s)
            assert len(sched.alphas_cumprod) == dict(cfg.arch.kwargs).get("timesteps", 1000)


@pytest.mark.parametrize("name,smoke", CASES, ids=[f"{n}-{'smoke' if s else 'full'}" for n, s in CASES])
def test_config_binds_to_builders_without_data(name, smoke):
    cfg = PIPELINES[name].get_config(smoke=smoke)
    assert cfg.name == name and cfg.description and cfg.kind in jobs.KINDS
    assert jobs.get_pipeline(name, smoke) == cfg  # the registry serves the same config
    kind = jobs.kind(cfg)
    check_input(cfg.input)
    num_classes = _classes(cfg)
    _check_model(cfg, num_classes)
    validate_config(cfg.protect, cfg.kind)
    check_budgets(cfg.attack.budgets)
    for suite in {kind.audit_suite, kind.run_suite, kind.smoke_suite}:
        for recipe in jobs.get_suite(cfg, suite):
            jobs.validate_recipe(cfg, recipe)
    jobs.validate_recipe(cfg, kind.default_recipe)
    if cfg.kind == "diffusion":
        from sophon_ray import diffusion_jobs as dj

        dj.check_inputs(cfg)
        judge = cfg.diffusion.judge
        if judge is not None:  # the judge labels samples of this pipeline: same input, and knows the classes
            assert judge.kind == "classifier" and judge.input == cfg.input and cfg.diffusion.judge_classes
            assert max(cfg.diffusion.judge_classes) < _classes(judge)
            _check_model(judge, _classes(judge))


@pytest.mark.parametrize("arch", ["resnet50", "vgg13"])
def test_imagenette_cifar10_selects_the_papers_other_architectures(arch):
    cfg = apply_overrides(PIPELINES["imagenette-cifar10"].get_config(), [f"arch.name={arch}"])
    _check_model(cfg, _classes(cfg))


def test_pipelines_listed_in_registry_order(capsys):
    assert list(PIPELINES) == ["digits", "digits-diffusion", "mnist", "mnist-to-digits", "imagenette-cifar10", "cifar100-celeba"]
    assert main(["pipelines"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == list(PIPELINES)


@pytest.mark.parametrize("name", ["imagenette-cifar10", "cifar100-celeba"])
def test_absent_data_is_one_line_exit_2(name, tmp_path, capsys):
    argv = ["pretrain", name, "--smoke", "--out", str(tmp_path / "o"),
            "--set", f"original.root={tmp_path}/missing", "--set", f"restricted.0.root={tmp_path}/missing"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"{tmp_path}/missing" in err[0]
    assert not (tmp_path / "o").exists()


def test_spec_checks_name_the_fix():
    from sophon_ray.config import DomainSpec
    from sophon_ray.errors import UserError

    cfg = PIPELINES["imagenette-cifar10"].get_config()
    with pytest.raises(UserError, match="no option"):
        check_spec(dataclasses.replace(cfg.original, options={"colour": 1}))
    with pytest.raises(UserError, match="no split"):
        check_spec(DomainSpec(source="cifar10", test_split="val"))
    with pytest.raises(UserError, match="labels 0..9"):
        check_spec(DomainSpec(source="digits", classes=(3, 10)))
