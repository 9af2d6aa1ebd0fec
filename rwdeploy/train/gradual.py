"""Gradual hard pruning inside the prune phase (`Recipe.gradual = N`).

Instead of one hard prune after the prune phase, N pruning events are spread over it: event k
(k = 1..N) at step round(k * T / (N + 1)) of the T-step phase prunes to

    rate_k = rate * (1 - (1 - k / N) ** 3)            (Zhu & Gupta's cubic schedule)

of each group set's groups, keeping what earlier events removed (they count towards the rate),
so the last event reaches exactly the target rate and the weights pruned early have the rest
of the phase, with the method still acting, to adapt. Between events the masks hold as in
masked retraining.
"""
from __future__ import annotations

from torch import nn

from rwdeploy.train.groups import GroupSet, Masks
from rwdeploy.train.prune import hard_prune


def gradual_schedule(events: int, total_steps: int) -> dict[int, float]:
    """Step of the prune phase -> fraction of the target rate pruned from that step on."""
    if events < 1:
        return {}
    schedule: dict[int, float] = {}
    for k in range(1, events + 1):
        step = min(int(round(k * total_steps / (events + 1))), max(total_steps - 1, 0))
        schedule[step] = max(schedule.get(step, 0.0), 1.0 - (1.0 - k / events) ** 3)
    return schedule


class GradualPruning:
    """Decides, before each step of the prune phase, whether to prune further and how far."""

    def __init__(self, group_sets: list[GroupSet], events: int, global_rate: float | None = None) -> None:
        self.group_sets, self.events, self.global_rate = group_sets, int(events), global_rate
        self.schedule: dict[int, float] = {}
        self.done: list[tuple[int, float]] = []  # (step, fraction) of the events so far

    def begin(self, steps_per_epoch: int, epochs: int) -> None:
        self.schedule = gradual_schedule(self.events, max(int(steps_per_epoch) * int(epochs), 1))

    def masks_at(self, model: nn.Module, step: int, masks: Masks) -> Masks | None:
        """New masks if `step` is an event (previous `masks` kept), else None."""
        fraction = self.schedule.get(step)
        if fraction is None:
            return None
        params = {n: p.detach() for n, p in model.named_parameters()}
        self.done.append((step, fraction))
        return hard_prune(params, self.group_sets, global_rate=self.global_rate, prior=masks, scale=fraction)
