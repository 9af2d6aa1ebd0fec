"""Analysis: channel dependency groups of a traced model, as data.

A *group* is a set of coupled channels: removing channel `c` of a group means removing, in
every slice of the group, the indices `slice.indices[c]` along `slice.dim` of the state_dict
tensor `slice.tensor`. The analysis walks the graph once, applying to each node the rule of
its op spec (`passes/ops`; recorded output shapes give every value's shape), unions coupled
channel classes, and bundles classes that touch the same tensors into groups. What it
returns, `ChannelAnalysis`, is plain data: the removal pass reads nothing else.
"""
from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from rwdeploy.passes.channel_folding import folded_copy
from rwdeploy.passes.channel_state import AnalysisState, SliceRecord, summarize
from rwdeploy.passes.ops import classify
from rwdeploy.passes.ops.common import opaque, value_users


@dataclass
class ChannelSlice:
    tensor: str  # state_dict key, e.g. "layer1.0.conv1.weight"
    dim: int
    indices: list[list[int]]  # for channel c of the group: indices along dim
    role: str  # "producer" | "consumer" | "follower"
    # grouped convolutions: for channel c, the [start, stop) rows on dim 0 the slice is limited to
    span: list[tuple[int, int]] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"tensor": self.tensor, "dim": self.dim, "role": self.role, "indices": self.indices}
        if self.span is not None:
            d["span"] = [list(s) for s in self.span]
        return d


@dataclass
class ChannelGroup:
    id: int
    size: int  # channels (atomic removable units) in the group
    unit: int  # underlying tensor channels per group channel (GroupNorm group, head width, ...)
    slices: list[ChannelSlice]
    pinned: list[str]  # reasons the group must be kept; empty = removable
    classes: list[int] = field(default_factory=list, repr=False)  # internal class ids per channel

    @property
    def removable(self) -> bool:
        return not self.pinned

    def slices_with(self, role: str) -> list[ChannelSlice]:
        return [s for s in self.slices if s.role == role]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "size": self.size, "unit": self.unit, "pinned": self.pinned,
                "slices": [s.to_dict() for s in self.slices]}


SliceRef = tuple[str, int, list[int], "tuple[int, int] | None"]  # (tensor, dim, indices, row span)


@dataclass
class Segment:
    """A part of one group channel whose value is the sum of its producers: a channel that
    passes through a depthwise convolution has a segment before it and one after (the conv's
    rows produce the second from the first, `links`). Slices are (tensor, dim, indices, span)."""

    producers: list[SliceRef]
    consumers: list[SliceRef]
    links: list[tuple[int, SliceRef]]  # (index of the source segment, the depthwise rows reading it)

    def to_dict(self) -> dict[str, Any]:
        return {"producers": [list(p[:3]) for p in self.producers], "consumers": [list(c[:3]) for c in self.consumers],
                "links": [[i, list(rows[:3])] for i, rows in self.links]}


@dataclass
class ChannelAnalysis:
    """What the analysis found, as plain data: all the removal pass reads (docs/ARCHITECTURE.md).
    Class ids are roots of coupled classes, as in `ChannelGroup.classes`; a class map (see
    `channel_state`) holds one per position, CONST (-1) where a value has no channel."""

    groups: list[ChannelGroup]
    values: dict[str, Any] = field(repr=False)  # node -> its output at the example input (TensorMeta, ...)
    ops: dict[str, str] = field(repr=False)  # node -> the name of its op spec (`ops.SPECS`)
    class_maps: dict[str, Any] = field(repr=False)  # node -> class map(s) of its output
    fold_sites: list[str] = field(repr=False)  # nodes whose weights read channels
    equal_removal: list[list[torch.Tensor]] = field(repr=False)  # grouped convs: classes per conv group
    keep_one: list[tuple[str, int, int, int]] = field(repr=False)  # (node, dim, start, stop) keeps a channel
    attribute_slices: list[SliceRecord] = field(repr=False)  # get_attr tensors cut with an elementwise op
    provenance: dict[str, tuple[str, tuple[int | None, ...]]] = field(repr=False)  # see ops/graph.py
    # group channels that pass through depthwise convs (class id -> its segments); the others
    # are one segment: all of a group channel's producers, all of its consumers
    segments: dict[int, list[Segment]] = field(default_factory=dict, repr=False)
    # layer node -> parameter its computed weight was folded into (`channel_folding`): the
    # analysis read a folded copy of the graph; the removal pass folds its copy the same way
    folded_weights: dict[str, str] = field(default_factory=dict, repr=False)
    num_classes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": [g.to_dict() for g in self.groups],
            "removable_groups": sum(g.removable for g in self.groups),
            "pinned_groups": sum(not g.removable for g in self.groups),
        }


def _resolve(m: Any, roots: torch.Tensor) -> Any:
    if isinstance(m, torch.Tensor):
        return torch.where(m >= 0, roots[m.clamp(min=0)], m)
    if isinstance(m, (tuple, list)):
        return tuple(_resolve(x, roots) for x in m)
    return None


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values[n.name] = summarize(out)
        return out


def record_values(gm: fx.GraphModule, example_input: Any) -> dict[str, Any]:
    """Run the graph once; keep every node's output shape (and small non-tensor values)."""
    rec = _Recorder(gm)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad():
        rec.run(*inputs)
    return rec.values


STRICT_ENV = "RWDEPLOY_STRICT_ANALYSIS"


def analyze_channel_groups(gm: fx.GraphModule, example_input: Any, *, strict: bool | None = None) -> ChannelAnalysis:
    """Channel dependency groups of `gm` (evaluated at `example_input`). Layer weights
    computed from parameters are read as folded parameters (`channel_folding`).

    A rule that raises pins what its op touches, so a model is never broken by an op the
    rules get wrong; `strict` re-raises instead (a rule error is a bug to see, not a pin).
    `strict=None` reads the environment variable RWDEPLOY_STRICT_ANALYSIS=1 (the tests set it).
    """
    if strict is None:
        strict = os.environ.get(STRICT_ENV) == "1"
    gm, folded = folded_copy(gm, example_input)
    st = AnalysisState(gm, record_values(gm, example_input))
    for node in gm.graph.nodes:
        spec = classify(node, st)
        st.ops[node.name] = spec.name
        try:
            st.maps[node.name] = spec.rule(st, node)
        except Exception as exc:  # noqa: BLE001 - a rule that fails keeps channels, never crashes
            if strict:
                raise
            st.ops[node.name] = "opaque"
            st.maps[node.name] = opaque(st, node, f"analysis failed ({type(exc).__name__}: {exc})")
    _pin_shared(st, gm)
    segment_roots = st.uf.roots()  # classes joined by everything but depthwise links
    for link in st.links:
        st.uf.union_pairs(link.source, link.target)
    roots = st.uf.roots()
    return ChannelAnalysis(
        groups=_build_groups(st, roots),
        values=st.values,
        ops=st.ops,
        class_maps={name: _resolve(m, roots) for name, m in st.maps.items()},
        fold_sites=list(st.fold_sites),
        equal_removal=[[_resolve(ids, roots) for ids in per_group] for per_group in st.uniform],
        keep_one=list(st.presence),
        attribute_slices=[SliceRecord(s.key, s.dim, s.role, s.index, _resolve(s.cls, roots), s.span)
                          for s in st.slices if s.key in st.attr_followers],
        provenance=dict(st.provenance),
        segments=_segments(st, roots, segment_roots),
        folded_weights=folded,
        num_classes=len(roots),
    )


def _segments(st: AnalysisState, roots: torch.Tensor, segment_roots: torch.Tensor) -> dict[int, list[Segment]]:
    """The segments of every group channel a depthwise link joined (see `Segment`)."""
    linked = {int(roots[c]) for link in st.links for c in link.target.tolist()}
    if not linked:
        return {}
    parts: dict[int, dict[int, Segment]] = defaultdict(dict)  # root -> segment root -> segment

    def segment(cls: int) -> Segment:
        return parts[int(roots[cls])].setdefault(int(segment_roots[cls]), Segment([], [], []))

    link_keys = {link.key for link in st.links}
    for s in st.slices:
        if s.role == "follower" or (s.role == "producer" and s.key in link_keys):
            continue  # a depthwise conv's rows are the link's, not a producer of the segment
        for pos in (s.cls >= 0).nonzero().flatten().tolist():
            cls = int(s.cls[pos])
            if int(roots[cls]) in linked:
                span = tuple(s.span[pos].tolist()) if s.span is not None else None
                part = segment(cls)
                (part.producers if s.role == "producer" else part.consumers).append(
                    (s.key, s.dim, [int(s.index[pos])], span))
    edges = []
    for link in st.links:
        for src, dst, rows in zip(link.source.tolist(), link.target.tolist(), link.rows):
            segment(dst)
            if src >= 0:
                segment(src)
            edges.append((src, dst, (link.key, 0, rows, None)))
    order = {root: sorted(by_segment) for root, by_segment in parts.items()}
    out = {root: [parts[root][seg] for seg in order[root]] for root in parts}
    for src, dst, rows in edges:  # a constant input (-1): the outputs are constant anyway
        root = int(roots[dst])
        source = order[root].index(int(segment_roots[src])) if src >= 0 else -1
        out[root][order[root].index(int(segment_roots[dst]))].links.append((source, rows))
    return out


def _pin_shared(st: AnalysisState, gm: fx.GraphModule) -> None:
    """A tensor read by several ops: when they are all calls of one layer (a module called
    twice, a parameter read by two convolutions: CoaT's shared position encodings), every
    call reads channel i of the tensor as the same channel, so their classes are joined
    index by index (cutting index i then holds for every call). Otherwise it is kept: cutting
    it for one use would break the other."""
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    reads = Counter()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            reads[n.target] += len(value_users(n))
    by_key: dict[str, list[SliceRecord]] = defaultdict(list)
    for s in st.slices:
        by_key[s.key].append(s)
    for key, records in by_key.items():
        users = st.key_users[key]
        uses = max(len(users), calls[key.rpartition(".")[0]], reads[key])
        if uses <= 1:
            continue
        if uses == len(users) and len({st.ops[u] for u in users}) == 1 and st.layer_users >= users:
            _join_calls(st, records)
            continue
        for s in records:
            st.pin(s.cls, f"{s.key} is used by {uses} ops")


def _join_calls(st: AnalysisState, records: list[SliceRecord]) -> None:
    """Join, index by index, the classes the calls of one shared layer give a tensor's slices."""
    first: dict[tuple[int, str, int], int] = {}  # (dim, role, index) -> class seen first
    for s in records:
        for i, c in zip(s.index.tolist(), s.cls.tolist()):
            if c >= 0:
                seen = first.setdefault((s.dim, s.role, i), c)
                st.uf.union(seen, c)


def _build_groups(st: AnalysisState, roots: torch.Tensor) -> list[ChannelGroup]:
    pins: dict[int, set[str]] = defaultdict(set)
    for c, reasons in st.pins.items():
        pins[int(roots[c])] |= reasons
    # root -> (key, dim, role) -> set of indices; grouped-conv reads also keep their row span
    per_root: dict[int, dict[tuple[str, int, str], set[int]]] = defaultdict(lambda: defaultdict(set))
    spans: dict[tuple[int, str, int, str], set[tuple[int, int]]] = defaultdict(set)
    for s in st.slices:
        keep = s.cls >= 0
        idx, cls = s.index[keep].tolist(), roots[s.cls[keep]].tolist()
        k = (s.key, s.dim, s.role)
        for i, r in zip(idx, cls):
            per_root[r][k].add(i)
        if s.span is not None:
            for r, sp in zip(cls, s.span[keep].tolist()):
                spans[(r, *k)].add(tuple(sp))
    for (r, *_), found in spans.items():
        if len(found) > 1:
            pins[r].add("channel read by several groups of a grouped convolution")
    bundles: dict[tuple, list[int]] = {}
    for r in sorted(per_root):
        sig = (tuple(sorted(per_root[r])), tuple(sorted(pins[r])))
        bundles.setdefault(sig, []).append(r)
    groups = []
    for gid, ((keys, reasons), members) in enumerate(bundles.items()):
        slices = []
        for key, dim, role in keys:
            indices = [sorted(per_root[r][(key, dim, role)]) for r in members]
            span = None
            if (members[0], key, dim, role) in spans:
                span = [min(spans[(r, key, dim, role)]) for r in members]
            slices.append(ChannelSlice(key, dim, indices, role, span))
        slices.sort(key=lambda s: ({"producer": 0, "follower": 1, "consumer": 2}[s.role], s.tensor))
        weights = [s for s in slices if s.role != "follower"] or slices  # followers may be per head
        unit = min(len(s.indices[0]) for s in weights) if weights else 1
        groups.append(ChannelGroup(gid, len(members), unit, slices, list(reasons), members))
    return groups
