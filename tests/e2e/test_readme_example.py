"""README's "Protect your own model" runs as written (issue 30 part 3), so the README cannot drift
from the code: its YAML pipeline file verbatim, and its own shell lines (weights, `sophon-ray
import`, `sophon-ray run --source`) with only `--smoke` (the file's own smoke settings) and, for
`run`, in-process protection added to keep it short. The data is generated where the YAML points
(`~/data/mine`: an image folder, `~/data/theirs`: Parquet), 3 classes each, under a temporary HOME.
Real CLI processes, a real Ray (Tune), MLflow on SQLite."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Protect your own model"
CHEAP_RUN = "--smoke --workers 0 --concurrency 2"  # what `run` adds to the README's line


def _section() -> str:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end > 0 else None]


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", _section(), flags=re.S)


def _readme_example() -> tuple[str, str, str, str]:
    """The README's pipeline file (name, text) and its three shell lines: weights, import, run."""
    (yaml_text,) = [b for b in _blocks("yaml") if b.startswith("# my_pipeline.yaml")]
    lines = [ln.split("  #")[0].strip() for b in _blocks("bash") for ln in b.splitlines() if ln.strip()]
    weights = [ln for ln in lines if ln.startswith("python -c")]
    imports = [ln for ln in lines if ln.startswith("sophon-ray import my_pipeline.yaml")]
    runs = [ln for ln in lines if ln.startswith("sophon-ray run my_pipeline.yaml")]
    assert len(weights) == len(imports) == len(runs) == 1, lines
    return yaml_text, weights[0], imports[0], runs[0]


def _image_folder(root: Path, classes: int, per_class: int, seed: int) -> None:
    """ROOT/{train,test}/class<c>/*.png, 12x12 RGB (resized to the YAML's options.size on load)."""
    from PIL import Image

    g = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("test", 2)):
        for c in range(classes):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                x = g.integers(0, 60, (12, 12, 3), dtype=np.uint8)  # (H, W, C)
                x[3 * c : 3 * c + 4, 3 * c : 3 * c + 4] = 230  # class c: a bright square at its own place
                Image.fromarray(x).save(d / f"{i}.png")


def _parquet(root: Path, classes: int, per_class: int, seed: int) -> None:
    """ROOT/train.parquet and ROOT/test.parquet, 32x32 RGB, written with sophon_ray.data.write_parquet."""
    import torch

    from sophon_ray.data import Images, write_parquet

    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", per_class), ("test", 2)):
        y = torch.arange(classes).repeat_interleave(n)
        x = torch.randint(0, 60, (len(y), 32, 32, 3), generator=g, dtype=torch.uint8)  # (N, H, W, C)
        for i, c in enumerate(y.tolist()):
            x[i, :, 8 * c : 8 * c + 8] = 220  # class c: a bright band at its own place
        write_parquet(Images(x, y), root / f"{split}.parquet")


def test_readme_example_extracts():
    """The README still holds the example this file runs (a cheap guard that runs in `make test-fast` too)."""
    yaml_text, weights, imports, runs = _readme_example()
    assert "base: digits" in yaml_text and "~/data/mine" in yaml_text and "~/data/theirs" in yaml_text
    assert "--weights resnet18.pt" in imports and "--source out/my-resnet/source" in runs


@pytest.mark.slow
def test_readme_protect_your_own_model_runs_as_written(tmp_path):
    yaml_text, weights, imports, runs = _readme_example()
    home, work = tmp_path / "home", tmp_path / "work"
    _image_folder(home / "data" / "mine", classes=3, per_class=4, seed=0)
    _parquet(home / "data" / "theirs", classes=3, per_class=4, seed=1)
    work.mkdir()
    (work / "my_pipeline.yaml").write_text(yaml_text)
    env = {**os.environ, "HOME": str(home), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

    def sh(line: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=900)

    r = sh("sophon-ray pipelines --show my_pipeline.yaml --smoke")
    assert r.returncode == 0, r.stderr[-800:]
    assert "#   original: imagefolder at ~/data/mine, all classes" in r.stdout  # not digits' 0-4
    assert "#   restricted.0: parquet at ~/data/theirs, all classes" in r.stdout
    for line in (weights, f"{imports} --smoke"):
        r = sh(line)
        assert r.returncode == 0, f"{line}\n{r.stderr[-1500:]}"
    card = json.loads((work / "out/my-resnet/source/model.json").read_text())
    assert card["num_classes"] == 3 and card["arch"]["name"] == "torchvision:resnet18" and card["sha256"]
    r = sh(f"{runs} {CHEAP_RUN}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pretrain: skipped, protecting the given source" in r.stderr
    audits = list((work / "out").rglob("audit.json"))
    assert len(audits) == 1, audits
    verdict = json.loads(audits[0].read_text())["verdict"]
    assert verdict["status"] in ("passed", "failed", "inconclusive")
