"""Every registered pipeline's config (smoke and full) binds to the builders without loading any
data or training: data specs validate, the model builds for the config's input and class count,
the protect config, suites and budgets validate. (Pipelines whose data is absent stop with one
line: tests/e2e/test_cli.py.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from sophon_ray import tasks
from sophon_ray.audit.driver import check_budgets
from sophon_ray.app.cli import main
from sophon_ray.config import apply_overrides
from sophon_ray.core.protect import validate_config
from sophon_ray.data import check_input, check_spec
from sophon_ray.models import build_classifier, build_diffusion, downsample_factor
from sophon_ray.pipelines import PIPELINES

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
    """Build the config's model and run a forward pass on the meta device: shapes are checked,
    no weights are allocated or initialised (a full-size ResNet-50 in milliseconds)."""
    c, s = cfg.input.channels, cfg.input.size
    with torch.device("meta"), torch.no_grad():
        x = torch.zeros(2, c, s, s)  # (B, C, S, S)
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
    assert cfg.name == name and cfg.description and cfg.kind in tasks.TASKS
    assert tasks.get_pipeline(name, smoke) == cfg  # the registry serves the same config
    task = tasks.of(cfg)
    assert task.kind == cfg.kind and task.cfg is cfg
    tasks.validate(cfg)
    check_input(cfg.input)
    num_classes = _classes(cfg)
    _check_model(cfg, num_classes)
    validate_config(cfg.protect, cfg.kind)
    check_budgets(cfg.attack.budgets)
    for suite in {task.audit_suite, task.run_suite, task.smoke_suite}:
        assert task.suite(suite) and set(task.suite(suite)) <= set().union(*task.suites().values())
        for recipe in task.suite(suite):
            task.validate_recipe(recipe)
    task.validate_recipe(task.default_recipe)
    task.check()
    if cfg.kind == "diffusion":
        judge = cfg.diffusion.judge
        if judge is not None:  # the judge labels samples of this pipeline: same input, and knows the classes
            assert judge.kind == "classifier" and judge.input == cfg.input and cfg.diffusion.judge_classes
            assert max(cfg.diffusion.judge_classes) < _classes(judge)
            none = cfg.diffusion.judge_none_class
            assert none is None or (none < _classes(judge) and none not in cfg.diffusion.judge_classes)
            _check_model(judge, _classes(judge))


@pytest.mark.parametrize("arch", ["resnet50", "vgg13"])
def test_imagenette_cifar10_selects_the_papers_other_architectures(arch):
    cfg = apply_overrides(PIPELINES["imagenette-cifar10"].get_config(), [f"arch.name={arch}"])
    _check_model(cfg, _classes(cfg))


def test_pipelines_listed_in_registry_order(capsys):
    assert list(PIPELINES) == ["digits", "digits-diffusion", "mnist", "mnist-to-digits", "mnist-to-digits-demo",
                               "imagenette-cifar10", "cifar100-celeba"]
    assert main(["pipelines"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[: len(PIPELINES)]] == list(PIPELINES)
    assert all(line.startswith("(") for line in lines[len(PIPELINES):])  # then at most a hint, no other rows


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


def test_judge_none_class_is_checked():
    """diffusion.judge_none_class must be one of the judge's labels and not a restricted one."""
    from sophon_ray.errors import UserError

    cfg = PIPELINES["digits-diffusion"].get_config(smoke=True)
    assert cfg.diffusion.judge_none_class == 10
    tasks.of(apply_overrides(cfg, ["diffusion.judge_none_class=None"])).check()
    for bad in ("5", "11", "-1"):
        with pytest.raises(UserError, match="judge_none_class"):
            tasks.of(apply_overrides(cfg, [f"diffusion.judge_none_class={bad}"])).check()


@pytest.mark.parametrize("name", list(PIPELINES))
def test_bundled_pipelines_are_top_level_files_in_the_users_format(name):
    """Each bundled pipeline is a plain file in the top-level pipelines/ (the package keeps only the
    loader) and loads as a user's pipeline file, to the same config: every one is a worked example."""
    from sophon_ray.pipelines import BUNDLED, bundled_dir, load

    root = Path(__file__).resolve().parents[2]
    assert bundled_dir() == root / "pipelines"
    path = bundled_dir() / BUNDLED[name]
    assert not (root / "sophon_ray" / "pipelines" / BUNDLED[name]).exists()
    for smoke in (False, True):
        assert load(path, smoke) == load(name, smoke) == PIPELINES[name].get_config(smoke=smoke)


def test_bundled_modules_by_file_stem():
    from sophon_ray.pipelines import digits_diffusion

    assert digits_diffusion is PIPELINES["digits-diffusion"] and callable(digits_diffusion.judge_config)
    with pytest.raises(ImportError):
        from sophon_ray.pipelines import no_such_pipeline  # noqa: F401


def test_yaml_domain_replaces_the_bases_whole(tmp_path):
    """A domain a pipeline file gives means what it says (issue 30): the fields it leaves out take
    DomainSpec's defaults, not the base's (digits' classes 0-4 must not reach a 3-class folder);
    the resolved domains are spelled out by `pipelines --show`."""
    from sophon_ray.config import DomainSpec
    from sophon_ray.pipelines import describe_domains, load

    f = tmp_path / "mine.yaml"
    f.write_text("name: mine\ndescription: d\nbase: digits\n"
                 "original: {source: imagefolder, root: /data/mine, options: {size: 32}}\n"
                 "restricted: [{source: parquet, root: /data/theirs}]\n")
    cfg = load(f)
    assert cfg.original == DomainSpec(source="imagefolder", root="/data/mine", options={"size": 32})
    assert cfg.restricted == (DomainSpec(source="parquet", root="/data/theirs"),)
    assert cfg.protect == load("digits").protect  # what the file leaves out still comes from the base
    assert describe_domains(cfg) == [
        "original: imagefolder at /data/mine, all classes (labels as stored), options {'size': 32}",
        "restricted.0: parquet at /data/theirs, all classes (labels as stored)",
    ]
    assert describe_domains(load("digits"))[0] == "original: digits, classes 0, 1, 2, 3, 4 (relabelled 0..4)"
    f.write_text("name: mine\ndescription: d\nbase: digits\noriginal: {classes: [0, 1, 2]}\n")
    assert load(f).original == DomainSpec(source="digits", classes=(0, 1, 2))


def test_show_prints_the_resolved_domains(capsys):
    assert main(["pipelines", "--show", "mnist-to-digits"]) == 0
    out = capsys.readouterr().out
    assert "#   original: mnist5k, all classes (labels as stored)\n#   restricted.0: digits, all classes" in out
    assert yaml.safe_load(out)["name"] == "mnist-to-digits"  # still YAML: the domain lines are comments


# The bundled pipelines' config hashes (16 hex, full / smoke), as recorded before the move to the
# top-level pipelines/ (issue 30) and kept since: a change re-runs every user's `run` stages.
PINNED_HASHES = {
    "digits": ("38a54fa15f9a033d", "64e528612c3baf75"),
    "digits-diffusion": ("ff485e0c0c4e24f7", "dfa5dbdead8d9186"),
    "mnist": ("a8944a8d66949b29", "f39c065a5d6bcb0d"),
    "mnist-to-digits": ("0aa1963316f5a0ae", "b314cd76c4c1e9df"),
    "mnist-to-digits-demo": ("6c7f10151055269a", "1307c7e05a4aa2ce"),  # added with it (issue 30 part 2)
    "imagenette-cifar10": ("a75722c343f84cfd", "0e69224a89f1934f"),
    "cifar100-celeba": ("deae18c371a529be", "45b86509b50cc032"),
}


def test_bundled_pipeline_hashes_are_pinned():
    from sophon_ray import tasks
    from sophon_ray.config import config_hash

    for name, (full, smoke) in PINNED_HASHES.items():
        assert (config_hash(tasks.get_pipeline(name), 16), config_hash(tasks.get_pipeline(name, smoke=True), 16)) == (full, smoke), name
    fresh = tasks.get_pipeline("mnist-to-digits", overrides=["protect.init=fresh"])
    assert config_hash(fresh, 16) != PINNED_HASHES["mnist-to-digits"][0]  # a used field is hashed as usual
