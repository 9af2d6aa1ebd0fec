"""Reweighted ADMM: ADMM pruning whose Z-step is a reweighted proximal step, not a top-k projection.

Problem: minimise f(W) + lambda * sum_g alpha_g ||W_g||, with the penalty split off onto a copy Z
of the weights (W = Z) and solved in scaled form with dual U:

    W-step   W <- argmin_W f(W) + rho/2 ||W - Z + U||^2          (SGD: `penalty()` is added to the loss)
    Z-step   V = W + U
             alpha_g = 1 / (||Z_g|| + eps)                          (from the previous Z, no gradient)
             Z_g = V_g * max(0, 1 - (lambda / rho) * alpha_g / ||V_g||)   (group soft threshold)
             elementwise (irregular): Z = sign(V) * max(0, |V| - (lambda / rho) * alpha),
             alpha = 1 / (|Z| + eps) -- the same formula with one weight per group
    U-step   U <- U + W - Z
    rho      rho <- min(rho * growth, rho_max) after each Z/U update; U <- U * rho_old / rho_new
             keeps the unscaled dual rho * U unchanged when rho moves.

Groups are `GroupSet`s of the training framework (`rwdeploy.train.groups`): irregular, filter,
channel (coupled across a residual stage), column, kernel, block, pattern. When a tensor belongs
to several group sets (e.g. filter + irregular), their shrinks are applied in sequence, coarse to
fine. Tensors in no group set have no ADMM term. After the ADMM phase the model is hard-pruned
to the target rate and retrained with masks, like every other method.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import torch

from rwdeploy.errors import OptionError


class GroupSetLike(Protocol):
    tensors: tuple[str, ...]
    num_groups: int

    def sq_norms(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor: ...


def reweighted_soft_threshold(v: torch.Tensor, z_prev: torch.Tensor, tau: float, eps: float) -> torch.Tensor:
    """Elementwise Z-step: sign(v) * max(0, |v| - tau / (|z_prev| + eps))."""
    alpha = 1.0 / (z_prev.abs() + eps)
    return torch.sign(v) * torch.clamp(v.abs() - tau * alpha, min=0.0)


def reweighted_group_factors(v_norms: torch.Tensor, z_prev_norms: torch.Tensor, tau: float, eps: float) -> torch.Tensor:
    """Per-group scale of the group Z-step: max(0, 1 - tau * alpha_g / ||V_g||), alpha_g = 1/(||Z_g|| + eps).

    A group with ||V_g|| = 0 gets factor 0 (it is zero either way).
    """
    alpha = 1.0 / (z_prev_norms + eps)
    safe = torch.where(v_norms > 0, v_norms, torch.ones_like(v_norms))
    return torch.where(v_norms > 0, torch.clamp(1.0 - tau * alpha / safe, min=0.0), torch.zeros_like(v_norms))


def broadcast_to_elements(gs: GroupSetLike, per_group: torch.Tensor,
                          shapes: Mapping[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Per tensor of `gs`, the value of the group each element belongs to (0 outside the set).

    Uses only the public `sq_norms`: with w = sqrt(t) at t = 1, d/dt_e sum_g c_g ||w_g||^2 = c_g for
    the group g holding element e, so one backward pass maps any group layout to its elements.
    """
    t = {n: torch.ones(shapes[n], dtype=per_group.dtype, device=per_group.device, requires_grad=True)
         for n in gs.tensors}
    total = (gs.sq_norms({n: v.sqrt() for n, v in t.items()}) * per_group.detach()).sum()
    grads = torch.autograd.grad(total, list(t.values()), allow_unused=True)
    return {n: (torch.zeros(shapes[n], dtype=per_group.dtype, device=per_group.device) if g is None else g)
            for n, g in zip(t, grads)}


class ReweightedADMM:
    """State (Z, U, rho) and updates of reweighted ADMM over the tensors of `group_sets`.

    `params` maps names to the model's parameters (the W of the method). Call `penalty(params)`
    in every training step (add it to the loss), `update(params)` at every ADMM iteration
    (e.g. each epoch): Z-step, U-step, then the rho schedule.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], group_sets: Sequence[GroupSetLike], *, lam: float,
                 rho: float = 1e-3, rho_growth: float = 1.3, rho_max: float = 1.0, eps: float = 1e-3) -> None:
        if lam <= 0 or rho <= 0 or rho_growth < 1 or rho_max < rho or eps <= 0:
            raise OptionError(f"reweighted ADMM settings lambda={lam}, rho={rho}, growth={rho_growth}, "
                              f"rho_max={rho_max}, eps={eps} are invalid",
                              hint="use lambda > 0, 0 < rho <= rho_max, growth >= 1, eps > 0")
        self.group_sets = list(group_sets)
        self.lam, self.rho, self.rho_growth, self.rho_max, self.eps = lam, rho, rho_growth, rho_max, eps
        names = dict.fromkeys(n for gs in self.group_sets for n in gs.tensors)
        missing = [n for n in names if n not in params]
        if missing:
            raise OptionError(f"reweighted ADMM: no parameter named {missing[0]}", hint="group sets must name model parameters")
        self.Z = {n: params[n].detach().clone() for n in names}
        self.U = {n: torch.zeros_like(z) for n, z in self.Z.items()}
        self.iterations = 0

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """rho/2 * sum ||W - Z + U||^2 (differentiable in W)."""
        terms = [((params[n] - self.Z[n] + self.U[n]) ** 2).sum() for n in self.Z]
        return 0.5 * self.rho * torch.stack(terms).sum()

    @torch.no_grad()
    def z_step(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The reweighted proximal step on V = W + U; alpha from the current Z."""
        tau = self.lam / self.rho
        v = {n: params[n].detach() + self.U[n] for n in self.Z}
        shapes = {n: z.shape for n, z in self.Z.items()}
        for gs in self.group_sets:
            v_norms = gs.sq_norms(v).clamp_min(0).sqrt()
            z_norms = gs.sq_norms(self.Z).clamp_min(0).sqrt()
            factors = reweighted_group_factors(v_norms, z_norms, tau, self.eps)
            with torch.enable_grad():
                per_elem = broadcast_to_elements(gs, factors, shapes)
                member = broadcast_to_elements(gs, torch.ones_like(factors), shapes)
            for n in gs.tensors:
                v[n] = v[n] * (per_elem[n] + (1 - member[n]))
        return v

    @torch.no_grad()
    def update(self, params: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Z-step, U-step, rho schedule; returns residuals for the log."""
        new_z = self.z_step(params)
        dual = sum(float(((new_z[n] - self.Z[n]) ** 2).sum()) for n in self.Z) ** 0.5 * self.rho
        self.Z = new_z
        for n in self.Z:
            self.U[n] += params[n].detach() - self.Z[n]
        primal = sum(float(((params[n].detach() - self.Z[n]) ** 2).sum()) for n in self.Z) ** 0.5
        old = self.rho
        self.rho = min(self.rho * self.rho_growth, self.rho_max)
        for n in self.U:
            self.U[n] *= old / self.rho
        self.iterations += 1
        z_zero = sum(int((z == 0).sum()) for z in self.Z.values()) / max(sum(z.numel() for z in self.Z.values()), 1)
        return {"primal_residual": primal, "dual_residual": dual, "rho": self.rho, "z_zero_fraction": z_zero}

    def state_dict(self) -> dict[str, Any]:
        return {"Z": {n: z.clone() for n, z in self.Z.items()}, "U": {n: u.clone() for n, u in self.U.items()},
                "rho": self.rho, "iterations": self.iterations}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.Z = {n: z.clone() for n, z in state["Z"].items()}
        self.U = {n: u.clone() for n, u in state["U"].items()}
        self.rho, self.iterations = float(state["rho"]), int(state["iterations"])


# ---------------------------------------------------------------------------- the prune method
from rwdeploy.train.methods import PruneMethod, register_method  # noqa: E402  (after the math above)


@register_method("rw-admm")
class ReweightedAdmmPruning(PruneMethod):
    """`--method rw-admm`: the prune phase runs reweighted ADMM; hard pruning and masked
    retraining follow as for every method.

    Settings: lambda and eps from the recipe's `penalty`, rho / rho_factor / rho_max /
    update_every from its `admm` section (Z/U updates every `update_every` epochs).
    """

    def __init__(self, group_sets, recipe, dist) -> None:  # type: ignore[no-untyped-def]
        super().__init__(group_sets, recipe, dist)
        self.admm: ReweightedADMM | None = None
        self._pending: dict[str, Any] | None = None
        self.last: dict[str, float] = {}

    def _start(self, model: torch.nn.Module) -> ReweightedADMM:
        cfg, pen = self.recipe.admm, self.recipe.penalty
        params = {n: p.detach() for n, p in model.named_parameters()}
        admm = ReweightedADMM(params, self.group_sets, lam=self.recipe.penalty_lambda(), rho=float(cfg.rho),
                              rho_growth=float(cfg.rho_factor), rho_max=float(cfg.rho_max), eps=float(pen.eps))
        if self._pending is not None:
            admm.load_state_dict({k: v for k, v in self._pending.items()})
            device = next(model.parameters()).device
            admm.Z = {n: z.to(device) for n, z in admm.Z.items()}
            admm.U = {n: u.to(device) for n, u in admm.U.items()}
            self._pending = None
        return admm

    @torch.no_grad()
    def before_step(self, model: torch.nn.Module, step: int) -> None:
        if self.admm is None:
            self.admm = self._start(model)
            if self.admm.iterations == 0:
                return
        every = max(int(self.recipe.admm.update_every), 1) * self.steps_per_epoch
        if step == 0 or step % every:
            return
        params = {n: p.detach() for n, p in model.named_parameters()}
        self.last = self.admm.update(params)
        self.dist.broadcast_(list(self.admm.Z.values()) + list(self.admm.U.values()))

    def penalty(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        return self.admm.penalty(params) if self.admm is not None else None

    def log_fields(self) -> dict[str, Any]:
        if self.admm is None:
            return {}
        return {"rho": self.admm.rho, "admm_updates": self.admm.iterations, **self.last}

    def state_dict(self) -> dict[str, Any]:
        if self.admm is None:
            return {}
        state = self.admm.state_dict()
        return {"Z": {n: z.cpu() for n, z in state["Z"].items()}, "U": {n: u.cpu() for n, u in state["U"].items()},
                "rho": state["rho"], "iterations": state["iterations"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = dict(state) if state else None
        self.admm = None
