"""The outer (FTS / NTR) optimizer of a protection run: Adam over a module's parameters.

It runs the core's functional `inner.Adam` (the same formulas as `torch.optim.Adam`, checked by
`test_outer_adam_matches_torch_optim`) instead of `torch.optim.Adam`, for one reason: the first
`torch.optim.Optimizer` a process builds imports `torch._dynamo` (~1 s on these CPUs, measured in
docs/benchmarks.md), and every Ray Train worker is a fresh process that would pay it before its
first iteration. The state is plain tensors and ints, so it checkpoints with
`torch.save` / `torch.load(weights_only=True)` like the rest.
"""

from __future__ import annotations

from typing import Any

import torch

from sophon_ray.core.inner import Adam


class OuterAdam:
    """Adam over a fixed parameter list; `lr` may be changed between steps (the guard's back-off).

    Args:
        params: the parameters to update (in place).
        lr: the learning rate.
    """

    def __init__(self, params: list[torch.Tensor], lr: float):
        self.params, self.lr = list(params), lr
        self.state = Adam(lr).init(self.params)

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        """One Adam update of `params` with `grads` (same order as `params`)."""
        Adam(self.lr).step_(self.params, list(grads), self.state)

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "t": self.state["t"], "m": [m.clone() for m in self.state["m"]],
                "v": [v.clone() for v in self.state["v"]]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not {"lr", "t", "m", "v"} <= set(state):  # e.g. a torch.optim state dict of an older version
            raise ValueError(f"not an OuterAdam state (keys {sorted(state)})")
        if len(state["m"]) != len(self.params) or len(state["v"]) != len(self.params):
            raise ValueError(f"optimizer state has {len(state['m'])} tensors for {len(self.params)} parameters")
        self.lr, t = float(state["lr"]), int(state["t"])
        self.state = {"t": t, "m": [m.detach().clone().to(p) for m, p in zip(state["m"], self.params)],
                      "v": [v.detach().clone().to(p) for v, p in zip(state["v"], self.params)]}
