"""sophon-ray: make pre-trained models non-fine-tunable (SOPHON) and prove it, on Ray and MLflow."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["load_model"]
__version__ = "0.1.0"


def load_model(source: str | Path) -> tuple[Any, dict[str, Any]]:
    """Load a model directory or an MLflow `models:/` / `runs:/` URI as (torch module, card); the
    weights' sha256 is checked against the card."""
    from sophon_ray.tasks import load_model as load_dir

    if str(source).startswith(("models:/", "runs:/")):
        from sophon_ray.tracking import resolve_model  # lazy: the only mlflow importer

        source = resolve_model(str(source))
    return load_dir(source)
