"""The wheel carries the bundled pipelines (issue 30 part 1): built from a copy of the sources
(`pip wheel --no-deps --no-build-isolation --no-index`, offline, with this venv's setuptools),
it holds every file of `sophon_ray.pipelines.BUNDLED` as data files and no pipeline inside the
package; a plain `pip install` of it into a fresh venv outside the checkout finds and loads every
one, each config identical (same hash) to the checkout's, and its `sophon-ray pipelines` lists
them as the checkout's does; so does a `pip install --target` of it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

from sophon_ray.config import config_hash
from sophon_ray.pipelines import BUNDLED, DATA_DIR, load

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "sophon_ray", "pipelines")  # what the build reads

CHECK = """
import sophon_ray
from sophon_ray.config import config_hash
from sophon_ray.pipelines import PIPELINES, bundled_dir, load
print(sophon_ray.__file__)
print(bundled_dir())
for name in PIPELINES:
    print(name, config_hash(load(name), 16), config_hash(load(name, smoke=True), 16))
"""


def _run(*cmd, cwd: Path, pythonpath: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv sees its own install only
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{cmd}\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}"
    return r.stdout


def test_wheel_ships_and_loads_every_bundled_pipeline(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, src / name)
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", tmp_path / "dist", ".", cwd=src)
    (wheel,) = (tmp_path / "dist").glob("sophon_ray-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    data = [n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n]
    assert sorted(data) == sorted("/".join((*DATA_DIR, f)) for f in BUNDLED.values())
    assert not [n for n in names if n.startswith("sophon_ray/pipelines/") and not n.endswith("/__init__.py")]

    # a plain pip install into a fresh venv outside the checkout; the heavy dependencies (torch, ...)
    # come from this venv's site-packages through a .pth line (not a site dir: its editable
    # finder for the checkout is not loaded)
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    py = venv / "bin" / "python"
    site = Path(_run(py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path).strip())
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    _run(sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    lines = _run(py, "-c", CHECK, cwd=tmp_path).splitlines()
    assert Path(lines[0]).is_relative_to(venv)  # the installed copy, not the checkout
    assert Path(lines[1]) == (venv.joinpath(*DATA_DIR)).resolve()
    want = [f"{n} {config_hash(load(n), 16)} {config_hash(load(n, smoke=True), 16)}" for n in BUNDLED]
    assert lines[2:] == want
    listed = _run(venv / "bin" / "sophon-ray", "pipelines", cwd=tmp_path)
    assert listed == _run(sys.executable, "-m", "sophon_ray.app.cli", "pipelines", cwd=ROOT)

    # pip install --target (benchmarks/gpu_check.sh installs that way on the device machine): the
    # data files land in TARGET/share/..., where the RECORD's ../../share paths do not point
    target = tmp_path / "target"
    _run(sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", target, wheel, cwd=tmp_path)
    lines = _run(py, "-c", CHECK, cwd=tmp_path, pythonpath=target).splitlines()
    assert Path(lines[0]).is_relative_to(target) and Path(lines[1]) == target.joinpath(*DATA_DIR).resolve()
    assert lines[2:] == want
