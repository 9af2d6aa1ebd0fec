"""Shape ops: they only move elements, so the analysis runs the op itself on the class maps.

`view(b, heads, c // heads, n)` of a [b, c, n] map yields a map whose classes vary along
heads and head width: removing a channel then means removing whole rows of that view (see
`channel_selection`). Sizes that name channel dims (`view`, `reshape`, `expand`,
`unflatten`) are rewritten to the kept counts; reads of a channel dim's size keep answering
the original size, because arithmetic on it (an attention scale) is part of the function.
Offsets into channels (split, slice, index) are in `ops/indexing.py`.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from rwdeploy.passes.channel_state import AnalysisState, TensorMeta, compress, has_tensor
from rwdeploy.passes.ops.common import opaque
from rwdeploy.passes.ops.spec import SPECS, ChannelArgs, Match, OpSpec, Shape, base_name, register


def rule_shape(st: AnalysisState, node: fx.Node) -> Any:
    """Apply the op to the class maps; its channel arguments record what pieces must keep."""
    args, kwargs = _materialize(st, node.args), _materialize(st, node.kwargs)
    try:
        if node.op == "call_method":
            name = "reshape" if node.target == "view" else node.target  # class maps are expanded views
            result = getattr(args[0], name)(*args[1:], **kwargs)
        elif node.op == "call_module":
            result = st.module(node)(*args, **kwargs)
        elif base_name(node) in ("view", "unsafe_view"):
            result = torch.reshape(*args, **kwargs)
        else:
            result = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - an op the int maps cannot follow is not understood
        return opaque(st, node, "shape op the analysis could not follow")
    if not _matches(result, st.values[node.name]):
        return opaque(st, node, "shape op the analysis could not follow")
    channel_args, x = SPECS[st.ops[node.name]].channel_args, node.args[0] if node.args else None
    m = st.maps.get(x.name) if isinstance(x, fx.Node) else None
    if channel_args and isinstance(m, torch.Tensor) and not channel_args.record(st, node, x, m, st.shape(x)):
        return opaque(st, node, "indexing along channels in a way the pass cannot rewrite")
    return _compress_all(result)


def _materialize(st: AnalysisState, a: Any) -> Any:
    if isinstance(a, fx.Node):
        meta, m = st.values.get(a.name), st.maps.get(a.name)
        if isinstance(meta, TensorMeta):
            return m.expand(meta.shape)
        if isinstance(meta, (tuple, list)) and not isinstance(meta, torch.Size) and has_tensor(meta):
            return tuple(mm.expand(mt.shape) if isinstance(mt, TensorMeta) else mt for mm, mt in zip(m, meta))
        return meta
    if isinstance(a, (tuple, list)):
        return type(a)(_materialize(st, x) for x in a)
    if isinstance(a, dict):
        return {k: _materialize(st, v) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_materialize(st, a.start), _materialize(st, a.stop), _materialize(st, a.step))
    return a


def _matches(result: Any, meta: Any) -> bool:
    if isinstance(meta, TensorMeta):
        return isinstance(result, torch.Tensor) and tuple(result.shape) == meta.shape
    if isinstance(meta, (tuple, list)):
        return isinstance(result, (tuple, list)) and len(result) == len(meta) and all(
            _matches(r, m) for r, m in zip(result, meta))
    return not isinstance(result, torch.Tensor)


def _compress_all(result: Any) -> Any:
    if isinstance(result, torch.Tensor):
        return compress(result)
    if isinstance(result, (tuple, list)):
        return tuple(_compress_all(r) for r in result)
    return None


class Sizes(ChannelArgs):
    """view / reshape / expand (x, *sizes): channel dims get literal kept sizes."""

    def rewrite(self, node: fx.Node, sel: Any, x: fx.Node, shape: Shape) -> bool:
        out = sel.analysis.values[node.name].shape
        sizes = list(node.args[1:])
        packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list, fx.Node))
        if not sizes:
            sizes = [node.kwargs.get("shape", node.kwargs.get("size"))]
            packed = True
        seq = sizes[0] if packed else sizes
        # Channel dims get literal sizes: a size computed at run time may come from another tensor
        # whose channels changed (e.g. `c // heads` with c read from the residual stream).
        m = sel.analysis.class_maps.get(node.name)
        channel_dims = [d for d in range(len(out)) if isinstance(m, torch.Tensor) and m.shape[d] > 1]
        new_sizes = {d: int(sel.present(node.name, d, out[d]).sum()) for d in channel_dims}
        if isinstance(seq, fx.Node):
            if all(new_sizes[d] == out[d] for d in channel_dims):
                return False
            with node.graph.inserting_before(node):  # a torch.Size computed at run time: index it
                seq = [node.graph.call_function(operator.getitem, (seq, d)) for d in range(len(out))]
        seq = list(seq)
        changed = False
        for d, n in new_sizes.items():
            if not (isinstance(seq[d], int) and (seq[d] == -1 or seq[d] == n)):
                seq[d], changed = n, True
        if not changed:
            return False
        node.args = (x,) + ((tuple(seq),) if packed else tuple(seq))
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("shape", "size")}
        return True


class Unflatten(ChannelArgs):
    """x.unflatten(dim, sizes): the sizes of channel dims become the kept counts."""

    def rewrite(self, node: fx.Node, sel: Any, x: fx.Node, shape: Shape) -> bool:
        out = sel.analysis.values[node.name].shape
        dim = node.args[1] % len(shape)
        sizes = list(node.args[2])
        changed = False
        for i in range(len(sizes)):
            n = int(sel.present(node.name, dim + i, out[dim + i]).sum())
            if n != out[dim + i] and sizes[i] != -1:
                sizes[i], changed = n, True
        if changed:
            node.args = (x, node.args[1], tuple(sizes))
        return changed


def frozen_size(t: torch.Tensor, fixed: tuple[tuple[int, int], ...]) -> torch.Size:
    """`t.shape` with the channel dims reported at their size in the original model."""
    size = list(t.shape)
    for d, n in fixed:
        size[d] = n
    return torch.Size(size)


class SizeReads(ChannelArgs):
    """`x.size()`, `x.size(d)`, `x.shape` of a value that lost channels keep the original sizes."""

    def rewrite(self, node: fx.Node, sel: Any, x: fx.Node, shape: Shape) -> bool:
        is_size = node.op == "call_method" and node.target == "size"
        is_shape = node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)
        if not (is_size or is_shape):
            return False
        fixed = tuple((d, shape[d]) for d in range(len(shape)) if not sel.present(x.name, d, shape[d]).all())
        if not fixed:
            return False
        dim = node.args[1] if is_size and len(node.args) > 1 else node.kwargs.get("dim") if is_size else None
        if dim is not None:
            original = shape[dim % len(shape)]
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda a: original if a is node else a)
                user.kwargs = fx.node.map_arg(user.kwargs, lambda a: original if a is node else a)
            node.graph.erase_node(node)
            return True
        node.op, node.target, node.args, node.kwargs = "call_function", frozen_size, (x, fixed), {}
        return True


register(
    OpSpec("reshape", Match(functions=(torch.reshape,), methods=("view", "reshape", "expand"),
                            aten=("view", "unsafe_view", "reshape", "expand")), rule_shape, Sizes()),
    OpSpec("unflatten", Match(methods=("unflatten",)), rule_shape, Unflatten()),
    OpSpec("move", Match(
        modules=(nn.Flatten,),
        functions=(torch.flatten, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.cat,
                   torch.concat, torch.stack, torch.flip, torch.roll, torch.movedim, torch.swapaxes, torch.t,
                   torch.tile, F.pixel_shuffle, F.pixel_unshuffle),
        methods=("flatten", "permute", "transpose", "squeeze", "unsqueeze", "expand_as", "repeat", "flip",
                 "roll", "movedim", "t", "swapaxes"),
        aten=("flatten", "permute", "transpose", "t", "unsqueeze", "squeeze", "cat", "concat", "stack",
              "roll", "flip", "repeat")), rule_shape),
    # sizes, dims, ints computed from shapes: reading shapes never couples channels
    OpSpec("shape_value", Match(), lambda st, node: None, SizeReads()),
)
