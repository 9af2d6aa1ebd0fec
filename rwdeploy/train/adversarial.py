"""Adversarial training and evaluation with PGD in the L-infinity ball (Madry et al., 2018).

The threat model is defined on pixels in [0, 1]: eps = 8/255 means 8 grey levels. The networks
themselves take normalised input (what the data loaders produce and what `compile` deploys), so
the attack runs on `Normalize(mean, std)` followed by the network: normalisation is inside the
attacked model, and the perturbation is measured and clipped in pixel space.

- `pgd_attack`: the attack, on a model that takes [0, 1] pixels.
- `AdversarialTraining`: the training-loop hook; turns a normalised batch into a normalised
  adversarial batch (the loop then computes its usual loss on it).
- `evaluate_robustness`: natural accuracy, PGD accuracy at the training strength, and PGD with
  more steps (a much higher accuracy under the weaker attack than the stronger one, or robust
  accuracy close to natural accuracy, are signs of gradient masking).
- `RobustSelection`: keeps the checkpoint with the best (natural + PGD) / 2.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rwdeploy.errors import OptionError


@dataclass(frozen=True)
class PGDConfig:
    eps: float = 8 / 255
    step: float = 2 / 255
    steps: int = 10
    random_start: bool = True

    def __post_init__(self) -> None:
        if not (0 <= self.eps <= 1) or self.step <= 0 or self.steps < 1:
            raise OptionError(f"PGD settings eps={self.eps}, step={self.step}, steps={self.steps} are invalid",
                              hint="use 0 <= eps <= 1 (pixels in [0, 1]), step > 0, steps >= 1")

    def with_steps(self, steps: int) -> "PGDConfig":
        return PGDConfig(self.eps, self.step, int(steps), self.random_start)

    def to_dict(self) -> dict[str, Any]:
        return {"norm": "linf", "eps": self.eps, "step": self.step, "steps": self.steps,
                "random_start": self.random_start, "space": "pixels in [0, 1]"}


class Normalize(nn.Module):
    """(x - mean) / std per channel; turns a [0, 1] pixel input into the network's input."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean


def with_normalization(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Sequential:
    """A model that takes [0, 1] pixels: `Normalize(mean, std)` then `model` (shared, not copied).

    The wrapper starts in `model`'s mode, so code that saves and restores the wrapper's mode
    leaves `model` as it was.
    """
    wrapped = nn.Sequential(Normalize(mean, std).to(next(model.parameters()).device), model)
    return wrapped.train(model.training)


def pgd_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: PGDConfig = PGDConfig(), *,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Adversarial examples within ||x_adv - x||_inf <= eps and [0, 1], by projected signed-gradient ascent.

    `model` takes pixels in [0, 1]. It runs in eval mode during the attack (restored afterwards)
    so that batch-norm statistics are not updated by attack steps; parameter gradients are not
    touched (only the input's gradient is computed).
    """
    x = x.detach()
    if cfg.random_start:
        noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device, x.dtype)
        delta = (2 * noise - 1) * cfg.eps
    else:
        delta = torch.zeros_like(x)
    delta = (x + delta).clamp(0, 1) - x
    was_training = model.training
    model.eval()
    try:
        for _ in range(cfg.steps):
            delta.requires_grad_(True)
            loss = loss_fn(model(x + delta), y)
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = (delta + cfg.step * grad.sign()).clamp(-cfg.eps, cfg.eps)
                delta = (x + delta).clamp(0, 1) - x
    finally:
        model.train(was_training)
    return (x + delta).detach()


@dataclass
class AdversarialTraining:
    """Training-loop hook: replace each normalised batch by its PGD adversarial counterpart.

    `mean`/`std` are the normalisation the data loader applied; the attack undoes it, perturbs
    pixels, and re-applies it, so the loop and the saved network are unchanged.
    """

    cfg: PGDConfig = field(default_factory=PGDConfig)
    mean: Sequence[float] = (0.0,)
    std: Sequence[float] = (1.0,)
    seed: int = 0

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Under DistributedDataParallel attack the local module: the attack needs no gradient
        # synchronisation, and DDP's reducer must only see the training step's backward.
        model = getattr(model, "module", model)
        pixel_model = with_normalization(model, self.mean, self.std)
        norm = pixel_model[0]
        x_adv = pgd_attack(pixel_model, norm.inverse(x).clamp(0, 1), y, self.cfg, generator=self._generator)
        return norm(x_adv).detach()

    def to_dict(self) -> dict[str, Any]:
        return {"method": "pgd", **self.cfg.to_dict(), "mean": list(self.mean), "std": list(self.std)}


@dataclass
class RobustnessResult:
    natural_acc: float
    pgd_acc: float
    pgd_strong_acc: float | None
    n: int
    cfg: PGDConfig
    strong_steps: int | None

    @property
    def score(self) -> float:
        """The checkpoint-selection criterion: mean of natural and PGD accuracy."""
        return (self.natural_acc + self.pgd_acc) / 2

    @property
    def masking_suspect(self) -> bool:
        """The stronger attack should never do clearly worse than the weaker one."""
        return self.pgd_strong_acc is not None and self.pgd_strong_acc > self.pgd_acc + 0.01

    def to_dict(self) -> dict[str, Any]:
        return {"natural_acc": self.natural_acc, "pgd_acc": self.pgd_acc, "pgd_strong_acc": self.pgd_strong_acc,
                "score": self.score, "selection": "(natural_acc + pgd_acc) / 2", "n": self.n,
                "attack": self.cfg.to_dict(), "strong_steps": self.strong_steps,
                "masking_suspect": self.masking_suspect}


def evaluate_robustness(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                        mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,),
                        cfg: PGDConfig = PGDConfig(), strong_steps: int | None = 50,
                        max_samples: int | None = None, seed: int = 0,
                        all_reduce: Callable[[list[float]], list[float]] | None = None) -> RobustnessResult:
    """Natural, PGD-`cfg.steps` and PGD-`strong_steps` accuracy over normalised `batches`.

    `all_reduce` sums the counts across ranks (each rank evaluates its shard; `max_samples` is
    per rank), so every rank gets the same result and makes the same selection.
    """
    pixel_model = with_normalization(model, mean, std)
    norm = pixel_model[0]
    g = torch.Generator().manual_seed(seed)
    strong = cfg.with_steps(strong_steps) if strong_steps else None
    correct_nat = correct_pgd = correct_strong = n = 0
    was_training = model.training
    pixel_model.eval()
    try:
        for x, y in batches:
            if max_samples is not None and n >= max_samples:
                break
            if max_samples is not None:
                x, y = x[: max_samples - n], y[: max_samples - n]
            keep = y >= 0  # loaders may pad with label -1
            x, y = x[keep], y[keep]
            pixels = norm.inverse(x).clamp(0, 1)
            with torch.no_grad():
                correct_nat += int((pixel_model(pixels).argmax(1) == y).sum())
            adv = pgd_attack(pixel_model, pixels, y, cfg, generator=g)
            with torch.no_grad():
                correct_pgd += int((pixel_model(adv).argmax(1) == y).sum())
            if strong is not None:
                adv = pgd_attack(pixel_model, pixels, y, strong, generator=g)
                with torch.no_grad():
                    correct_strong += int((pixel_model(adv).argmax(1) == y).sum())
            n += int(y.numel())
    finally:
        model.train(was_training)
    if all_reduce is not None:
        correct_nat, correct_pgd, correct_strong, n = (int(v) for v in all_reduce(
            [float(correct_nat), float(correct_pgd), float(correct_strong), float(n)]))
    if n == 0:
        raise OptionError("robustness evaluation got no samples", hint="check the test split")
    return RobustnessResult(correct_nat / n, correct_pgd / n, (correct_strong / n) if strong else None,
                            n, cfg, strong_steps if strong else None)


class RobustSelection:
    """Keep a copy of the state with the highest (natural + PGD) / 2 seen so far."""

    criterion = "(natural_acc + pgd_acc) / 2"

    def __init__(self) -> None:
        self.best: RobustnessResult | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, result: RobustnessResult, model: nn.Module) -> bool:
        if self.best is not None and result.score <= self.best.score:
            return False
        self.best, self.best_epoch = result, epoch
        self.best_state = copy.deepcopy({k: v.detach() for k, v in model.state_dict().items()})
        return True

    def restore(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)
