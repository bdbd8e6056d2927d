"""Reading weights a user brings (`sophon-ray import`): never unpickling anything.

A `.safetensors` file is read with safetensors; a `.pt` / `.pth` / `.bin` file only with
`torch.load(weights_only=True)`, which refuses pickled modules and arbitrary objects. The
state dict is then matched key by key and shape by shape against the module it is for, and the
first mismatch is one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from sophon_ray.errors import UserError

SAFETENSORS = (".safetensors",)
TORCH = (".pt", ".pth", ".bin")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (safetensors, or a weights-only torch state dict, optionally
    under a "state_dict" / "model" key). UserError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    if path.suffix in SAFETENSORS:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} cannot be read as safetensors ({str(e)[:120]}); re-export the weights") from None
    if path.suffix not in TORCH:
        raise UserError(f"{path}: unknown weights format {path.suffix!r}; give a .safetensors file or a torch "
                        "state dict saved with torch.save(model.state_dict(), 'w.pt')")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled modules/objects with an UnpicklingError
        raise UserError(f"{path} is not a weights-only state dict (a pickled module or object is never loaded: "
                        f"{type(e).__name__}); save torch.save(model.state_dict(), ...) or safetensors") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in obj.items()):
        raise UserError(f"{path} does not hold a state dict (name -> tensor); save torch.save(model.state_dict(), ...)")
    return obj


def match(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str,
          skip: Callable[[str], bool] = lambda k: False, hint: Callable[[str], str] = lambda k: "") -> None:
    """UserError naming the first key of `module.state_dict()` that `state` lacks, has extra, or
    holds with another shape (keys where `skip(key)` are left out of the comparison)."""
    want = {k: tuple(v.shape) for k, v in module.state_dict().items() if not skip(k)}
    got = {k: tuple(v.shape) for k, v in state.items() if not skip(k)}
    for k, shape in want.items():
        if k not in got:
            raise UserError(f"{where}: missing weight {k!r} (the arch has it, the file does not){hint(k)}")
        if got[k] != shape:
            raise UserError(f"{where}: {k!r} has shape {list(got[k])} in the file but {list(shape)} in the arch{hint(k)}")
    extra = [k for k in got if k not in want]
    if extra:
        raise UserError(f"{where}: unexpected weight {extra[0]!r} (not in the arch); is --set arch.name right?")
