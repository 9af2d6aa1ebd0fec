"""The reweighted group penalty (Zhang et al., DAC 2021).

    R(W) = lambda * sum_g alpha_g * ||W_g||_2,        alpha_g = 1 / (||W_g||_2 + eps)

The weights alpha are constants between milestones: they are re-estimated from the current
weights, without gradient, at each milestone. A group that is already small gets a large
alpha and is driven to zero; a large group is barely touched, so one lambda serves every
layer. `squared=True` uses ||W_g||_F^2 and alpha_g = 1 / (||W_g||_F^2 + eps) instead.

`bounded=True` bounds the penalty by the designated constraint (the pruning rate): at each
milestone the groups the constraint would remove now (the smallest, ranked exactly as hard
pruning ranks them) are designated, and only they are penalised. A designated group whose norm
has fallen to `bound_tol` times the mean norm of the kept groups of its set counts as satisfied
and is no longer pushed; once every designated group is satisfied the constraint holds and
the penalty is zero. Kept groups are never penalised, so lambda no longer trades the accuracy
of the kept weights against the sparsity of the rest.

Two ways to minimise loss + R: add R to the loss (its subgradient joins the SGD step; with
momentum a small group overshoots zero and oscillates around it), or `proximal_` after every
optimiser step: the exact minimiser of R + ||W - W_step||^2 / (2 lr) with alpha fixed, the group
soft threshold W_g <- W_g * max(0, 1 - lr * lambda * alpha_g / ||W_g||) (squared: the shrink
W_g / (1 + 2 lr lambda alpha_g)), which sets groups exactly to zero.
"""
from __future__ import annotations

import torch

from rwdeploy.train.groups import GroupSet, Params


class ReweightedPenalty:
    def __init__(self, group_sets: list[GroupSet], lam: float, eps: float = 1e-3, squared: bool = False,
                 *, bounded: bool = False, bound_tol: float = 1e-2, global_rate: float | None = None) -> None:
        self.group_sets = group_sets
        self.lam, self.eps, self.squared = float(lam), float(eps), bool(squared)
        self.bounded, self.bound_tol, self.global_rate = bool(bounded), float(bound_tol), global_rate
        self.alphas: list[torch.Tensor] = []
        # bounded: per group set, True for the penalty groups the constraint removes
        self.designated: list[torch.Tensor] = []

    def _measure(self, sq: torch.Tensor) -> torch.Tensor:
        # clamp keeps the gradient of sqrt finite for an all-zero group (it is then zero)
        return sq if self.squared else sq.clamp_min(1e-24).sqrt()

    @torch.no_grad()
    def update_alphas(self, params: Params) -> list[torch.Tensor]:
        """Recompute every alpha_g (and, when bounded, the designated groups) from the current
        weights: a milestone."""
        for gs in self.group_sets:
            gs.refresh(params)
        self.alphas = [1.0 / (self._measure(gs.penalty_sq_norms(params).detach()) + self.eps)
                       for gs in self.group_sets]
        if self.bounded:
            self.designated = designated_groups(params, self.group_sets, self.global_rate)
        return self.alphas

    @torch.no_grad()
    def active(self, params: Params) -> list[torch.Tensor]:
        """Per group set, which penalty groups are pushed now (all of them unless bounded)."""
        out = []
        for i, gs in enumerate(self.group_sets):
            norms = gs.penalty_sq_norms(params).clamp_min(0).sqrt()
            if not self.bounded:
                out.append(torch.ones_like(norms, dtype=torch.bool))
                continue
            chosen = self.designated[i].to(norms.device)
            kept = norms[~chosen]
            ref = float(kept.mean()) if kept.numel() else 1.0
            out.append(chosen & (norms > self.bound_tol * ref))
        return out

    def constraint_holds(self, params: Params) -> bool:
        """Bounded: True once no designated group is left to push."""
        return self.bounded and bool(self.designated) and not any(bool(a.any()) for a in self.active(params))

    @torch.no_grad()
    def proximal_(self, params: Params, lr: float) -> None:
        """One proximal step of the penalty with step size `lr`, in place (alpha fixed)."""
        if not self.alphas or (self.bounded and not self.designated):
            raise RuntimeError("update_alphas() must run before the penalty is used")
        active = self.active(params) if self.bounded else [None] * len(self.group_sets)
        for gs, alpha, on in zip(self.group_sets, self.alphas, active):
            norms = gs.penalty_sq_norms(params).clamp_min(0)
            thr = lr * self.lam * alpha.to(norms.device)
            if on is not None:
                thr = thr * on.to(norms.device)
            if self.squared:
                factors = 1.0 / (1.0 + 2.0 * thr)
            else:
                norms = norms.sqrt()
                safe = torch.where(norms > 0, norms, torch.ones_like(norms))
                factors = torch.where(norms > 0, (1.0 - thr / safe).clamp_min(0.0), torch.ones_like(norms))
            gs.scale_penalty_groups_(params, factors)

    def __call__(self, params: Params) -> torch.Tensor:
        if not self.alphas or (self.bounded and not self.designated):
            raise RuntimeError("update_alphas() must run before the penalty is used")
        active = self.active(params) if self.bounded else [None] * len(self.group_sets)
        total = None
        for gs, alpha, on in zip(self.group_sets, self.alphas, active):
            dev = params[gs.tensors[0]].device
            weight = alpha.to(dev) if on is None else alpha.to(dev) * on.to(dev)
            term = (weight * self._measure(gs.penalty_sq_norms(params))).sum()
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(())
        return self.lam * total


@torch.no_grad()
def designated_groups(params: Params, group_sets: list[GroupSet], global_rate: float | None = None) -> list[torch.Tensor]:
    """Per group set, the penalty groups that hard pruning to the rate would remove now."""
    from rwdeploy.train.prune import hard_prune  # prune imports the groups this module uses

    masks = hard_prune(params, group_sets, global_rate=global_rate)
    out = []
    for gs in group_sets:
        kept = gs.sq_norms({t: masks[t].float() if t in masks else torch.ones_like(params[t]) for t in gs.tensors}) > 0
        out.append(gs.penalty_designation(kept.cpu()))
    return out
