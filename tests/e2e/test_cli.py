"""The console script end to end on digits (FAST settings): model directories, attacks, tampered
weights, models that do not fit, output folders that are not ours, unreachable Ray, and the
`python -m` entry point."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

import sophon_ray
from sophon_ray import tasks
from sophon_ray.app.cli import main, parse_recipe
from sophon_ray.errors import UserError

from tests.support import FAST

SMOKE = ["--smoke"]


@pytest.fixture(scope="module")
def models(digits_models):
    return digits_models


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
        metrics = json.loads((d / "metrics.json").read_text())
        assert "seconds" not in metrics and "timings" not in metrics  # no measurement in the product's outputs
    lineage = json.loads((models / "protected" / "model.json").read_text())["lineage"]
    assert lineage["source"]["sha256"] == json.loads((models / "source" / "model.json").read_text())["sha256"]
    assert not list(models.glob(".*tmp*"))  # nothing half-written left behind


def test_attack_cli_reports_the_librarys_seeded_curve(models, tmp_path):
    rc = main(["attack", "digits", *SMOKE, "--model", str(models / "protected"),
               "--recipe", "strategy=initFC-FC,optimizer=sgd,lr=0.1", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "attack.json").read_text())
    assert list(result["curve"]) == ["5", "10"]
    task = tasks.of(tasks.get_pipeline("digits", smoke=True))
    t = task.load_tensors()
    again = task.attack(models / "protected", parse_recipe("strategy=initFC-FC,optimizer=sgd,lr=0.1"), seed=0, t=t)
    assert result["curve"] == pytest.approx({str(k): v for k, v in again.items()}, abs=1e-9)  # same seeded run
    n = len(t.restricted_test[1])
    assert all(v * n == pytest.approx(round(v * n), abs=1e-6) for v in result["curve"].values())  # correct / n


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


def test_model_that_does_not_fit_pipeline_is_refused(models, capsys):
    rc = main(["attack", "digits", *SMOKE, "--model", str(models / "source"), "--set", "input.size=8",
               "--recipe", "optimizer=sgd"])
    err = capsys.readouterr().err
    assert rc == 2 and "does not match pipeline" in err


def test_model_of_another_arch_or_edited_card_is_refused(tmp_path, capsys):
    tiny = tmp_path / "tiny"
    assert main(["pretrain", "digits", *FAST, "--set", "arch.name=cnn-tiny", "--out", str(tiny)]) == 0
    capsys.readouterr()
    rc = main(["attack", "digits", *FAST, "--model", str(tiny), "--recipe", "lr=0.01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "arch cnn-tiny" in err[-1] and "cnn-small" in err[-1]
    card = json.loads((tiny / "model.json").read_text())
    card["arch"] = {"name": "cnn-small", "kwargs": {}}  # edited: the weights are cnn-tiny's
    (tiny / "model.json").write_text(json.dumps(card))
    rc = main(["attack", "digits", *FAST, "--model", str(tiny), "--recipe", "lr=0.01"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "do not fit" in err[0]


def test_pretrain_out_with_user_files_is_refused_then_replaced_with_force(tmp_path, capsys):
    out = tmp_path / "DIR"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "thesis.tex").write_text("years of work")
    rc = main(["pretrain", "digits", *FAST, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--force" in err[0]
    assert (out / "sub" / "thesis.tex").read_text() == "years of work" and len(list(out.iterdir())) == 1
    plain = tmp_path / "file"
    plain.write_text("mine")
    assert main(["pretrain", "digits", *FAST, "--out", str(plain)]) == 2 and plain.read_text() == "mine"
    assert not list(tmp_path.glob(".*"))  # nothing moved aside
    assert main(["pretrain", "digits", *FAST, "--out", str(out), "--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.json", "model.safetensors"]
    assert main(["pretrain", "digits", *FAST, "--out", str(out)]) == 0  # our own output: replaced without --force
    assert not list(tmp_path.glob(".*"))


def test_unreachable_ray_address_fails_fast_for_audit(models, tmp_path, capsys):
    t = time.time()
    rc = main(["audit", "digits", "--smoke", "--model", str(models / "source"), "--ray-address", "127.0.0.1:9",
               "--out", str(tmp_path / "audit")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "unreachable" in err[-1] and time.time() - t < 30
    assert not (tmp_path / "audit").exists()


@pytest.mark.parametrize("name", ["imagenette-cifar10", "cifar100-celeba"])
def test_absent_data_is_one_line_exit_2(name, tmp_path, capsys):
    argv = ["pretrain", name, "--smoke", "--out", str(tmp_path / "o"),
            "--set", f"original.root={tmp_path}/missing", "--set", f"restricted.0.root={tmp_path}/missing"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"{tmp_path}/missing" in err[0]
    assert not (tmp_path / "o").exists()


def test_console_script_entry_point():
    r = subprocess.run([sys.executable, "-m", "sophon_ray.app.cli", "pipelines"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("digits")
