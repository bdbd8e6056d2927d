"""The pipeline loader: bundled pipelines by name, and a user's pipeline files.

The bundled pipelines are plain files in the repository's top-level `pipelines/` directory, one
Python file each with `get_config(smoke=False) -> PipelineConfig`: the same format as a user's
own pipeline file, loaded by the same code (`_module`), so each is also a worked example to copy.
`BUNDLED` below is the only registry (no decorators, no discovery). A wheel ships the files as
data files (`<prefix>/share/sophon-ray/pipelines/`, pyproject's `data-files`); `bundled_dir`
finds them there, or beside the package in a checkout / editable install (docs/design.md).

`load` also reads a user's pipeline from a file: a Python file with the same `get_config`, or a
YAML file whose fields are `PipelineConfig`'s (optionally `base: <bundled pipeline>` to start
from, and `smoke: {key.path: value}` overrides applied with --smoke). A domain the YAML file
gives (`original`, each of `restricted`) replaces the base's whole: the fields it leaves out take
`DomainSpec`'s defaults (`config.merge_dict`); see README "Protect your own model".
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from sophon_ray.config import CONFIG_CLASSES, PipelineConfig, apply_overrides, merge_dict
from sophon_ray.errors import UserError

# name -> file in the bundled pipelines directory, in the order `sophon-ray pipelines` lists them
BUNDLED: dict[str, str] = {
    "digits": "digits.py",
    "digits-diffusion": "digits_diffusion.py",
    "mnist": "mnist.py",
    "mnist-to-digits": "mnist_to_digits.py",
    "mnist-to-digits-demo": "mnist_to_digits_demo.py",
    "imagenette-cifar10": "imagenette_cifar10.py",
    "cifar100-celeba": "cifar100_celeba.py",
}
FILE_SUFFIXES = (".py", ".yaml", ".yml")
DATA_DIR = ("share", "sophon-ray", "pipelines")  # where a wheel installs them, under the prefix


@functools.cache
def bundled_dir() -> Path:
    """The directory holding the bundled pipeline files: `pipelines/` beside the package (a
    checkout, an editable install), else the data files of the installed distribution (found
    through its file list: a venv, `--user`, `--prefix`; or beside the package: `--target`)."""
    site = Path(__file__).resolve().parents[2]
    candidates = [site / "pipelines"]
    try:
        files = importlib.metadata.files("sophon-ray") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    candidates += [Path(f.locate()).resolve().parent for f in files
                   if f.name == BUNDLED["digits"] and tuple(f.parts[-4:-1]) == DATA_DIR]
    candidates.append(site.joinpath(*DATA_DIR))  # pip install --target: RECORD's ../../share is off
    for d in candidates:
        if all((d / f).is_file() for f in BUNDLED.values()):
            return d
    raise UserError(f"the bundled pipeline files are missing (looked in {', '.join(map(str, dict.fromkeys(candidates)))}); "
                    "reinstall sophon-ray")


class _Bundled(Mapping):
    """name -> the bundled pipeline's module, each executed from its file on first use."""

    def __init__(self, files: dict[str, str]):
        self._files, self._modules = files, {}

    def __getitem__(self, name: str) -> ModuleType:
        if name not in self._modules:
            path = bundled_dir() / self._files[name]  # KeyError for an unknown name, like a dict
            self._modules[name] = _module(path, f"sophon_ray_pipelines.{path.stem}")
        return self._modules[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)


PIPELINES: Mapping[str, ModuleType] = _Bundled(BUNDLED)


def __getattr__(attr: str) -> ModuleType:
    """`from sophon_ray.pipelines import digits_diffusion`: a bundled pipeline's module by file stem."""
    for name, file in BUNDLED.items():
        if Path(file).stem == attr:
            return PIPELINES[name]
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def is_file_ref(ref: str | Path) -> bool:
    """Whether a pipeline argument names a file (a path with a pipeline suffix) rather than a name."""
    return Path(str(ref)).suffix in FILE_SUFFIXES or "/" in str(ref)


def load(ref: str | Path, smoke: bool = False) -> PipelineConfig:
    """The config of a bundled pipeline by name, or of a pipeline file (.py or .yaml)."""
    if not is_file_ref(ref):
        if ref not in PIPELINES:
            raise UserError(f"unknown pipeline {ref!r}; run `sophon-ray pipelines` to list them "
                            f"({', '.join(PIPELINES)}), or pass a pipeline file (.py or .yaml)")
        return _config(PIPELINES[str(ref)], smoke)
    path = Path(ref)
    if not path.is_file():
        raise UserError(f"pipeline file {path} not found")
    if path.suffix == ".py":
        return _config(_module(path, f"sophon_user_pipeline_{path.stem}"), smoke)
    if path.suffix in (".yaml", ".yml"):
        return _from_yaml(path, smoke)
    raise UserError(f"pipeline file {path}: expected .py or .yaml")


def describe_domains(cfg: PipelineConfig) -> list[str]:
    """One line per domain of a resolved config (`sophon-ray pipelines --show` prints them as YAML
    comments): source, root, which raw labels it keeps, options."""
    lines = []
    for where, d in [("original", cfg.original), *((f"restricted.{i}", r) for i, r in enumerate(cfg.restricted))]:
        classes = "all classes (labels as stored)" if d.classes is None else \
            f"classes {', '.join(map(str, d.classes))} (relabelled 0..{len(d.classes) - 1})"
        root = f" at {d.root}" if d.root else ""
        options = f", options {d.options}" if d.options else ""
        lines.append(f"{where}: {d.source}{root}, {classes}{options}")
    return lines


def _module(path: Path, module_name: str) -> ModuleType:
    """A pipeline file executed as a module (a bundled one or the user's own, run like any script
    they run); it must define get_config(smoke=False)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise UserError(f"pipeline file {path} failed to load: {type(e).__name__}: {str(e)[:160]}") from None
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"pipeline file {path} has no get_config(smoke=False) function")
    return module


def _config(module: ModuleType, smoke: bool) -> PipelineConfig:
    cfg = module.get_config(smoke=smoke)
    if not isinstance(cfg, PipelineConfig):
        raise UserError(f"pipeline file {module.__file__}: get_config returned {type(cfg).__name__}, not a PipelineConfig")
    return cfg


def _from_yaml(path: Path, smoke: bool) -> PipelineConfig:
    import yaml

    try:
        data: Any = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"pipeline file {path} is not valid YAML ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise UserError(f"pipeline file {path}: expected a mapping of pipeline fields (name, kind, input, ...)")
    data = dict(data)
    base, smoke_overrides = data.pop("base", None), data.pop("smoke", None) or {}
    if not isinstance(smoke_overrides, dict):
        raise UserError(f"pipeline file {path}: smoke must be a mapping of key.path: value overrides")
    if base is not None:
        if base not in PIPELINES:
            raise UserError(f"pipeline file {path}: base {base!r} is not a bundled pipeline ({', '.join(PIPELINES)})")
        start = PIPELINES[base].get_config(smoke=smoke)
    else:
        for key in ("name", "description"):
            if not isinstance(data.get(key), str):
                raise UserError(f"pipeline file {path}: {key} (a string) is required")
        cls = CONFIG_CLASSES.get(data.get("kind", "classifier"), PipelineConfig)  # unknown kinds: validate names them
        start = cls(name=data["name"], description=data["description"])
    cfg = merge_dict(start, data)
    if smoke:
        cfg = apply_overrides(cfg, [f"{k}={v!r}" for k, v in smoke_overrides.items()])
    return cfg
