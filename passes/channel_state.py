"""Book-keeping of the channel analysis: channel classes, their maps over tensors, slices, pins.

A *channel class* is one atomic removable channel. Every tensor value in the graph gets a
*class map*: an int64 tensor with the value's number of dimensions whose entry at a position
is the class that position belongs to (`CONST` for values that do not depend on the input).
Maps are stored compressed: a dimension the class does not vary along has size 1, so a
conv activation `[N, C, H, W]` has the map `[1, C, 1, 1]`. Ops couple classes by union
(an add unifies its operands' classes position by position); producers create fresh ones.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

CONST = -1


@dataclass(frozen=True)
class TensorMeta:
    """What the analysis keeps of a tensor seen while running the graph once."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def summarize(value: Any) -> Any:
    """Replace tensors in a node's output by their TensorMeta (keeps ints, sizes, tuples)."""
    if isinstance(value, torch.Tensor):
        return TensorMeta(tuple(value.shape), value.dtype)
    if isinstance(value, torch.Size):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(summarize(v) for v in value) if not hasattr(value, "_fields") else tuple(
            summarize(v) for v in value
        )
    return value


def has_tensor(meta: Any) -> bool:
    if isinstance(meta, TensorMeta):
        return True
    if isinstance(meta, (tuple, list)) and not isinstance(meta, torch.Size):
        return any(has_tensor(m) for m in meta)
    return False


class UnionFind:
    """Union-find over class ids; the smaller id becomes the root so groups keep creation order."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def make(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n, dtype=torch.long)

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = torch.broadcast_tensors(a, b)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if keep.any():
            pairs = torch.stack([a[keep], b[keep]], 1).unique(dim=0)
            for x, y in pairs.tolist():
                self.union(x, y)

    def union_all(self, ids: torch.Tensor) -> None:
        u = ids[ids >= 0].unique().tolist()
        for x in u[1:]:
            self.union(u[0], x)

    def roots(self) -> torch.Tensor:
        return torch.tensor([self.find(i) for i in range(len(self.parent))], dtype=torch.long)


def compress(m: torch.Tensor) -> torch.Tensor:
    """Shrink to size 1 every dim along which the map does not vary."""
    for d in range(m.dim()):
        if m.shape[d] > 1:
            first = m.narrow(d, 0, 1)
            if torch.equal(m, first.expand_as(m)):
                m = first
    return m.contiguous()


def varying_dims(m: torch.Tensor) -> list[int]:
    return [d for d in range(m.dim()) if m.shape[d] > 1]


def const_map(ndim: int) -> torch.Tensor:
    return torch.full([1] * ndim, CONST, dtype=torch.long)


def along(m: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """The classes along `dim` as a vector of length `size` (the map varies only along dim)."""
    v = m.reshape(-1) if m.numel() > 1 else m.reshape(1)
    return v.expand(size).clone() if v.numel() == 1 else v


@dataclass
class Link:
    """A depthwise convolution passes input channel `source[c]` to its output channel
    `target[c]` through weight rows `rows[c]` of `key`. Both must go together, but the output
    is constant (so removable) when those rows are zero, whatever its input carries."""

    source: torch.Tensor
    target: torch.Tensor
    key: str
    rows: list[list[int]]


@dataclass
class SliceRecord:
    """Positions `index` along `dim` of state_dict tensor `key` belong to classes `cls`."""

    key: str
    dim: int
    role: str  # producer | consumer | follower
    index: torch.Tensor
    cls: torch.Tensor
    span: torch.Tensor | None = None  # [n, 2] row range on dim 0 the slice is limited to


class AnalysisState:
    """Everything the op rules write while walking the graph once."""

    def __init__(self, gm: fx.GraphModule, values: dict[str, Any]) -> None:
        self.gm = gm
        self.modules: dict[str, nn.Module] = dict(gm.named_modules())
        self.values = values
        self.uf = UnionFind()
        self.pins: dict[int, set[str]] = defaultdict(set)
        self.slices: list[SliceRecord] = []
        self.uniform: list[list[torch.Tensor]] = []  # grouped convs: equal removal per conv group
        self.presence: list[tuple[str, int, int, int]] = []  # (node, dim, start, stop) keeps >= 1
        self.maps: dict[str, Any] = {}
        self.ops: dict[str, str] = {}  # node -> name of its op spec
        self.key_users: dict[str, set[str]] = defaultdict(set)
        self.fold_sites: list[str] = []  # nodes whose weights read channels (constants fold here)
        self.attr_followers: set[str] = set()  # get_attr tensors sliced along with an elementwise op
        self.provenance: dict[str, tuple[str, tuple[int | None, ...]]] = {}  # see ops/graph.py
        self.links: list[Link] = []  # depthwise convs: classes joined after the walk (segments)
        self.layer_users: set[str] = set()  # layer nodes that recorded their tensors' slices

    # -- reading the graph -------------------------------------------------------------
    def shape(self, arg: fx.Node) -> tuple[int, ...]:
        return self.values[arg.name].shape

    def module(self, node: fx.Node) -> nn.Module:
        return self.modules[node.target]

    def canon(self, m: torch.Tensor) -> torch.Tensor:
        """The map with every class replaced by its current root (then compressed)."""
        ids = m[m >= 0].unique().tolist()
        if not ids:
            return m
        lut = torch.zeros(ids[-1] + 1, dtype=torch.long)
        lut[ids] = torch.tensor([self.uf.find(i) for i in ids], dtype=torch.long)
        return compress(torch.where(m >= 0, lut[m.clamp(min=0)], m))

    def is_pinned(self, root: int) -> bool:
        return any(self.uf.find(c) == root for c in self.pins)

    # -- writing classes ---------------------------------------------------------------
    def fresh(self, n: int) -> torch.Tensor:
        return self.uf.make(n)

    def pin(self, m: Any, reason: str) -> None:
        for t in _tensors(m):
            for c in t[t >= 0].unique().tolist():
                self.pins[c].add(reason)

    def pinned_fresh(self, meta: Any, reason: str) -> Any:
        """Maps for the outputs of an op the analysis does not understand: one pinned class each."""
        if isinstance(meta, TensorMeta):
            c = self.fresh(1)
            self.pins[int(c)].add(reason)
            return c.reshape([1] * len(meta.shape))
        if isinstance(meta, (tuple, list)) and not isinstance(meta, torch.Size):
            return tuple(self.pinned_fresh(m, reason) for m in meta)
        return None

    def add_slice(self, key: str, dim: int, index: torch.Tensor, cls: torch.Tensor, role: str,
                  user: str, span: torch.Tensor | None = None) -> None:
        self.key_users[key].add(user)
        self.slices.append(SliceRecord(key, dim, role, index.long(), cls.long(), span))


def _tensors(m: Any):
    if isinstance(m, torch.Tensor):
        yield m
    elif isinstance(m, (tuple, list)):
        for x in m:
            yield from _tensors(x)
