"""Ready pipelines: one Python file each with `get_config(smoke=False) -> PipelineConfig`.

The explicit table below is the only registry (no decorators, no discovery).
"""

from __future__ import annotations

from types import ModuleType

from pipelines import digits

PIPELINES: dict[str, ModuleType] = {
    "digits": digits,
}
