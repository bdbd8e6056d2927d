"""Bring your own model and pipeline (issue 19): `sophon-ray import`, pipeline files, `run --source`.

Real CLI processes, a real Ray (run --smoke), real MLflow (SQLite); tiny seeded models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "sophon_ray.app.cli"]


def cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _image_folder(root: Path, classes: int, per_class: int, seed: int) -> None:
    from PIL import Image

    g = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", max(per_class // 2, 2))):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):  # class c: a bright square at a class-specific place
                x = g.integers(0, 60, (16, 16, 3), dtype=np.uint8)
                x[4 * c : 4 * c + 6, 4 * c : 4 * c + 6] = 230
                Image.fromarray(x).save(d / f"{i}.png")


PIPELINE = """\
name: mine
description: a user's pipeline from a file (image folders, torchvision resnet18)
base: digits
input: {channels: 3, size: 16, mean: [0.5], std: [0.5]}
original: {source: imagefolder, root: "%(orig)s", options: {size: 16}, classes: null}
restricted: [{source: imagefolder, root: "%(restr)s", options: {size: 16}, classes: null}]
arch: {name: "torchvision:resnet18"}
smoke: {protect.iterations: 2, protect.inner_steps: 2, protect.guard_every: 2, attack.budgets: [3, 6]}
"""


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A temp folder with two image-folder domains, a YAML pipeline and a resnet18's weights saved
    as safetensors, as a weights-only .pt and as a pickled module."""
    from safetensors.torch import save_file
    import torchvision

    d = tmp_path_factory.mktemp("user")
    _image_folder(d / "orig", 3, 6, 0)
    _image_folder(d / "restr", 3, 6, 1)
    (d / "pipe.yaml").write_text(PIPELINE % {"orig": d / "orig", "restr": d / "restr"})
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=1000)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(d / "r18.safetensors"))
    torch.save(m.state_dict(), d / "r18.pt")
    torch.save(m, d / "r18_module.pt")
    return d


def test_import_torchvision_state_dicts(user):
    """The same resnet18 weights as safetensors and as a weights-only .pt give the same model
    directory; the card records where the weights came from and their sha256."""
    import hashlib
    import json

    import sophon_ray

    a = cli("import", "pipe.yaml", "--smoke", "--weights", "r18.safetensors", "--new-head", "--out", "src-a", cwd=user)
    b = cli("import", "pipe.yaml", "--smoke", "--weights", "r18.pt", "--new-head", "--out", "src-b", cwd=user)
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-800:] + b.stderr[-800:]
    ma, card = sophon_ray.load_model(user / "src-a")
    mb, _ = sophon_ray.load_model(user / "src-b")
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    src = torch.load(user / "r18.pt", weights_only=True)
    assert torch.equal(sa["features.layer1.0.conv1.weight"], src["layer1.0.conv1.weight"])
    assert sa["head.weight"].shape == (3, 512)  # re-initialised for 3 classes
    imported = card["lineage"]["imported"]
    assert imported["sha256"] == hashlib.sha256((user / "r18.safetensors").read_bytes()).hexdigest()
    assert imported["new_head"] is True and card["arch"]["name"] == "torchvision:resnet18"
    # the recorded accuracy is the imported model's own, recomputed here on the pipeline's test split
    from sophon_ray import tasks

    task = tasks.of(tasks.get_pipeline(str(user / "pipe.yaml"), smoke=True))
    t = task.load_tensors()
    n = len(t.original_test[1])
    recorded = json.loads((user / "src-a" / "metrics.json").read_text())["original_test_accuracy"]
    assert recorded * n == pytest.approx(round(recorded * n))  # a fraction of the n test images
    assert task.original_metric(ma, t) == pytest.approx(recorded, abs=1.5 / n)  # a near tie may flip across threads


def test_import_refusals_are_one_line(user):
    """A pickled module, a wrong class count without --new-head, weights of another arch, a
    missing file: exit 2, one line, nothing written."""
    cases = [
        (["--weights", "r18_module.pt", "--new-head"], "pickled module"),
        (["--weights", "r18.safetensors"], "--new-head"),
        (["--weights", "nope.pt"], "no such file"),
    ]
    for extra, words in cases:
        r = cli("import", "pipe.yaml", "--smoke", *extra, "--out", "refused", cwd=user)
        assert r.returncode == 2 and words in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (user / "refused").exists()
    r = cli("import", "digits", "--smoke", "--weights", "r18.pt", "--out", "refused", cwd=user)
    assert r.returncode == 2 and "missing weight 'features.0.weight'" in r.stderr


def test_pipeline_file_show_and_malformed(user):
    r = cli("pipelines", "--show", "pipe.yaml", "--smoke", "--set", "protect.alpha=0.01", cwd=user)
    assert r.returncode == 0 and "name: mine" in r.stdout and "alpha: 0.01" in r.stdout and "torchvision:resnet18" in r.stdout
    (user / "bad.yaml").write_text("name: x\ndescription: y\nprotect: {iterationz: 3}\n")
    r = cli("pipelines", "--show", "bad.yaml", cwd=user)
    assert r.returncode == 2 and "iterationz" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (user / "broken.yaml").write_text("name: [unclosed\n")
    r = cli("run", "broken.yaml", "--smoke", cwd=user)
    assert r.returncode == 2 and "not valid YAML" in r.stderr and not (user / "out").exists()


@pytest.mark.slow
def test_run_pipeline_file_with_source(user):
    """`sophon-ray run FILE --smoke --source DIR`: pretraining skipped, the imported model is
    protected and audited end to end (Ray Tune; in-process protection to keep it short)."""
    r = cli("import", "pipe.yaml", "--smoke", "--weights", "r18.safetensors", "--new-head", "--out", "src-run", cwd=user)
    assert r.returncode == 0, r.stderr[-800:]
    r = cli("run", "pipe.yaml", "--smoke", "--source", "src-run", "--workers", "0", "--concurrency", "2",
            "--out", "run", cwd=user, timeout=900)
    assert r.returncode == 0, r.stderr[-1500:]
    assert "pretrain: skipped, protecting the given source" in r.stderr
    assert not (user / "run" / "source").exists()
    import json

    audit = json.loads((user / "run" / "audit" / "audit.json").read_text())
    assert set(audit["worst_case"]) == {"protected", "scratch", "original"}
    assert audit["pipeline"] == "mine"


def test_import_diffusers_unet_folder_and_protect(tmp_path):
    """A diffusers UNet2DModel folder (save_pretrained) imports into digits-diffusion and protects
    with --smoke; a folder whose config differs from the pipeline's arch is refused in one line."""
    from sophon_ray import tasks

    cfg = tasks.get_pipeline("digits-diffusion", smoke=True)
    task = tasks.of(cfg)
    torch.manual_seed(3)
    unet = task.new_model(0, 3)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    r = cli("import", "digits-diffusion", "--smoke", "--weights", "unet", "--out", "src", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-800:]
    import sophon_ray

    model, card = sophon_ray.load_model(tmp_path / "src")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), unet.state_dict().values()))
    assert card["kind"] == "diffusion" and card["lineage"]["imported"]["path"] == str(tmp_path / "unet")
    r = cli("protect", "digits-diffusion", "--smoke", "--source", "src", "--local", "--out", "prot", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-800:]
    assert sophon_ray.load_model(tmp_path / "prot")[1]["lineage"]["source"]["sha256"] == card["sha256"]
    other = tasks.of(tasks.get_pipeline("digits-diffusion", smoke=True, overrides=["arch.name=unet-small"])).new_model(0, 0)
    other.save_pretrained(tmp_path / "other", safe_serialization=True)
    r = cli("import", "digits-diffusion", "--smoke", "--weights", "other", "--out", "src2", cwd=tmp_path)
    assert r.returncode == 2 and "config.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1
