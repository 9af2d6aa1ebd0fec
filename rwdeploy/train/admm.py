"""ADMM pruning baseline (Zhang et al., ECCV 2018).

The sparsity constraint W in S (S: the scheme's groups pruned to the rate) is split off into
an auxiliary Z with a scaled dual U:

    W-step:  minimise  loss(W) + rho/2 * ||W - Z + U||^2        (SGD, every step)
    Z-step:  Z <- proj_S(W + U)                                 (keep the largest groups)
    U-step:  U <- U + W - Z

Z and U are updated every `update_every` epochs and rho grows by `rho_factor` per update up
to `rho_max`. Z/U updates are computed on every rank and broadcast from rank 0.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rwdeploy.train.groups import GroupSet, Params
from rwdeploy.train.methods import PruneMethod, register_method
from rwdeploy.train.prune import hard_prune
from rwdeploy.train.dist import DistContext
from rwdeploy.train.recipe import Recipe


@torch.no_grad()
def project(params: Params, group_sets: list[GroupSet], global_rate: float | None = None) -> dict[str, torch.Tensor]:
    """Euclidean projection onto the scheme's sparsity set: zero all but the largest groups."""
    masks = hard_prune(params, group_sets, global_rate=global_rate)
    return {name: params[name] * m.to(params[name].device) for name, m in masks.items()}


@register_method("admm")
class AdmmPruning(PruneMethod):
    def __init__(self, group_sets: list[GroupSet], recipe: Recipe, dist: DistContext) -> None:
        super().__init__(group_sets, recipe, dist)
        self.cfg = recipe.admm
        self.rho = float(self.cfg.rho)
        self.Z: dict[str, torch.Tensor] = {}
        self.U: dict[str, torch.Tensor] = {}
        self.updates_done = 0

    def _global(self) -> float | None:
        return self.recipe.rate if self.recipe.global_rate else None

    @torch.no_grad()
    def before_step(self, model: nn.Module, step: int) -> None:
        every = max(int(self.cfg.update_every), 1) * self.steps_per_epoch
        if self.Z and (step == 0 or step % every):
            return
        params = {n: p.detach() for n, p in model.named_parameters()}
        if not self.Z:  # start: Z = proj(W), U = 0
            self.Z = project(params, self.group_sets, self._global())
            self.U = {n: torch.zeros_like(z) for n, z in self.Z.items()}
        else:
            wu = {n: params[n] + self.U[n] for n in self.Z}
            self.Z = project(wu, self.group_sets, self._global())
            for n in self.U:
                self.U[n] += params[n] - self.Z[n]
            self.rho = min(self.rho * self.cfg.rho_factor, self.cfg.rho_max)
            self.updates_done += 1
        self.dist.broadcast_(list(self.Z.values()) + list(self.U.values()))

    def penalty(self, params: Params) -> torch.Tensor | None:
        if not self.Z:
            return None
        total = sum(((params[n] - self.Z[n] + self.U[n]) ** 2).sum() for n in self.Z)
        return 0.5 * self.rho * total

    def log_fields(self) -> dict[str, Any]:
        return {"rho": self.rho, "admm_updates": self.updates_done}

    def state_dict(self) -> dict[str, Any]:
        return {"rho": self.rho, "updates_done": self.updates_done,
                "Z": {n: z.cpu() for n, z in self.Z.items()}, "U": {n: u.cpu() for n, u in self.U.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.dist.device
        self.rho = float(state.get("rho", self.cfg.rho))
        self.updates_done = int(state.get("updates_done", 0))
        self.Z = {n: z.to(device) for n, z in state.get("Z", {}).items()}
        self.U = {n: u.to(device) for n, u in state.get("U", {}).items()}
