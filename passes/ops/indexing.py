"""Ops that take pieces of a value by offsets: split, chunk, unbind, slice, narrow, select, x[...];
and ops that gather or window along positions only (aten.index, Tensor.unfold).

Their classes follow from running the op on the class maps (`shape.rule_shape`). The offsets
they name along a channel dim are what changes: the analysis records that every piece keeps
at least one channel (a piece that lost all would change the number of outputs) and the
removal pass renames the offsets and sizes in kept channels. Both sides of each op are in one
class below, so they read the same arguments the same way.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from rwdeploy.passes.channel_state import AnalysisState
from rwdeploy.passes.ops.common import arg
from rwdeploy.passes.ops.shape import rule_shape
from rwdeploy.passes.ops.spec import ChannelArgs, Match, OpSpec, Shape, register


def _kept(sel: Any, x: fx.Node, shape: Shape, dim: int) -> torch.Tensor | None:
    """The kept indices of `x` along `dim`, None when none went."""
    keep = sel.present(x.name, dim % len(shape), shape[dim % len(shape)])
    return None if keep.all() else keep


def _count(mask: torch.Tensor, stop: int) -> int:
    return int(mask[:stop].sum())


class Range(ChannelArgs):
    """One range [lo, hi) along `dim`: aten.slice(x, dim, start, end, step), narrow(x, dim,
    start, length), select(x, dim, index). It must keep a channel; its bounds become counts of
    kept channels."""

    def __init__(self, kind: str) -> None:
        self.kind = kind  # "slice" | "narrow" | "select"

    def _range(self, node: fx.Node, shape: Shape) -> tuple[int, int, int] | None:
        """(dim, lo, hi), None when the bounds are not literal or the step is not 1."""
        dim = arg(node, 1, "dim", 0) % len(shape)
        if self.kind == "slice":
            lo, hi, _ = slice(arg(node, 2, "start"), arg(node, 3, "end")).indices(shape[dim])
            return (dim, lo, hi) if arg(node, 4, "step", 1) == 1 else None
        if not all(isinstance(v, int) for v in node.args[1:]):
            return None
        lo = arg(node, 2, "start" if self.kind == "narrow" else "index") % shape[dim]
        return dim, lo, lo + (arg(node, 3, "length", 1) if self.kind == "narrow" else 1)

    def record(self, st: AnalysisState, node: fx.Node, x: fx.Node, m: torch.Tensor, shape: Shape) -> bool:
        if m.shape[arg(node, 1, "dim", 0) % len(shape)] == 1:
            return True
        got = self._range(node, shape)
        if got is not None and got[2] > got[1]:
            st.presence.append((x.name, *got))
        return got is not None

    def rewrite(self, node: fx.Node, sel: Any, x: fx.Node, shape: Shape) -> bool:
        dim = arg(node, 1, "dim", 0)
        keep = _kept(sel, x, shape, dim)
        if keep is None:
            return False
        _, lo, hi = self._range(node, shape)
        lo, hi = _count(keep, lo), _count(keep, hi)
        new = {"slice": (lo, hi), "narrow": (lo, hi - lo), "select": (lo,)}[self.kind]
        node.args, node.kwargs = (x, dim, *new), {}
        return True


class Split(ChannelArgs):
    """split(x, sizes, dim) / chunk(x, n, dim) / unbind(x, dim): every piece keeps a channel.
    Split and chunk become `torch.split` at the kept sizes; unbind pieces are single channels,
    so they all stay."""

    def __init__(self, unbind: bool = False) -> None:
        self.unbind = unbind

    def record(self, st: AnalysisState, node: fx.Node, x: fx.Node, m: torch.Tensor, shape: Shape) -> bool:
        dim = arg(node, 1 if self.unbind else 2, "dim", 0) % len(shape)
        if m.shape[dim] == 1:
            return True
        start = 0
        for piece in st.values[node.name]:
            size = 1 if self.unbind else piece.shape[dim]
            st.presence.append((x.name, dim, start, start + size))
            start += size
        return True

    def rewrite(self, node: fx.Node, sel: Any, x: fx.Node, shape: Shape) -> bool:
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(shape)
        keep = None if self.unbind else _kept(sel, x, shape, dim)
        if keep is None:
            return False
        sizes, start = [], 0
        for piece in sel.analysis.values[node.name]:
            sizes.append(int(keep[start:start + piece.shape[dim]].sum()))
            start += piece.shape[dim]
        node.op, node.target = "call_function", torch.split
        node.args, node.kwargs = (x, sizes), {"dim": dim}
        return True


def index_items(idx: Any, ndim: int) -> list[tuple[int | None, Any]] | None:
    """Pair each element of a tensor index with the input dim it addresses (None for `None`)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    consuming = sum(1 for e in idx if e is not None and e is not Ellipsis)
    items: list[tuple[int | None, Any]] = []
    d = 0
    for e in idx:
        if e is None:
            items.append((None, e))
        elif e is Ellipsis:
            d += ndim - consuming
        elif isinstance(e, (int, slice, fx.Node)):  # a node: a tensor of indices gathered along d
            items.append((d, e))
            d += 1
        else:
            return None
    return items


class Index(ChannelArgs):
    """x[ints, slices, None, ..., index tensors] with literal bounds; integer index tensors only
    along dims without channels (a relative-position table read by positions); anything
    else along channels pins."""

    def record(self, st: AnalysisState, node: fx.Node, x: fx.Node, m: torch.Tensor, shape: Shape) -> bool:
        items = index_items(node.args[1], len(shape))
        if items is None:
            return False
        for dim, item in items:
            if isinstance(item, fx.Node):  # integer indices gathered along a dim without channels only
                meta = st.values.get(item.name)
                if getattr(meta, "dtype", None) not in (torch.int64, torch.int32) or m.shape[dim] > 1:
                    return False
                continue
            if dim is None or m.shape[dim] == 1:
                continue
            if isinstance(item, slice):
                if item.step not in (None, 1) or not all(
                        v is None or isinstance(v, int) for v in (item.start, item.stop)):
                    return False
                lo, hi, _ = item.indices(shape[dim])
                if hi > lo:
                    st.presence.append((x.name, dim, lo, hi))
            else:
                i = item % shape[dim]
                st.presence.append((x.name, dim, i, i + 1))
        return True

    def rewrite(self, node: fx.Node, sel: Any, x: fx.Node, shape: Shape) -> bool:
        items = index_items(node.args[1], len(shape))
        if items is None:  # a tensor index: `record` pinned the value, so nothing along it was removed
            return False
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        new, changed, pos = [], False, 0
        for e in idx:
            if e is None or e is Ellipsis:
                new.append(e)
                pos += e is None
                continue
            dim, item = items[pos]
            pos += 1
            keep = sel.present(x.name, dim, shape[dim])
            if keep.all() or isinstance(item, fx.Node):  # `record` allowed gathers along no channels only
                new.append(item)
                continue
            changed = True
            if isinstance(item, int):
                new.append(_count(keep, item % shape[dim]))
            else:
                lo, hi, _ = item.indices(shape[dim])
                new.append(slice(None if item.start is None else _count(keep, lo),
                                 None if item.stop is None else _count(keep, hi)))
        if changed:
            node.args = (x, tuple(new) if isinstance(node.args[1], tuple) else new[0])
        return changed


class AlongPositions(ChannelArgs):
    """An op that addresses some dims of its input and must leave the channel dims alone:
    aten.index(x, [t0, None, ...]) gathers along the dims its tensors index (a relative-position
    table read by positions), x.unfold(dim, size, step) cuts windows along `dim` (HaloNet's
    blocks). Fine where those dims carry no channels, and then nothing needs rewriting."""

    def __init__(self, dims: Any) -> None:
        self.dims = dims  # (state, node) -> the input dims the op addresses, None when not known

    def record(self, st: AnalysisState, node: fx.Node, x: fx.Node, m: torch.Tensor, shape: Shape) -> bool:
        dims = self.dims(st, node)
        return dims is not None and all(m.shape[d % len(shape)] == 1 for d in dims)

    def rewrite(self, node: fx.Node, sel: Any, x: fx.Node, shape: Shape) -> bool:
        return False


def _indexed_dims(st: AnalysisState, node: fx.Node) -> list[int] | None:
    """The dims integer index tensors gather along; None for a boolean mask (it spans dims)."""
    indices = node.args[1]
    if any(t is not None and getattr(st.values.get(t.name), "dtype", None) not in (torch.int64, torch.int32)
           for t in indices):
        return None
    return [d for d, t in enumerate(indices) if t is not None]


def _unfolded_dim(st: AnalysisState, node: fx.Node) -> list[int] | None:
    dim = arg(node, 1, "dimension")
    return [dim] if isinstance(dim, int) else None


register(
    OpSpec("slice", Match(aten=("slice",)), rule_shape, Range("slice")),
    OpSpec("split", Match(functions=(torch.split,), methods=("split",), aten=("split", "split_with_sizes")),
           rule_shape, Split()),
    OpSpec("chunk", Match(functions=(torch.chunk,), methods=("chunk",), aten=("chunk",)), rule_shape, Split()),
    OpSpec("unbind", Match(functions=(torch.unbind,), methods=("unbind",), aten=("unbind",)), rule_shape,
           Split(unbind=True)),
    OpSpec("narrow", Match(functions=(torch.narrow,), methods=("narrow",), aten=("narrow",)), rule_shape,
           Range("narrow")),
    OpSpec("select", Match(functions=(torch.select,), methods=("select",), aten=("select",)), rule_shape,
           Range("select")),
    OpSpec("getitem", Match(functions=(operator.getitem,)), rule_shape, Index()),
    OpSpec("index", Match(aten=("index",)), rule_shape, AlongPositions(_indexed_dims)),
    OpSpec("unfold", Match(methods=("unfold",), aten=("unfold",)), rule_shape, AlongPositions(_unfolded_dim)),
)
