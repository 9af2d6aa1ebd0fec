"""Pruning methods: what happens during the prune phase, before hard pruning.

A method sees the run's group sets and adds a term to the loss; the trainer calls
`begin` once, `before_step` before every optimiser step and `penalty` inside the loss.
Hard pruning and masked retraining are the same for every method, so comparisons differ
only in the method. New methods (e.g. reweighted ADMM) subclass `PruneMethod` and register
with `@register_method("name")`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from rwdeploy.errors import OptionError
from rwdeploy.train.dist import DistContext
from rwdeploy.train.groups import GroupSet, Params
from rwdeploy.train.recipe import Recipe
from rwdeploy.train.regularizer import ReweightedPenalty

METHODS: dict[str, type["PruneMethod"]] = {}


def register_method(name: str) -> Callable[[type["PruneMethod"]], type["PruneMethod"]]:
    def wrap(cls: type["PruneMethod"]) -> type["PruneMethod"]:
        METHODS[name] = cls
        cls.name = name
        return cls

    return wrap


def create_method(name: str, group_sets: list[GroupSet], recipe: Recipe, dist: DistContext) -> "PruneMethod":
    if name not in METHODS:
        raise OptionError(f"--method {name}: unknown method", hint=f"use one of {', '.join(sorted(METHODS))}")
    return METHODS[name](group_sets, recipe, dist)


class PruneMethod:
    name = "base"

    def __init__(self, group_sets: list[GroupSet], recipe: Recipe, dist: DistContext) -> None:
        self.group_sets, self.recipe, self.dist = group_sets, recipe, dist
        self.steps_per_epoch = 1
        self.epochs = 0

    def begin(self, model: nn.Module, steps_per_epoch: int, epochs: int) -> None:
        """Start of the prune phase (also called after a resume, before loading state)."""
        self.steps_per_epoch, self.epochs = max(int(steps_per_epoch), 1), int(epochs)

    def before_step(self, model: nn.Module, step: int) -> None:
        """Called with the step index within the prune phase, before its forward pass."""

    def after_step(self, model: nn.Module, lr: float) -> None:
        """Called after every optimiser step of the prune phase (before masks are re-applied)."""

    def penalty(self, params: Params) -> torch.Tensor | None:
        return None

    def log_fields(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@register_method("magnitude")
class MagnitudePruning(PruneMethod):
    """One-shot magnitude pruning: the prune phase is plain training, then the smallest groups go."""


@register_method("reweighted")
class ReweightedPruning(PruneMethod):
    """Reweighted group penalty (DAC 2021); alpha re-estimated at milestones."""

    def __init__(self, group_sets: list[GroupSet], recipe: Recipe, dist: DistContext) -> None:
        super().__init__(group_sets, recipe, dist)
        cfg = recipe.penalty
        self.reg = ReweightedPenalty(group_sets, recipe.penalty_lambda(), cfg.eps, cfg.squared, bounded=cfg.bounded,
                                     bound_tol=cfg.bound_tol, global_rate=recipe.rate if recipe.global_rate else None)
        self.milestones: set[int] = set()
        self.updates_done = 0

    def begin(self, model: nn.Module, steps_per_epoch: int, epochs: int) -> None:
        super().begin(model, steps_per_epoch, epochs)
        self._model_params = dict(model.named_parameters())
        self.milestones = milestone_steps(self.recipe.penalty.milestones, self.recipe.penalty.updates,
                                          self.steps_per_epoch, self.epochs)

    def before_step(self, model: nn.Module, step: int) -> None:
        if step in self.milestones or not self.reg.alphas:
            params = dict(model.named_parameters())
            alphas = self.reg.update_alphas(params)
            self.dist.broadcast_(alphas)
            if self.reg.designated:  # rank 0's choice, so every rank pushes the same groups
                flags = [d.to(alphas[0].device, torch.float32) for d in self.reg.designated]
                self.dist.broadcast_(flags)
                self.reg.designated = [f.cpu().bool() for f in flags]
            self.updates_done += 1

    def penalty(self, params: Params) -> torch.Tensor | None:
        if not self.group_sets or self.recipe.penalty.proximal:
            return None  # the proximal step applies it instead
        return self.reg(params)

    @torch.no_grad()
    def after_step(self, model: nn.Module, lr: float) -> None:
        if self.recipe.penalty.proximal and self.group_sets:
            self.reg.proximal_(self._model_params, lr)

    def log_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"alpha_updates": self.updates_done}
        if self.reg.bounded and self.reg.designated:
            params = {n: p.detach() for n, p in self._model_params.items()}
            fields["designated_pushed"] = int(sum(int(a.sum()) for a in self.reg.active(params)))
        return fields

    def state_dict(self) -> dict[str, Any]:
        return {"alphas": [a.cpu() for a in self.reg.alphas], "updates_done": self.updates_done,
                "designated": [d.cpu() for d in self.reg.designated],
                "patterns": [gs.state_dict() for gs in self.group_sets if hasattr(gs, "state_dict")]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.dist.device
        self.reg.alphas = [a.to(device) for a in state.get("alphas", [])]
        self.reg.designated = [d.cpu() for d in state.get("designated", [])]
        self.updates_done = int(state.get("updates_done", 0))
        pats = iter(state.get("patterns", []))
        for gs in self.group_sets:
            if hasattr(gs, "load_state_dict"):
                gs.load_state_dict(next(pats))


def milestone_steps(epochs_list: list[int] | None, updates: int, steps_per_epoch: int, epochs: int) -> set[int]:
    """Steps of the prune phase at which alpha is re-estimated: the first step of each listed
    epoch, or `updates` evenly spaced steps (0, T/5, 2T/5, ... for updates=5)."""
    if epochs_list is not None:
        return {int(e) * steps_per_epoch for e in epochs_list}
    total = max(steps_per_epoch * epochs, 1)
    return {int(round(k * total / updates)) for k in range(updates)}
