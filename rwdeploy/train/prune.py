"""Which weights are prunable, the group sets a run uses, and hard pruning to a rate.

Hard pruning keeps the largest groups. With a per-layer rate, each group set loses exactly
round(rate * groups) groups; with a global rate, the group sets of one scheme are ranked
together (by group norm / sqrt(group size), so layers of different sizes compare fairly) and
exactly round(rate * all their groups) are removed. Groups already zero count as pruned.

`round_to` N (filter and channel sets only): after that allocation, each set's kept count is
rounded up to the next multiple of N (capped at all its groups), the extra groups being the
next-largest by the same score, so every trained channel group has an aligned width. A set
is one channel group of the dependency analysis (its coupled convolutions share the count).
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from rwdeploy.errors import OptionError
from rwdeploy.train.groups import GroupSet, Masks, Params, coupled_groups, tensor_groups
from rwdeploy.train.schemes import COUPLED_SCHEMES, SCHEME_ORDER, SchemeSpec, check_round_to, parse_scheme

PRUNABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Linear)
# Normalisation layers whose per-channel scale joins a filter group (see groups.coupled_groups).
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


@dataclass
class LayerRule:
    """Schemes for the weights whose name (or module name) matches the glob `match`."""

    match: str
    schemes: list[SchemeSpec]

    @classmethod
    def parse(cls, match: str, scheme: str) -> "LayerRule":
        return cls(match, parse_scheme(scheme, where=f"layer rule {match!r}"))

    def matches(self, tensor: str) -> bool:
        module = tensor.rsplit(".", 1)[0]
        return fnmatch.fnmatchcase(tensor, self.match) or fnmatch.fnmatchcase(module, self.match)


@dataclass
class PruneTargets:
    """What a run prunes: the prunable weights, the excluded ones and the group sets."""

    prunable: list[str]
    excluded: list[str]
    group_sets: list[GroupSet]
    skipped: list[dict[str, Any]] = field(default_factory=list)  # scheme/tensor pairs that do not apply

    @property
    def tensors(self) -> list[str]:
        return list(dict.fromkeys(t for g in self.group_sets for t in g.tensors))

    def describe(self) -> dict[str, Any]:
        return {"prunable": self.prunable, "excluded": self.excluded,
                "group_sets": [g.describe() for g in self.group_sets], "skipped": self.skipped}


def prunable_weights(model: nn.Module) -> list[str]:
    """Weights of Conv/Linear layers, in module registration order."""
    return [f"{name}.weight" for name, m in model.named_modules()
            if isinstance(m, PRUNABLE_TYPES) and getattr(m, "weight", None) is not None]


def default_exclusions(model: nn.Module) -> list[str]:
    """The first convolution and the classifier (last Linear): pruning them costs the most
    accuracy for the least saving, so they are left dense unless asked for."""
    names = prunable_weights(model)
    modules = dict(model.named_modules())
    convs = [n for n in names if not isinstance(modules[n.rsplit(".", 1)[0]], nn.Linear)]
    linears = [n for n in names if isinstance(modules[n.rsplit(".", 1)[0]], nn.Linear)]
    out = convs[:1] + linears[-1:]
    return list(dict.fromkeys(out))


def build_prune_targets(model: nn.Module, rules: list[LayerRule], *, default_rate: float,
                        exclude: Iterable[str] | None = None, include: Iterable[str] = (),
                        analysis: Any = None, norm_scales: bool = True, round_to: int = 1) -> PruneTargets:
    """Group sets for `model`: each prunable, non-excluded weight gets the schemes of the first
    rule that matches it; filter/channel schemes use the channel groups of `analysis`, their
    filter groups with the normalisation scales that follow them unless `norm_scales` is False,
    and keep a multiple of `round_to` channels when hard pruned."""
    round_to = check_round_to(round_to)
    prunable = prunable_weights(model)
    excluded = set(default_exclusions(model) if exclude is None else _expand(exclude, prunable))
    excluded -= set(_expand(include, prunable))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    sets: list[GroupSet] = []
    skipped: list[dict[str, Any]] = []
    coupled_rate: dict[str, dict[str, float]] = {s: {} for s in COUPLED_SCHEMES}
    for name in prunable:
        if name in excluded:
            continue
        rule = next((r for r in rules if r.matches(name)), None)
        if rule is None:
            continue
        for spec in rule.schemes:
            rate = default_rate if spec.rate is None else spec.rate
            if spec.name in COUPLED_SCHEMES:
                coupled_rate[spec.name][name] = rate
                continue
            gs = tensor_groups(spec, name, shapes[name], rate)
            if gs is None:
                skipped.append({"tensor": name, "scheme": spec.label, "why": f"does not apply to shape {list(shapes[name])}"})
            else:
                sets.append(gs)
    scales = frozenset(f"{name}.weight" for name, m in model.named_modules()
                       if norm_scales and isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None)
    for scheme, wanted in coupled_rate.items():
        if not wanted:
            continue
        if analysis is None:
            raise OptionError(f"scheme {scheme} needs the channel-dependency analysis",
                              hint="pass the model's example input so its channel groups can be traced")
        role = "producer" if scheme == "filter" else "consumer"
        for group in analysis.groups:
            role_tensors = [s.tensor for s in group.slices if s.role == role and s.tensor in shapes]
            requested = [t for t in role_tensors if t in wanted]
            if not requested:
                continue
            where = f"channel group {group.id} ({', '.join(role_tensors[:4])}{', ...' if len(role_tensors) > 4 else ''})"
            if getattr(group, "pinned", None):
                skipped.append({"group": group.id, "scheme": scheme, "why": f"pinned: {'; '.join(group.pinned)}"})
                continue
            blocked = [t for t in role_tensors if t in excluded or t not in prunable]
            if blocked:
                skipped.append({"group": group.id, "scheme": scheme, "why": f"touches excluded {', '.join(blocked)}"})
                continue
            gs = coupled_groups(group, role, scheme, shapes, wanted[requested[0]], scales)
            if gs is not None:
                gs.label, gs.round_to = where, round_to
                sets.append(gs)
    order = {s: i for i, s in enumerate(SCHEME_ORDER)}
    sets.sort(key=lambda g: order[g.scheme])
    return PruneTargets(prunable, sorted(excluded), sets, skipped)


def _expand(patterns: Iterable[str], names: list[str]) -> list[str]:
    out = []
    for pat in patterns:
        hit = [n for n in names if fnmatch.fnmatchcase(n, pat) or fnmatch.fnmatchcase(n.rsplit(".", 1)[0], pat)]
        if not hit:
            raise OptionError(f"layer pattern {pat!r} matches no prunable weight",
                              hint=f"prunable weights: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
        out += hit
    return out


def _prune_count(rate: float, n: int) -> int:
    return min(int(round(rate * n)), n)


def _aligned_prune_count(pruned: int, n: int, multiple: int) -> int:
    """How many of n groups to prune so that the kept ones (n - pruned, rounded up to a
    multiple of `multiple`, at most n) are a multiple of it."""
    kept = min(-(-(n - pruned) // multiple) * multiple, n)
    return n - kept


def _keep_mask(scores: torch.Tensor, pruned: int) -> torch.Tensor:
    """Keep every group but the `pruned` lowest-scored ones (ties: the earlier index goes)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.sort(scores, stable=True).indices[:pruned]] = False
    return keep


@torch.no_grad()
def hard_prune(params: Params, group_sets: list[GroupSet], *, global_rate: float | None = None,
               prior: Masks | None = None, scale: float = 1.0) -> Masks:
    """Masks (True = keep) that prune each group set to its rate, coarse schemes first.

    With `global_rate`, group sets of the same scheme are pooled and ranked together. `prior`
    masks stay pruned and count towards the rate: a group they remove entirely ranks below every
    other group, so gradual pruning (rising `scale` x rate with the previous masks as `prior`)
    removes exactly round(rate x groups) groups at its last step.

    A set with `round_to` N > 1 keeps a multiple of N groups: the count above, rounded up
    (globally: per set, after the allocation). Rounding up at every gradual step keeps the
    prior within what the last step removes (the kept count only falls as `scale` rises).
    """
    masks: Masks = {k: v.clone() for k, v in (prior or {}).items()}
    for gs in group_sets:
        gs.refresh(params)
    if global_rate is None:
        for gs in group_sets:
            scores = _ranked_scores(gs, params, masks)
            pruned = _aligned_prune_count(_prune_count(gs.rate * scale, gs.num_groups), gs.num_groups, gs.round_to)
            _and_into(masks, gs.masks_from_keep(_keep_mask(scores, pruned)), params)
        return masks
    by_scheme: dict[str, list[GroupSet]] = {}
    for gs in group_sets:
        by_scheme.setdefault(gs.scheme, []).append(gs)
    global_rate = global_rate * scale
    for sets in by_scheme.values():
        scores = torch.cat([_ranked_scores(gs, params, masks) / gs.sizes().clamp_min(1).float().sqrt() for gs in sets])
        keep_all = _keep_mask(scores, _prune_count(global_rate, scores.numel()))
        start = 0
        for gs in sets:
            keep = keep_all[start: start + gs.num_groups]
            if gs.round_to > 1:  # the set's lowest groups in the pooled ranking are its lowest here too
                pruned = _aligned_prune_count(int((~keep).sum()), gs.num_groups, gs.round_to)
                keep = _keep_mask(scores[start: start + gs.num_groups], pruned)
            _and_into(masks, gs.masks_from_keep(keep), params)
            start += gs.num_groups
    return masks


def _ranked_scores(gs: GroupSet, params: Params, masks: Masks) -> torch.Tensor:
    """Group scores for ranking; groups that `masks` already remove entirely score -1."""
    scores = gs.scores(params, masks).cpu()
    if any(t in masks for t in gs.tensors):
        alive = gs.sq_norms({t: masks[t].float() if t in masks else torch.ones_like(params[t]) for t in gs.tensors})
        scores = torch.where(alive.cpu() > 0, scores, torch.full_like(scores, -1.0))
    return scores


def _and_into(masks: Masks, new: Masks, params: Params) -> None:
    for name, m in new.items():
        m = m.to(params[name].device)
        masks[name] = masks[name].to(m.device) & m if name in masks else m


def sparsity(params: Params, names: Iterable[str]) -> float:
    """Fraction of exactly-zero entries over the named tensors."""
    zeros = total = 0
    for n in names:
        p = params[n]
        zeros += int((p == 0).sum())
        total += p.numel()
    return zeros / total if total else 0.0


def layer_sparsity(params: Params, names: Iterable[str]) -> dict[str, float]:
    return {n: float((params[n] == 0).float().mean()) for n in names}


def named_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.named_parameters())


def total_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def kept_params(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


