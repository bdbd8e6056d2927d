"""The model directory format: `model.safetensors` + `model.json` (the card) + `metrics.json`.

Weights are never pickled. `model.json` records everything needed to rebuild the module and
reproduce the input preprocessing, plus the sha256 of the weights file; `load_model` refuses a
directory whose weights do not match that hash. Directories are written atomically: into a
temporary sibling, renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from sophon_ray.errors import UserError

FORMAT = "sophon-ray/model@1"
WEIGHTS, CARD, METRICS = "model.safetensors", "model.json", "metrics.json"


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cpu_name() -> str:
    """The CPU as /proc/cpuinfo names it ("AMD EPYC, family 26 model 2"); platform's guess elsewhere."""
    import platform

    try:
        info = dict(line.split(":", 1) for line in Path("/proc/cpuinfo").read_text().splitlines()[:30] if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        return f"{info['model name']}, family {info['cpu family']} model {info['model']}"
    except (OSError, KeyError, ValueError):
        return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """What, besides the seeds and the config, decides this process's floating-point results.

    The same seeded run gives bit-identical weights only where these match: torch picks its CPU
    kernels by the CPU's instruction set (`cpu_capability`, capped with the environment variable
    `ATEN_CPU_CAPABILITY`), oneDNN (convolutions) dispatches on its own (`ONEDNN_MAX_CPU_ISA`;
    "native" = not capped), and the thread count splits reductions. Recorded in every model
    card's lineage (docs/results.md: with oneDNN capped at AVX2, an AVX-512 machine made the
    earlier, most likely AVX2-only, machines' digits models bit for bit).
    """
    import platform

    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA") or "native",
        "torch_threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "machine": platform.machine(),
    }


def replace_dir(tmp: Path, out: Path, kind: str = "model") -> None:
    """Move a completed directory `tmp` to `out`, replacing a previous `out` only when it is a
    sophon-ray output of `kind` or was claimed by this process (`outputs.guard`)."""
    from sophon_ray.outputs import fsync_dir, guard

    guard(out, kind)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists() or out.is_symlink():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old.exists() or old.is_symlink():
            os.replace(old, out)  # put the previous output back
        raise
    fsync_dir(out.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists() or old.is_symlink():
        old.unlink()


def save_model_dir(out: str | Path, model: torch.nn.Module, card: dict[str, Any], metrics: dict[str, Any]) -> Path:
    """Write a model directory atomically.

    Args:
        out: destination directory (replaced if it is a sophon-ray model directory or was claimed
            with `outputs.claim`; anything else is refused).
        model: the module whose state_dict is saved (parameters and buffers).
        card: the model.json fields except "format" and "sha256", which are filled in here.
        metrics: the run's final measured metrics.
    Returns:
        The directory path.
    """
    from safetensors.torch import save

    from sophon_ray.outputs import guard, write_synced

    out = Path(out)
    guard(out, "model")  # before the work of writing: refuse a user's folder
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        write_synced(tmp / WEIGHTS, save(state, metadata={"format": FORMAT}))
        full = {"format": FORMAT, **card, "sha256": sha256_file(tmp / WEIGHTS)}
        write_synced(tmp / CARD, (json.dumps(full, indent=2) + "\n").encode())
        write_synced(tmp / METRICS, (json.dumps(metrics, indent=2) + "\n").encode())
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after a rename; removed after a failure
    return out


def lineage_path(source: str | Path) -> str:
    """How a model's lineage names its source: an absolute path for a local directory (so the
    audit finds it from any working directory, e.g. a Ray Tune trial's), a URI unchanged."""
    p = Path(source)
    return str(p.resolve()) if p.is_dir() else str(source)


def read_card(path: str | Path) -> dict[str, Any]:
    """Read and validate `model.json` of a model directory (weights not checked here)."""
    d = Path(path)
    if not (d / CARD).is_file() or not (d / WEIGHTS).is_file():
        raise UserError(f"{d} is not a sophon-ray model directory (needs {CARD} and {WEIGHTS}); pass a directory written by pretrain/protect")
    try:
        card = json.loads((d / CARD).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{d / CARD} is not valid JSON ({e.msg if hasattr(e, 'msg') else e}); re-create the model directory") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise UserError(f"{d / CARD} is not a {FORMAT} card; re-create the model directory with this version")
    for key in ("kind", "arch", "input", "sha256"):
        if key not in card:
            raise UserError(f"{d / CARD} lacks the field {key!r}; re-create the model directory")
    return card


def load_state(path: str | Path, card: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Load the safetensors weights after verifying their sha256 against the card."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(path) / WEIGHTS
    if sha256_file(weights) != card["sha256"]:
        raise UserError(
            f"{weights} does not match the sha256 in {CARD}: the weights were altered or corrupted; "
            "re-download or re-create the model"
        )
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights} cannot be read as safetensors ({e}); re-create the model") from None


def load_model(source: str | Path, build: Callable[[dict[str, Any]], torch.nn.Module]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a local model directory as (module, card); `build(card)` makes the untrained module
    (`sophon_ray.tasks.build_module` picks it by the card's kind). MLflow URIs are resolved to a
    directory by `sophon_ray.tracking.resolve_model` first (`sophon_ray.load_model` does both).

    The sha256 of the weights is checked against the card and a mismatch is refused.
    """
    src = str(source)
    card = read_card(src)
    state = load_state(src, card)
    module = build(card)
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: the card's arch is not the one the weights were made with
        first = (str(e).strip().splitlines() or [""])[-1].strip()[:160]
        raise UserError(f"weights in {src} do not fit the arch its card names ({card['arch'].get('name')}: {first}); "
                        "the card was edited or the directory is corrupt: re-create the model") from None
    if missing or unexpected:
        raise UserError(
            f"weights in {src} do not fit arch {card['arch']['name']} (missing {list(missing)[:3]}, "
            f"unexpected {list(unexpected)[:3]}); re-create the model"
        )
    module.eval()
    return module, card
