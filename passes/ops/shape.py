"""Shape ops: they only move elements, so the analysis runs the op itself on the class maps.

`view(b, heads, c // heads, n)` of a [b, c, n] map yields a map whose classes vary along
heads and head width: removing a channel then means removing whole rows of that view (see
`channel_selection`). Sizes that name channel dims (`view`, `reshape`, `expand`,
`unflatten`) are rewritten to the kept counts; reads of a channel dim's size keep answering
the original size, because arithmetic on it (an attention scale) is part of the function.
Offsets into channels (split, slice, index) are in `ops/indexing.py`.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from rwdeploy.passes.channel_state import CONST, AnalysisState, TensorMeta, compress, has_tensor, varying_dims
from rwdeploy.passes.ops.common import arg, input_map, op_name, opaque
from rwdeploy.passes.ops.graph import provenance_of
from rwdeploy.passes.ops.spec import SPECS, ChannelArgs, Match, OpSpec, Shape, base_name, register


def rule_shape(st: AnalysisState, node: fx.Node) -> Any:
    """Apply the op to the class maps; its channel arguments record what pieces must keep."""
    args, kwargs = _materialize(st, node.args), _materialize(st, node.kwargs)
    try:
        if node.op == "call_method":
            # class maps are expanded views: they reshape where the values view
            name = {"view": "reshape", "view_as": "reshape_as"}.get(node.target, node.target)
            result = getattr(args[0], name)(*args[1:], **kwargs)
        elif node.op == "call_module":
            result = st.module(node)(*args, **kwargs)
        elif base_name(node) in ("view", "unsafe_view"):
            result = torch.reshape(*args, **kwargs)
        elif base_name(node) == "view_as":
            result = args[0].reshape_as(*args[1:])
        else:
            result = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - an op the int maps cannot follow is not understood
        return opaque(st, node, "shape op the analysis could not follow")
    if not _matches(result, st.values[node.name]):
        return opaque(st, node, "shape op the analysis could not follow")
    if base_name(node) in ("cat", "concat") and isinstance(result, torch.Tensor):
        result = _constant_pieces_join(st, node, result)
    channel_args, x = SPECS[st.ops[node.name]].channel_args, node.args[0] if node.args else None
    m = input_map(st, x)  # current roots: channels unified since may vary along fewer dims
    if channel_args and m is not None and not channel_args.record(st, node, x, m, st.shape(x)):
        return opaque(st, node, "indexing along channels in a way the pass cannot rewrite")
    return _compress_all(result)


def rule_repeat_interleave(st: AnalysisState, node: fx.Node) -> Any:
    """x.repeat_interleave(r, dim) with an int r: output position j along dim is input position
    j // r, so the class maps repeat the same way (GC-ViT's global queries); removing a position
    removes its r copies and the op needs no new arguments. Tensor repeats or no dim (a flatten)
    are not followed."""
    repeats, dim = arg(node, 1, "repeats"), arg(node, 2, "dim")
    if not isinstance(repeats, int) or not isinstance(dim, int):
        return opaque(st, node, "repeat_interleave with tensor repeats or without a dim")
    return rule_shape(st, node)


def _constant_pieces_join(st: AnalysisState, node: fx.Node, result: torch.Tensor) -> torch.Tensor:
    """cat([cls_token.expand(B, -1, -1), x], 1): a constant piece joins the channels of the
    pieces it is concatenated with. Its values at channel c are then part of channel c (removed
    with it: a constant, so nothing to fold), and the parameter it comes from is sliced with
    the channels. A constant piece that is not such a parameter pins them."""
    pieces, dim = node.args[0], arg(node, 1, "dim", 0) % result.dim()
    if not isinstance(pieces, (tuple, list)):
        return result
    maps = [compress(st.maps[p.name]) for p in pieces]
    live = [m for m in maps if bool((m != CONST).any())]
    constant = [i for i, m in enumerate(maps) if bool((m == CONST).all())]
    if not live or not constant:
        return result
    template = compress(live[0])
    channel_dims = [d for d in varying_dims(template) if d != dim]
    if len(channel_dims) != 1 or dim in varying_dims(template) or any(not torch.equal(m, template) for m in live):
        return result  # several kinds of channel layout joined: leave the constants as they are
    d = channel_dims[0]
    vec = template.flatten()
    offsets = torch.tensor([0] + [st.shape(p)[dim] for p in pieces]).cumsum(0).tolist()
    for i in constant:
        prov = provenance_of(st, pieces[i])
        if prov is None or prov[1][d] is None:
            st.pin(vec, f"{op_name(node)}: concatenated constant {pieces[i].name} is computed in forward() (or "
                        f"shared) and varies along channels, so it cannot be sliced")
            continue
        key, param_dims = prov
        st.attr_followers.add(key)
        st.add_slice(key, param_dims[d], torch.arange(len(vec)), vec, "follower", node.name)
        region = result.narrow(dim, offsets[i], offsets[i + 1] - offsets[i])
        region.copy_(template.expand_as(region))
    return result


def _materialize(st: AnalysisState, a: Any) -> Any:
    if isinstance(a, fx.Node):
        meta, m = st.values.get(a.name), st.maps.get(a.name)
        if isinstance(meta, TensorMeta):
            return m.expand(meta.shape)
        if isinstance(meta, (tuple, list)) and not isinstance(meta, torch.Size) and has_tensor(meta):
            return _expand(m, meta)
        return meta
    if isinstance(a, (tuple, list)):
        return type(a)(_materialize(st, x) for x in a)
    if isinstance(a, dict):
        return {k: _materialize(st, v) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_materialize(st, a.start), _materialize(st, a.stop), _materialize(st, a.step))
    return a


def _expand(m: Any, meta: Any) -> Any:
    """A (nested) tuple of class maps at the shapes of the values they describe (nn.LSTM returns
    (output, (h_n, c_n)))."""
    if isinstance(meta, TensorMeta):
        return m.expand(meta.shape)
    if isinstance(meta, (tuple, list)) and not isinstance(meta, torch.Size) and has_tensor(meta):
        return tuple(_expand(mm, mt) for mm, mt in zip(m, meta))
    return meta


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
        # Channel dims get the kept counts. A size computed at run time reads original sizes
        # (`SizeReads` freezes them): it is scaled by kept / original, which also holds when the
        # dim merges channels with the batch (MobileViT's `B * C * patches`).
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
            if isinstance(seq[d], fx.Node):  # computed (B * C * patches): scaled by kept / original
                if n != out[d]:
                    seq[d], changed = _scaled(node, seq[d], n, out[d]), True
            elif not (isinstance(seq[d], int) and (seq[d] == -1 or seq[d] == n)):
                seq[d], changed = n, True
        if not changed:
            return False
        node.args = (x,) + ((tuple(seq),) if packed else tuple(seq))
        node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("shape", "size")}
        return True


def _scaled(node: fx.Node, size: fx.Node, kept: int, original: int) -> fx.Node:
    """size * kept // original, computed at run time before `node`."""
    g = math.gcd(kept, original)
    with node.graph.inserting_before(node):
        times = node.graph.call_function(operator.mul, (size, kept // g))
        return node.graph.call_function(operator.floordiv, (times, original // g))


class ReshapeAs(ChannelArgs):
    """x.reshape_as(other) / view_as(other): the sizes come from `other` at run time. Where
    `other` lost other channels than the result must (or none), the call becomes a reshape to
    `other`'s original sizes with the channel dims' kept counts (`Sizes`)."""

    def rewrite(self, node: fx.Node, sel: Any, x: fx.Node, shape: Shape) -> bool:
        other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        out = sel.analysis.values[node.name].shape
        if all(int(sel.present(node.name, d, n).sum()) == int(sel.present(other.name, d, n).sum())
               for d, n in enumerate(out)):
            return False  # `other` shrank exactly as the result must: its sizes stay right
        fixed = tuple((d, n) for d, n in enumerate(out) if not sel.present(other.name, d, n).all())
        with node.graph.inserting_before(node):
            sizes = node.graph.call_function(frozen_size, (other, fixed))
        node.op, node.target, node.args, node.kwargs = "call_function", torch.reshape, (x, sizes), {}
        return Sizes().rewrite(node, sel, x, shape)


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
        cut = [d for d in range(len(shape)) if not sel.present(x.name, d, shape[d]).all()]
        return freeze_size_read(node, x, shape, cut)


def freeze_size_read(node: fx.Node, x: fx.Node, shape: Shape, cut: list[int]) -> bool:
    """Make a read of the size of `x` (original shape `shape`, dims `cut` lost entries) report
    the original sizes: `x.size(d)` becomes the number, `x.size()` / `x.shape` a `frozen_size`."""
    is_size = node.op == "call_method" and node.target == "size"
    is_shape = node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)
    if not cut or not (is_size or is_shape):
        return False
    dim = node.args[1] if is_size and len(node.args) > 1 else node.kwargs.get("dim") if is_size else None
    if dim is not None:
        original = shape[dim % len(shape)]
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: original if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: original if a is node else a)
        node.graph.erase_node(node)
        return True
    fixed = tuple((d, shape[d]) for d in cut)
    node.op, node.target, node.args, node.kwargs = "call_function", frozen_size, (x, fixed), {}
    return True


register(
    OpSpec("reshape", Match(functions=(torch.reshape,), methods=("view", "reshape", "expand"),
                            aten=("view", "unsafe_view", "reshape", "expand")), rule_shape, Sizes()),
    OpSpec("reshape_as", Match(methods=("reshape_as", "view_as"), aten=("reshape_as", "view_as")), rule_shape,
           ReshapeAs()),
    OpSpec("unflatten", Match(methods=("unflatten",)), rule_shape, Unflatten()),
    OpSpec("move", Match(
        modules=(nn.Flatten,),
        functions=(torch.flatten, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.cat,
                   torch.concat, torch.stack, torch.flip, torch.roll, torch.movedim, torch.swapaxes, torch.t,
                   torch.tile, F.pixel_shuffle, F.pixel_unshuffle),
        methods=("flatten", "permute", "transpose", "squeeze", "unsqueeze", "expand_as", "repeat", "flip",
                 "roll", "movedim", "t", "swapaxes"),
        aten=("flatten", "permute", "transpose", "t", "unsqueeze", "squeeze", "cat", "concat", "stack",
              "roll", "flip", "repeat", "expand_as")), rule_shape),
    OpSpec("repeat_interleave", Match(functions=(torch.repeat_interleave,), methods=("repeat_interleave",),
                                      aten=("repeat_interleave",)), rule_repeat_interleave),
    # sizes, dims, ints computed from shapes: reading shapes never couples channels
    OpSpec("shape_value", Match(), lambda st, node: None, SizeReads()),
)
