"""The console script end to end on digits (smoke settings), model directories and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sophon_ray
from sophon_ray.cli import main, parse_recipe
from sophon_ray.errors import UserError

SMOKE = ["--smoke"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    assert main(["pretrain", "digits", *SMOKE, "--out", str(root / "source")]) == 0
    assert main(["protect", "digits", *SMOKE, "--source", str(root / "source"), "--out", str(root / "protected")]) == 0
    return root


def test_pretrain_and_protect_write_valid_model_dirs(models):
    for role in ("source", "protected"):
        d = models / role
        assert sorted(p.name for p in d.iterdir()) == ["metrics.json", "model.json", "model.safetensors"]
        card = json.loads((d / "model.json").read_text())
        assert card["format"] == "sophon-ray/model@1" and card["role"] == role
        assert card["input"] == {"channels": 1, "size": 16, "resize": "bilinear", "mean": [0.5], "std": [0.5]}
        assert card["num_classes"] == 5 and card["pipeline"] == "digits"
        model, loaded = sophon_ray.load_model(d)
        assert loaded["sha256"] == card["sha256"]
        assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 5)
        env = card["lineage"]["environment"]  # what decides bit-reproducibility (docs/results.md)
        assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["torch"] == torch.__version__
    lineage = json.loads((models / "protected" / "model.json").read_text())["lineage"]
    assert lineage["source"]["sha256"] == json.loads((models / "source" / "model.json").read_text())["sha256"]
    assert not list(models.glob(".*tmp*"))  # nothing half-written left behind


def test_attack_cli_reports_curve(models, tmp_path, capsys):
    rc = main(["attack", "digits", *SMOKE, "--model", str(models / "protected"),
               "--recipe", "strategy=initFC-FC,optimizer=sgd,lr=0.1", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "attack.json").read_text())
    assert list(result["curve"]) == ["5", "10"]
    assert all(0.0 <= v <= 1.0 for v in result["curve"].values())


def test_tampered_weights_are_refused(models, tmp_path, capsys):
    import shutil

    d = tmp_path / "tampered"
    shutil.copytree(models / "source", d)
    blob = bytearray((d / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (d / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(UserError, match="sha256"):
        sophon_ray.load_model(d)
    rc = main(["attack", "digits", *SMOKE, "--model", str(d), "--recipe", "optimizer=sgd"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sha256" in err[0]


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
        (["protect", "digits", "--source", "scratch", "--set", "protect.loss=foo"], None),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, needle, tmp_path, capsys):
    rc = main(argv + ["--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ")
    if needle:
        assert needle in err[0]
    assert not (tmp_path / "o").exists()


def test_model_that_does_not_fit_pipeline_is_refused(models, capsys):
    rc = main(["attack", "digits", *SMOKE, "--model", str(models / "source"), "--set", "input.size=8",
               "--recipe", "optimizer=sgd"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not match pipeline" in err


def test_parse_recipe():
    r = parse_recipe("strategy=direct-FC,optimizer=adamw,lr=1e-3,batch_size=16,weight_decay=0.01")
    assert (r.strategy, r.optimizer, r.lr, r.batch_size, r.weight_decay) == ("direct-FC", "adamw", 1e-3, 16, 0.01)


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "sophon_ray.cli", "pipelines"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("digits")
