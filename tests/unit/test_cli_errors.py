"""The console script on bad input: exit 2, one `error:` line naming the problem, nothing written,
no training and no Ray started. Also the recipe syntax of --recipe."""

from __future__ import annotations

import pytest

from sophon_ray.app.cli import main, parse_recipe
from sophon_ray.config import Recipe
from sophon_ray.errors import UserError


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["pretrain", "nope"], "unknown pipeline"),
        (["pretrain", "digits", "--set", "arch.name=resnet999"], "resnet999"),
        (["pretrain", "digits", "--set", "pretrain.nope=1"], "unknown key"),
        (["attack", "digits", "--model", "scratch", "--recipe", "optimizer=lion"], "optimizer"),
        (["attack", "digits", "--model", "scratch", "--recipe", "strategy=everything"], "strategy"),
        (["attack", "digits", "--model", "/nonexistent", "--recipe", "optimizer=sgd"], "not a sophon-ray model"),
        (["pretrain", "digits", "--set", "original.source=cifar10", "--set", "original.root=/nonexistent"], "/nonexistent"),
        (["protect", "digits", "--source", "scratch", "--set", "protect.loss=foo"], "foo"),
        (["protect", "digits", "--source", "/nonexistent", "--start", "/nonexistent-start"], "/nonexistent-start"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, needle, tmp_path, capsys):
    rc = main(argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["pretrain", "digits", "--smoke", "--set", "pretrain.steps=-5"], "pretrain.steps=-5"),
        (["pretrain", "digits", "--smoke", "--set", "pretrain.batch_size=0"], "pretrain.batch_size=0"),
        (["pretrain", "digits", "--smoke", "--set", "attack.budgets=[50,10]"], "attack.budgets"),
        (["run", "digits", "--smoke", "--workers", "-1"], "--workers -1"),
        (["protect", "digits", "--smoke", "--source", "x", "--workers", "0", "--resume"], "--resume"),
        (["audit", "digits", "--smoke", "--model", "x", "--epsilon", "-0.1"], "--epsilon -0.1"),
        (["audit", "digits", "--smoke", "--model", "x", "--epsilon", "nan"], "--epsilon nan"),
        (["audit", "digits", "--smoke", "--model", "x", "--epsilon", "1.5"], "[0, 1)"),
        (["audit", "digits", "--smoke", "--model", "x", "--min-gap", "-1"], "--min-gap"),
        (["run", "digits", "--smoke", "--epsilon", "inf"], "--epsilon inf"),
        (["audit", "digits-diffusion", "--smoke", "--model", "x", "--epsilon", "-1"], "mse"),
    ],
)
def test_impossible_configs_are_one_line_exit_2(argv, needle, tmp_path, capsys):
    rc = main([*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_parse_recipe():
    r = parse_recipe("strategy=direct-FC,optimizer=adamw,lr=1e-3,batch_size=16,weight_decay=0.01")
    assert r == Recipe("direct-FC", "adamw", 1e-3, 16, 0.01)
    assert parse_recipe("lr=0.1") == Recipe(lr=0.1)  # unnamed fields keep their defaults
    with pytest.raises(UserError):
        parse_recipe("learning_rate=0.1")
