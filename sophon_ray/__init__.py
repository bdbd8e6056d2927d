"""sophon-ray: make pre-trained models non-fine-tunable (SOPHON) and prove it, on Ray and MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["audit", "import_model", "load_model", "pipeline", "pretrain", "protect", "run"]
__version__ = "0.1.0"
_API = ("audit", "import_model", "pipeline", "pretrain", "protect", "run")


def __getattr__(name: str) -> Any:
    """The Python API (`sophon_ray.app.api`), imported on first use: `sophon_ray.protect(...)`."""
    if name in _API:
        from sophon_ray.app import api

        return getattr(api, name)
    raise AttributeError(f"module 'sophon_ray' has no attribute {name!r}")


def load_model(source: str | Path) -> tuple[Any, dict[str, Any]]:
    """Load a model directory or an MLflow `models:/` / `runs:/` URI as (torch module, card); the
    weights' sha256 is checked against the card."""
    from sophon_ray.tasks import load_model as load_dir

    if str(source).startswith(("models:/", "runs:/")):
        from sophon_ray.tracking import resolve_model  # lazy: the only mlflow importer

        source = resolve_model(str(source))
    return load_dir(source)
