"""The reweighted group penalty (Zhang et al., DAC 2021).

    R(W) = lambda * sum_g alpha_g * ||W_g||_2,        alpha_g = 1 / (||W_g||_2 + eps)

The weights alpha are constants between milestones: they are re-estimated from the current
weights, without gradient, at each milestone. A group that is already small gets a large
alpha and is driven to zero; a large group is barely touched, so one lambda serves every
layer. `squared=True` uses ||W_g||_F^2 and alpha_g = 1 / (||W_g||_F^2 + eps) instead.
"""
from __future__ import annotations

import torch

from rwdeploy.train.groups import GroupSet, Params


class ReweightedPenalty:
    def __init__(self, group_sets: list[GroupSet], lam: float, eps: float = 1e-3, squared: bool = False) -> None:
        self.group_sets = group_sets
        self.lam, self.eps, self.squared = float(lam), float(eps), bool(squared)
        self.alphas: list[torch.Tensor] = []

    def _measure(self, sq: torch.Tensor) -> torch.Tensor:
        # clamp keeps the gradient of sqrt finite for an all-zero group (it is then zero)
        return sq if self.squared else sq.clamp_min(1e-24).sqrt()

    @torch.no_grad()
    def update_alphas(self, params: Params) -> list[torch.Tensor]:
        """Recompute every alpha_g from the current weights (a milestone)."""
        for gs in self.group_sets:
            gs.refresh(params)
        self.alphas = [1.0 / (self._measure(gs.penalty_sq_norms(params).detach()) + self.eps)
                       for gs in self.group_sets]
        return self.alphas

    def __call__(self, params: Params) -> torch.Tensor:
        if not self.alphas:
            raise RuntimeError("update_alphas() must run before the penalty is used")
        total = None
        for gs, alpha in zip(self.group_sets, self.alphas):
            term = (alpha.to(params[gs.tensors[0]].device) * self._measure(gs.penalty_sq_norms(params))).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return self.lam * total
