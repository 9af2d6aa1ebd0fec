"""Which channel classes the removal pass takes out: zero tests plus the structural constraints.

A class is a candidate when its group is not pinned and every producer slice is zero (its
value is a constant that gets folded), or every consumer slice is zero (nobody reads it).
A channel that passes through depthwise convs is judged segment by segment (`Segment`): each
part must be constant (its producers zero, and each depthwise link's rows zero or its source
constant) or read by nothing.
Candidates are then given back until every structural constraint holds: grouped convs lose
the same number of channels in each conv group, every split piece / selected index keeps a
channel, no tensor loses all channels, and values whose channels span several dims (channel
shuffle, attention heads) lose whole rows/columns only, so reshapes stay valid.
"""
from __future__ import annotations

from typing import Any

import torch

from rwdeploy.passes.channel_groups import ChannelAnalysis, ChannelSlice, Segment, SliceRef
from rwdeploy.passes.channel_state import tensors_in, varying_dims


def zero_channels(t: torch.Tensor, s: ChannelSlice) -> list[bool]:
    """For each channel of the slice's group: is the slice all zero?"""
    t = t.detach()
    if s.span is None:
        nonzero = (t != 0).movedim(s.dim, 0).reshape(t.shape[s.dim], -1).any(1).tolist()
        return [not any(nonzero[i] for i in idx) for idx in s.indices]
    out = []
    for idx, (lo, hi) in zip(s.indices, s.span):
        sub = t.narrow(0, lo, hi - lo).index_select(s.dim, torch.tensor(idx, dtype=torch.long))
        out.append(not bool(sub.any()))
    return out


def _all_zero(slices: list[ChannelSlice], state_dict: dict[str, torch.Tensor], size: int) -> list[bool]:
    if not slices:
        return [False] * size
    per_slice = [zero_channels(state_dict[s.tensor], s) for s in slices]
    return [all(z[c] for z in per_slice) for c in range(size)]


def candidates(analysis: ChannelAnalysis, state_dict: dict[str, torch.Tensor]) -> dict[int, str]:
    """Removable classes (root id -> why: "zero producers", "zero consumers", or "zero
    depthwise rows" for a channel whose depthwise outputs are constant and its input unread)."""
    out: dict[int, str] = {}
    for g in analysis.groups:
        if g.pinned:
            continue
        produced = _all_zero(g.slices_with("producer"), state_dict, g.size)
        read = _all_zero(g.slices_with("consumer"), state_dict, g.size)
        for c, root in enumerate(g.classes):
            if root in analysis.segments:
                why = _segments_removable(analysis.segments[root], state_dict)
                if why:
                    out[root] = why
            elif produced[c]:
                out[root] = "zero producers"
            elif read[c]:
                out[root] = "zero consumers"
    return out


def _zero(ref: SliceRef, state_dict: dict[str, torch.Tensor]) -> bool:
    key, dim, idx, span = ref
    t = state_dict[key].detach()
    if span is not None:
        t = t.narrow(0, span[0], span[1] - span[0])
    return not bool(t.index_select(dim, torch.tensor(idx, dtype=torch.long)).any())


def _segments_removable(parts: list[Segment], state_dict: dict[str, torch.Tensor]) -> str | None:
    """Why a channel made of segments can go (None: it cannot): every segment is constant or
    unread. Constant: its producers are zero and each depthwise link into it has zero rows or
    a constant source (the largest such set: a link may loop back into its own segment)."""
    unread = [all(_zero(c, state_dict) for c in p.consumers) for p in parts]
    own = [all(_zero(r, state_dict) for r in p.producers) and bool(p.producers or p.links) for p in parts]
    rows = [[_zero(r, state_dict) for _, r in p.links] for p in parts]
    constant = list(own)
    changed = True
    while changed:
        changed = False
        for i, p in enumerate(parts):
            if constant[i] and not all(z or src < 0 or constant[src] for (src, _), z in zip(p.links, rows[i])):
                constant[i], changed = False, True
    if all(constant):
        return "zero producers"
    if all(unread):
        return "zero consumers"
    if all(c or u for c, u in zip(constant, unread)):
        return "zero depthwise rows"
    return None


def _present(k: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    dim = dim % k.dim()
    if k.shape[dim] == 1:
        return torch.full((size,), bool(k.any()))
    return k.movedim(dim, 0).reshape(k.shape[dim], -1).any(1)


class Selection:
    """The removed classes, with kept masks of every value in the graph."""

    def __init__(self, analysis: ChannelAnalysis, removed: set[int]) -> None:
        self.analysis = analysis
        self.removed = set(removed)
        self._refresh()

    def _refresh(self) -> None:
        self._removed_class = torch.zeros(self.analysis.num_classes, dtype=torch.bool)
        if self.removed:
            self._removed_class[torch.tensor(sorted(self.removed))] = True
        self._cache: dict[str, Any] = {}

    def kept(self, m: torch.Tensor) -> torch.Tensor:
        """Kept mask (same compressed shape as the class map)."""
        if self._removed_class.numel() == 0:
            return torch.ones_like(m, dtype=torch.bool)
        return torch.where(m >= 0, ~self._removed_class[m.clamp(min=0)], torch.ones_like(m, dtype=torch.bool))

    def node_kept(self, name: str) -> Any:
        if name not in self._cache:
            m = self.analysis.class_maps.get(name)
            self._cache[name] = self.kept(m) if isinstance(m, torch.Tensor) else None
        return self._cache[name]

    def present(self, name: str, dim: int, size: int) -> torch.Tensor:
        """For each index along `dim` of a node's value: does it keep any position?"""
        k = self.node_kept(name)
        if k is None:
            return torch.ones(size, dtype=torch.bool)
        return _present(k, dim, size)

    def present_map(self, m: torch.Tensor, dim: int, size: int) -> torch.Tensor:
        """`present` for a class map given directly (an element of a node's tuple of values)."""
        return _present(self.kept(m), dim, size)

    def roots_where(self, m: torch.Tensor, mask: torch.Tensor) -> set[int]:
        return set(m[mask & (m >= 0)].tolist()) & self.removed

    def give_back(self, roots: set[int]) -> bool:
        if not roots:
            return False
        self.removed -= roots
        self._refresh()
        return True


def select(analysis: ChannelAnalysis, removed: set[int]) -> Selection:
    """Shrink `removed` until every structural constraint holds."""
    sel = Selection(analysis, removed)
    for _ in range(100):
        changed = False
        for per_group in analysis.equal_removal:
            changed |= _uniform(sel, per_group)
        for name, dim, lo, hi in analysis.keep_one:
            m = analysis.class_maps[name]
            region = m.narrow(dim, lo, hi - lo) if m.shape[dim] > 1 else m
            k = sel.kept(region)
            if not k.any():
                changed |= sel.give_back({min(sel.roots_where(region, ~k))})
        for m in analysis.class_maps.values():
            for t in tensors_in(m):
                changed |= _whole_rows(sel, t)
        if not changed:
            return sel
    raise RuntimeError("channel selection did not converge")  # a bug, not a user error


def _uniform(sel: Selection, per_group: list[torch.Tensor]) -> bool:
    removed_pos = [(~sel.kept(ids)).nonzero().flatten() for ids in per_group]
    cap = min(min(len(p) for p in removed_pos), min(len(ids) for ids in per_group) - 1)
    extra: set[int] = set()
    for ids, pos in zip(per_group, removed_pos):
        if len(pos) > cap:
            extra |= set(ids[pos[cap:]].tolist())
    return sel.give_back(extra & sel.removed)


def _whole_rows(sel: Selection, m: torch.Tensor) -> bool:
    k = sel.kept(m)
    if k.all():
        return False
    if not k.any():  # a value may never lose all its channels
        return sel.give_back({min(sel.roots_where(m, ~k))})
    dims = varying_dims(m)
    if len(dims) < 2:
        return False
    gone = ~k
    allowed = torch.zeros_like(gone)
    for d in dims:
        others = [o for o in range(m.dim()) if o != d]
        allowed |= gone.all(dim=others, keepdim=True) if others else gone
    return sel.give_back(sel.roots_where(m, gone & ~allowed))
