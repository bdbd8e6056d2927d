"""Ready pipelines: one Python file each with `get_config(smoke=False) -> PipelineConfig`.

The explicit table below is the only registry (no decorators, no discovery). `load` also reads a
user's pipeline from a file: a Python file with the same `get_config(smoke=False)`, or a YAML file
whose fields are `PipelineConfig`'s (optionally `base: <bundled pipeline>` to start from, and
`smoke: {key.path: value}` overrides applied with --smoke); see README "Protect your own model".
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

from sophon_ray.config import CONFIG_CLASSES, PipelineConfig, apply_overrides, merge_dict
from sophon_ray.errors import UserError
from sophon_ray.pipelines import cifar100_celeba, digits, digits_diffusion, imagenette_cifar10, mnist, mnist_to_digits

PIPELINES: dict[str, ModuleType] = {
    "digits": digits,
    "digits-diffusion": digits_diffusion,
    "mnist": mnist,
    "mnist-to-digits": mnist_to_digits,
    "imagenette-cifar10": imagenette_cifar10,
    "cifar100-celeba": cifar100_celeba,
}
FILE_SUFFIXES = (".py", ".yaml", ".yml")


def is_file_ref(ref: str | Path) -> bool:
    """Whether a pipeline argument names a file (a path with a pipeline suffix) rather than a name."""
    return Path(str(ref)).suffix in FILE_SUFFIXES or "/" in str(ref)


def load(ref: str | Path, smoke: bool = False) -> PipelineConfig:
    """The config of a bundled pipeline by name, or of a pipeline file (.py or .yaml)."""
    if not is_file_ref(ref):
        if ref not in PIPELINES:
            raise UserError(f"unknown pipeline {ref!r}; run `sophon-ray pipelines` to list them "
                            f"({', '.join(PIPELINES)}), or pass a pipeline file (.py or .yaml)")
        return PIPELINES[str(ref)].get_config(smoke=smoke)
    path = Path(ref)
    if not path.is_file():
        raise UserError(f"pipeline file {path} not found")
    if path.suffix == ".py":
        return _from_python(path, smoke)
    if path.suffix in (".yaml", ".yml"):
        return _from_yaml(path, smoke)
    raise UserError(f"pipeline file {path}: expected .py or .yaml")


def _from_python(path: Path, smoke: bool) -> PipelineConfig:
    spec = importlib.util.spec_from_file_location(f"sophon_user_pipeline_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)  # the user's own file, run like any script they run
    except Exception as e:
        raise UserError(f"pipeline file {path} failed to load: {type(e).__name__}: {str(e)[:160]}") from None
    if not callable(getattr(module, "get_config", None)):
        raise UserError(f"pipeline file {path} has no get_config(smoke=False) function")
    cfg = module.get_config(smoke=smoke)
    if not isinstance(cfg, PipelineConfig):
        raise UserError(f"pipeline file {path}: get_config returned {type(cfg).__name__}, not a PipelineConfig")
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
