"""Masked retraining: pruned weights stay exactly zero.

Three things would otherwise revive a pruned weight: its gradient, the optimiser's state
(momentum, Adam moments) and weight decay (which SGD adds to the gradient). The gradient and
the state are masked before every step; weight decay of a zero weight is zero. After the step
the mask is applied once more as a guard; in debug mode the step is first checked to have left
every masked weight exactly zero, so a leak is found rather than hidden.
"""
from __future__ import annotations

import torch
from torch import nn

from rwdeploy.train.groups import Masks


class MaskLeakError(AssertionError):
    """An optimiser step changed a weight that the mask says is pruned."""


class Masker:
    def __init__(self, model: nn.Module, masks: Masks, *, debug: bool = False) -> None:
        params = dict(model.named_parameters())
        unknown = [n for n in masks if n not in params]
        if unknown:
            raise KeyError(f"masks name tensors the model does not have: {unknown[:3]}")
        self.pairs = [(n, params[n], masks[n].to(params[n].device).bool()) for n in masks]
        self.debug = debug

    @property
    def masks(self) -> Masks:
        return {n: m for n, _, m in self.pairs}

    @torch.no_grad()
    def apply_(self) -> None:
        for _, p, m in self.pairs:
            p.mul_(m)

    @torch.no_grad()
    def mask_grads_(self) -> None:
        for _, p, m in self.pairs:
            if p.grad is not None:
                p.grad.mul_(m)

    @torch.no_grad()
    def mask_optimizer_state_(self, optimizer: torch.optim.Optimizer) -> None:
        for _, p, m in self.pairs:
            for value in optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    value.mul_(m)

    @torch.no_grad()
    def check(self, where: str = "") -> None:
        for name, p, m in self.pairs:
            leaked = int((p[~m] != 0).sum())
            if leaked:
                raise MaskLeakError(f"{leaked} pruned weights of {name} are non-zero {where}".strip())

    def after_step(self, where: str = "") -> None:
        if self.debug:
            self.check(where)
        self.apply_()
