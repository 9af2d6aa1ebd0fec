"""Groups of weights that are penalised and pruned as units.

A `GroupSet` is one scheme applied to one place in the network: irregular pruning of one
tensor, the filters of one layer, or one channel group of the dependency analysis spanning
every coupled tensor (a residual stage). It answers three questions:

* `sq_norms(params)`: the squared L2 norm of every group (differentiable: the penalty uses it);
* `scores(params, prior)`: how much each group is worth keeping, given weights already pruned;
* `masks_from_keep(keep)`: per tensor, which weights survive when only the `keep` groups do.

Most schemes are an assignment of every weight element to a group id (`IndexGroups`), so one
`index_add` computes all group norms of a tensor. Patterns choose per kernel from a library
and so get their own class.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from rwdeploy.train.schemes import SchemeSpec, pattern_library

Params = Mapping[str, torch.Tensor]
Masks = dict[str, torch.Tensor]


class GroupSet:
    scheme: str
    label: str  # where: "conv2.weight" or "channel group 3"
    tensors: tuple[str, ...]
    num_groups: int
    rate: float
    # Hard pruning keeps a multiple of this many groups (filter/channel sets: `round_to`).
    round_to: int = 1

    def sq_norms(self, params: Params) -> torch.Tensor:
        raise NotImplementedError

    def penalty_sq_norms(self, params: Params) -> torch.Tensor:
        """Squared norms of the groups the penalty acts on (by default the pruning groups)."""
        return self.sq_norms(params)

    def penalty_designation(self, kept: torch.Tensor) -> torch.Tensor:
        """Which penalty groups the constraint removes, given which pruning groups it keeps."""
        return ~kept.bool()

    def scale_penalty_groups_(self, params: Params, factors: torch.Tensor) -> None:
        """Multiply, in place, every element of penalty group g by factors[g] (a proximal step)."""
        raise NotImplementedError

    def sizes(self) -> torch.Tensor:
        raise NotImplementedError

    def masks_from_keep(self, keep: torch.Tensor) -> Masks:
        raise NotImplementedError

    def refresh(self, params: Params) -> None:
        """Re-derive data-dependent structure from the current weights (patterns); default none."""

    @torch.no_grad()
    def scores(self, params: Params, prior: Masks | None = None) -> torch.Tensor:
        if prior:
            params = {t: params[t] * prior[t] if t in prior else params[t] for t in self.tensors}
        return self.sq_norms(params).clamp_min(0).sqrt()

    def describe(self) -> dict[str, Any]:
        out = {"scheme": self.scheme, "where": self.label, "tensors": list(self.tensors),
               "groups": self.num_groups, "rate": self.rate}
        if self.round_to > 1:
            out["round_to"] = self.round_to
        return out


class IndexGroups(GroupSet):
    """Every selected element of each tensor belongs to one group id in [0, num_groups)."""

    def __init__(self, scheme: str, label: str, parts: list[tuple[str, tuple[int, ...], torch.Tensor]],
                 num_groups: int, rate: float) -> None:
        # parts: (tensor name, tensor shape, group id per element, -1 = not in this set)
        self.scheme, self.label, self.rate = scheme, label, rate
        self.num_groups = int(num_groups)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._parts: list[tuple[str, torch.Tensor | None, torch.Tensor]] = []
        for name, shape, gid in parts:
            flat = gid.reshape(-1).long()
            sel = flat >= 0
            pos = None if bool(sel.all()) else sel.nonzero().squeeze(1)
            self._parts.append((name, pos, flat if pos is None else flat[pos]))
            self.shapes[name] = tuple(shape)
        self.tensors = tuple(dict.fromkeys(n for n, _, _ in self._parts))
        self._device_cache: dict[torch.device, list] = {}

    def _parts_on(self, device: torch.device) -> list:
        if device not in self._device_cache:
            self._device_cache[device] = [(n, None if p is None else p.to(device), g.to(device))
                                          for n, p, g in self._parts]
        return self._device_cache[device]

    def sq_norms(self, params: Params) -> torch.Tensor:
        first = params[self._parts[0][0]]
        out = torch.zeros(self.num_groups, dtype=first.dtype, device=first.device)
        for name, pos, gid in self._parts_on(first.device):
            w = params[name].reshape(-1)
            if pos is not None:
                w = w[pos]
            out = out.index_add(0, gid, w * w)
        return out

    @torch.no_grad()
    def scale_penalty_groups_(self, params: Params, factors: torch.Tensor) -> None:
        for name, pos, gid in self._parts_on(params[self._parts[0][0]].device):
            flat = params[name].view(-1)
            f = factors.to(flat.device, flat.dtype)[gid]
            if pos is None:
                flat.mul_(f)
            else:
                flat[pos] = flat[pos] * f

    def sizes(self) -> torch.Tensor:
        out = torch.zeros(self.num_groups, dtype=torch.long)
        for _, _, gid in self._parts:
            out += torch.bincount(gid, minlength=self.num_groups)
        return out

    def masks_from_keep(self, keep: torch.Tensor) -> Masks:
        keep = keep.bool().cpu()
        masks: Masks = {}
        for name, pos, gid in self._parts:
            m = masks.get(name)
            if m is None:
                m = torch.ones(math.prod(self.shapes[name]), dtype=torch.bool)
            if pos is None:
                m = m & keep[gid]
            else:
                m[pos] = m[pos] & keep[gid]
            masks[name] = m
        return {n: m.reshape(self.shapes[n]) for n, m in masks.items()}


# ------------------------------------------------------------------ per-tensor schemes
def _gemm_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """A conv weight [O, I, kh, kw] (or Linear [O, I]) as the O x (I*kh*kw) GEMM matrix."""
    return shape[0], math.prod(shape[1:])


def tensor_group_ids(spec: SchemeSpec, shape: tuple[int, ...]) -> tuple[torch.Tensor, int] | None:
    """Group id of every element of a weight of `shape` under `spec`, or None if it does not apply."""
    shape = tuple(shape)
    numel = math.prod(shape)
    o, k = _gemm_shape(shape)
    rows = torch.arange(o)[:, None]
    cols = torch.arange(k)[None, :]
    if spec.name == "irregular":
        return torch.arange(numel).reshape(shape), numel
    if spec.name == "filter":
        return rows.expand(o, k).reshape(shape), o
    if spec.name == "channel":
        i, per = shape[1], k // shape[1]
        return (cols // per).expand(o, k).reshape(shape), i
    if spec.name == "column":
        return cols.expand(o, k).reshape(shape), k
    if spec.name == "kernel":
        if len(shape) < 3:
            return None
        i, per = shape[1], k // shape[1]
        return (rows * i + cols // per).reshape(shape), o * i
    if spec.name == "block":
        r, c = spec.args
        cblocks = -(-k // c)
        return ((rows // r) * cblocks + cols // c).reshape(shape), (-(-o // r)) * cblocks
    return None


def tensor_groups(spec: SchemeSpec, name: str, shape: tuple[int, ...], rate: float) -> GroupSet | None:
    if spec.name == "pattern":
        if len(shape) == 4 and tuple(shape[2:]) == (3, 3):
            return PatternGroups(name, tuple(shape), rate, spec.args[0] if spec.args else 8)
        return None
    ids = tensor_group_ids(spec, shape)
    if ids is None:
        return None
    gid, n = ids
    return IndexGroups(spec.name, name, [(name, tuple(shape), gid)], n, rate)


class PatternGroups(GroupSet):
    """Each 3x3 kernel keeps the 4 entries of one library pattern (the one holding most of its
    energy); `rate` of the kernels are then removed entirely (connectivity pruning).

    The penalty acts on two kinds of groups per kernel: the entries outside its current
    pattern (pushing the kernel onto the pattern) and the whole kernel (connectivity).
    """

    def __init__(self, name: str, shape: tuple[int, ...], rate: float, library_size: int = 8) -> None:
        self.scheme, self.label, self.rate = "pattern", name, rate
        self.tensors = (name,)
        self.shape = shape
        self.library = pattern_library(library_size)
        self.num_groups = shape[0] * shape[1]
        self.assign = torch.zeros(self.num_groups, dtype=torch.long)

    @torch.no_grad()
    def refresh(self, params: Params) -> None:
        w2 = params[self.label].detach().reshape(-1, 9).float().cpu() ** 2
        self.assign = (w2 @ self.library.float().T).argmax(dim=1)

    def _keep_entries(self, device: torch.device) -> torch.Tensor:
        return self.library.to(device)[self.assign.to(device)]  # [K, 9]

    def sq_norms(self, params: Params) -> torch.Tensor:
        w = params[self.label].reshape(-1, 9)
        return (w * w * self._keep_entries(w.device)).sum(dim=1)

    def penalty_sq_norms(self, params: Params) -> torch.Tensor:
        w2 = params[self.label].reshape(-1, 9) ** 2
        off = (w2 * ~self._keep_entries(w2.device)).sum(dim=1)
        return torch.cat([off, w2.sum(dim=1)])

    def penalty_designation(self, kept: torch.Tensor) -> torch.Tensor:
        # the entries off each kernel's pattern always go; whole kernels go unless kept
        return torch.cat([torch.ones(self.num_groups, dtype=torch.bool), ~kept.bool()])

    @torch.no_grad()
    def scale_penalty_groups_(self, params: Params, factors: torch.Tensor) -> None:
        w = params[self.label].view(-1, 9)
        factors = factors.to(w.device, w.dtype)
        off, whole = factors[: self.num_groups], factors[self.num_groups:]
        keep = self._keep_entries(w.device)
        w.mul_(torch.where(keep, torch.ones_like(w), off[:, None]))  # off-pattern entries
        w.mul_(whole[:, None])  # then the whole kernel

    def sizes(self) -> torch.Tensor:
        return torch.full((self.num_groups,), 4, dtype=torch.long)

    def masks_from_keep(self, keep: torch.Tensor) -> Masks:
        m = self._keep_entries(torch.device("cpu")) & keep.bool().cpu()[:, None]
        return {self.label: m.reshape(self.shape)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"assign": self.assign.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.assign = state["assign"].clone()


# ------------------------------------------------------------------ coupled channel groups
def coupled_groups(group: Any, role: str, scheme: str, shapes: Mapping[str, tuple[int, ...]],
                   rate: float, scales: frozenset[str] = frozenset()) -> IndexGroups | None:
    """The `role` slices ("producer" for filter, "consumer" for channel) of one channel group of
    the dependency analysis, as one set with a group per channel of the analysis group.

    A channel of the analysis group is its atomic unit (a head, a GroupNorm group): its
    `indices[c]` already list every tensor index that belongs to it. A slice's optional `span`
    (grouped convolutions) limits channel c to rows span[c] of dim 0.

    Follower slices of the tensors in `scales` (normalisation scales, e.g. BatchNorm weights)
    join the producer groups: a convolution followed by BatchNorm is scale-invariant, so its
    weight norm alone says nothing about a channel's importance, and shrinking it changes
    nothing; the BN scale does both.
    """
    parts = []
    for sl in group.slices:
        follower_scale = role == "producer" and sl.role == "follower" and sl.tensor in scales
        if (sl.role != role and not follower_scale) or sl.tensor not in shapes:
            continue
        shape = tuple(shapes[sl.tensor])
        gid = torch.full(shape, -1, dtype=torch.long)
        span = getattr(sl, "span", None)
        for c, idx in enumerate(sl.indices):
            idx = [idx] if isinstance(idx, int) else [int(i) for i in (idx.tolist() if hasattr(idx, "tolist") else idx)]
            index: list[Any] = [slice(None)] * len(shape)
            index[sl.dim] = idx
            if span is not None and sl.dim != 0:
                index[0] = slice(int(span[c][0]), int(span[c][1]))
            gid[tuple(index)] = c
        parts.append((sl.tensor, shape, gid))
    if not parts:
        return None
    return IndexGroups(scheme, f"channel group {group.id}", parts, int(group.size), rate)
