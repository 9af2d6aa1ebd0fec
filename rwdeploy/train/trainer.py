"""The training loop shared by every phase: dense pre-training, the prune phase (the method's
penalty in the loss) and masked retraining.

Extension points (`TrainHooks`):
  * `perturb(model, x, y) -> x`: replaces the inputs before the forward pass (adversarial
    training generates its examples here);
  * `loss(model, logits, y) -> loss`: the data loss (default cross-entropy);
  * `on_epoch_end(record)`: sees every epoch's log record.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from rwdeploy.data import BatchLoader
from rwdeploy.train.dist import DistContext
from rwdeploy.train.gradual import GradualPruning
from rwdeploy.train.groups import Masks
from rwdeploy.train.masking import Masker
from rwdeploy.train.methods import PruneMethod
from rwdeploy.train.recipe import PhaseConfig


def cross_entropy(model: nn.Module, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, ignore_index=-1)


@dataclass
class TrainHooks:
    perturb: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy
    on_epoch_end: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)


def make_optimizer(model: nn.Module, cfg: PhaseConfig) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters (1-D), the usual practice.
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, dist: DistContext) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole split, summed across ranks."""
    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    for x, y in loader:
        logits = model(x)
        valid = y >= 0
        loss_sum += float(F.cross_entropy(logits[valid], y[valid], reduction="sum")) if valid.any() else 0.0
        correct += float((logits.argmax(1) == y)[valid].sum())
        count += float(valid.sum())
    loss_sum, correct, count = dist.all_reduce_sum([loss_sum, correct, count])
    model.train(was_training)
    return loss_sum / max(count, 1.0), correct / max(count, 1.0)


class EpochRunner:
    """Runs epochs of one phase: forward, loss + method penalty, backward, masked step.

    With a `pruner` (gradual pruning), the masks can grow before any step of the phase;
    `masks_changed` then sees the new masks.
    """

    def __init__(self, model: nn.Module, ddp_model: nn.Module, optimizer: torch.optim.Optimizer,
                 loader: BatchLoader, dist: DistContext, hooks: TrainHooks, *,
                 method: PruneMethod | None = None, masker: Masker | None = None,
                 pruner: GradualPruning | None = None, masks_changed: Callable[[Masks], None] | None = None) -> None:
        self.model, self.ddp_model, self.optimizer = model, ddp_model, optimizer
        self.loader, self.dist, self.hooks = loader, dist, hooks
        self.method, self.masker = method, masker
        self.pruner, self.masks_changed = pruner, masks_changed
        if masker is not None:
            masker.mask_optimizer_state_(optimizer)

    def _prune_further(self, step: int) -> None:
        masks = self.pruner.masks_at(self.model, step, self.masker.masks if self.masker else {})
        if masks is None:
            return
        self.dist.broadcast_([masks[n] for n in sorted(masks)])
        self.masker = Masker(self.model, masks)
        self.masker.apply_()
        self.masker.mask_optimizer_state_(self.optimizer)
        if self.masks_changed is not None:
            self.masks_changed(masks)

    def run_epoch(self, epoch: int, phase_epoch: int, lr: float, on_batch: Callable[[dict[str, float]], None] | None = None) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.loader.set_epoch(epoch)
        self.ddp_model.train()
        steps = len(self.loader)
        loss_sum = pen_sum = correct = count = 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        for i, (x, y) in enumerate(self.loader):
            step = phase_epoch * steps + i
            if self.pruner is not None:
                self._prune_further(step)
            if self.method is not None:
                self.method.before_step(self.model, step)
            if self.hooks.perturb is not None:
                x = self.hooks.perturb(self.ddp_model, x, y)
            logits = self.ddp_model(x)
            loss = self.hooks.loss(self.ddp_model, logits, y)
            total = loss
            if self.method is not None:
                pen = self.method.penalty(dict(self.model.named_parameters()))
                if pen is not None:
                    total = total + pen
                    pen_sum += float(pen.detach())
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            if self.masker is not None:
                self.masker.mask_grads_()
                self.masker.mask_optimizer_state_(self.optimizer)
            self.optimizer.step()
            if self.method is not None:
                self.method.after_step(self.model, float(self.optimizer.param_groups[0]["lr"]))
            if self.masker is not None:
                self.masker.after_step(f"after step {i} of epoch {epoch}")
            valid = y >= 0
            loss_sum += float(loss.detach()) * float(valid.sum())
            correct += float((logits.detach().argmax(1) == y)[valid].sum())
            count += float(valid.sum())
            if on_batch is not None:
                on_batch({"loss": loss_sum / max(count, 1), "acc": correct / max(count, 1)})
        loss_sum, pen_sum, correct, count = self.dist.all_reduce_sum([loss_sum, pen_sum, correct, count])
        return {"loss": loss_sum / max(count, 1.0), "penalty": pen_sum / max(steps * self.dist.world_size, 1),
                "train_acc": correct / max(count, 1.0), "steps": steps, "time_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - c0}
