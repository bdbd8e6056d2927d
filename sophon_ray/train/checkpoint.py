"""Protection checkpoint format: weights as safetensors, the rest as a weights-only torch file.

A checkpoint directory holds `model.safetensors` (current weights and buffers) and
`state.pt` (both Adam optimizers' states, the guard's state and last good snapshot, the
iteration counter and the torch RNG state), written with `torch.save` of plain tensors and
numbers (moved to the CPU, so a GPU worker's checkpoint loads anywhere) and read back only with
`torch.load(weights_only=True)`: nothing is ever unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sophon_ray.errors import UserError


def save_checkpoint(prot: Any, directory: Path) -> None:
    """Write `prot` (a core `Protection`) into `directory`."""
    from safetensors.torch import save_file

    state = prot.state_dict()
    weights = {k: v.detach().contiguous().cpu() for k, v in state.pop("model").items()}
    save_file(weights, str(directory / "model.safetensors"))
    state = _to_cpu(state)  # a GPU worker's optimizer and guard tensors: loadable where there is no GPU
    state["rng"] = torch.get_rng_state()
    torch.save(state, directory / "state.pt")


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def load_checkpoint(prot: Any, directory: Path) -> None:
    """Restore `prot` from a directory written by `save_checkpoint`."""
    from safetensors.torch import load_file

    try:
        weights = load_file(str(directory / "model.safetensors"))
        state = torch.load(directory / "state.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # a corrupt checkpoint must not be half-loaded
        raise UserError(f"checkpoint {directory} cannot be read ({e}); delete it or start without --resume") from None
    rng = state.pop("rng")
    try:
        prot.load_state_dict({"model": weights, **state})
    except (KeyError, ValueError, RuntimeError) as e:  # another version's or another config's state
        raise UserError(f"checkpoint {directory} does not fit this protection run ({e}); "
                        "start without --resume") from None
    torch.set_rng_state(rng)
