"""Values that carry no channel op: inputs, parameters, outputs, constants, unknown ops.

Model inputs and outputs are pinned (their channels are the model's interface); every op no
family claims is `opaque`. A value computed from constants only is a constant, and its
*provenance* says which of its dims are a parameter's: a relative-position bias (Swin) is
`table[index].view(N, N, -1).permute(2, 0, 1)`, whose dim 0 is the table's head dim, so
removing a head from the logits it is added to means slicing the table. Provenance follows a
parameter through ops that keep a dim intact (indexing along another dim, also by a tensor
index: LeViT's `biases[:, index]`; permutes; views, reshapes and expands that only add, drop
or broadcast other dims: a layer scale `gamma.view(1, -1, 1, 1)`, a class token
`cls.expand(B, -1, -1)`; unsqueeze; copies); anything else loses it, and the channels it meets
stay pinned. Literal sizes along a parameter dim are rewritten when the parameter is cut
(`resize_constant`). Provenance of a node: (state_dict key, per dim of the value: the key's
dim or None).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from rwdeploy.passes.channel_state import AnalysisState, TensorMeta, const_map
from rwdeploy.passes.ops.common import opaque, value_users
from rwdeploy.passes.ops.spec import Match, OpSpec, base_name, register

FACTORY_FUNCTIONS = (torch.zeros, torch.ones, torch.full, torch.arange, torch.tensor, torch.eye,
                     torch.linspace, torch.zeros_like, torch.ones_like, torch.full_like)
_COPIES = {"contiguous", "clone", "to", "float", "detach", "alias", "to_copy"}


def rule_get_attr(st: AnalysisState, node: fx.Node) -> Any:
    meta = st.values[node.name]
    if not isinstance(meta, TensorMeta):
        return None
    if node.target in st.gm.state_dict() and len(value_users(node)) == 1:  # a tensor read by one op
        st.provenance[node.name] = (node.target, tuple(range(len(meta.shape))))
    return const_map(len(meta.shape))


def rule_output(st: AnalysisState, node: fx.Node) -> Any:
    for a in node.all_input_nodes:
        st.pin(st.maps.get(a.name), "model output")
    return None


def rule_constant(st: AnalysisState, node: fx.Node) -> Any:
    src, meta = node.args[0] if node.args else None, st.values[node.name]
    if isinstance(src, fx.Node) and src.name in st.provenance and isinstance(meta, TensorMeta) \
            and len(value_users(node)) == 1:
        key, dims = st.provenance[src.name]
        out = _dims(st, node, base_name(node), dims, st.values[src.name].shape, meta.shape)
        if out is not None and any(d is not None for d in out):
            st.provenance[node.name] = (key, out)
    return _const_like(meta)


def _const_like(meta: Any) -> Any:
    if isinstance(meta, TensorMeta):
        return const_map(len(meta.shape))
    if isinstance(meta, (tuple, list)) and not isinstance(meta, torch.Size):
        return tuple(_const_like(m) for m in meta)
    return None


def _dims(st: AnalysisState, node: fx.Node, name: str, dims: tuple, shape: tuple, out_shape: tuple):
    """The provenance dims of the op's output, from those of its input (None: lost)."""
    args = node.args[1:]
    if name in _COPIES:
        return dims
    if name == "permute":
        order = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
        return tuple(dims[i] for i in order)
    if name == "transpose":
        a, b = (i % len(dims) for i in args[:2])
        d = list(dims)
        d[a], d[b] = d[b], d[a]
        return tuple(d)
    if name == "unsqueeze":
        d = list(dims)
        d.insert(args[0] % (len(dims) + 1), None)
        return tuple(d)
    if name in _RESIZES:
        return _resized_dims(name, _sizes(node), dims, shape, out_shape)
    if name in ("getitem", "index"):  # x[:, index] / aten.index(x, [None, index])
        return _indexed_dims(st, args[0], dims, aten=name == "index")
    return None


_RESIZES = {"view", "reshape", "unsafe_view", "expand"}


def _sizes(node: fx.Node) -> list[Any]:
    """The size arguments of view / reshape / expand, as one list."""
    args = node.args[1:]
    return list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else list(args)


def _resized_dims(name: str, sizes: list[Any], dims: tuple, shape: tuple, out_shape: tuple):
    """view / reshape / expand: a parameter dim survives where the op moves it whole (adds or
    drops size-1 dims around it, splits or merges dims before it, broadcasts other dims). Its
    size argument must be -1 or a
    literal (`resize_constant` rewrites that when the parameter is cut), never computed."""
    out: list[int | None] = [None] * len(out_shape)
    if name == "expand":  # leading new dims; same-size dims keep their source
        lead = len(out_shape) - len(shape)
        for i, d in enumerate(dims):
            if d is not None and shape[i] == out_shape[lead + i] and shape[i] > 1:
                out[lead + i] = d
    else:
        src = [i for i, n in enumerate(shape) if n != 1]
        dst = [j for j, n in enumerate(out_shape) if n != 1]
        if [shape[i] for i in src] == [out_shape[j] for j in dst]:  # size-1 dims added or dropped
            for i, j in zip(src, dst):
                out[j] = dims[i]
        else:  # other dims split or merged: the trailing dims that keep their size survive
            i, j = len(shape) - 1, len(out_shape) - 1
            while i >= 0 and j >= 0 and shape[i] == out_shape[j]:
                out[j] = dims[i]
                i, j = i - 1, j - 1
    if any(d is not None and isinstance(sizes[j], fx.Node) for j, d in enumerate(out) if j < len(sizes)):
        return None  # a size computed at run time along a parameter dim could not follow its cut
    return tuple(out)


def _indexed_dims(st: AnalysisState, index: Any, dims: tuple, aten: bool):
    """x[a, b, ...] with full slices, at most one tensor index (its dims replace the dim it
    indexes: a table gathered by relative position), ints (drop a dim), None (Python: a new
    dim; ATen's index list: a full slice) and Ellipsis."""
    items = list(index) if isinstance(index, (tuple, list)) else [index]
    if Ellipsis in items:
        at = items.index(Ellipsis)
        consuming = sum(1 for e in items if e is not Ellipsis and (aten or e is not None))
        items[at:at + 1] = [slice(None)] * (len(dims) - consuming)
    out: list[int | None] = []
    i, tensors = 0, 0
    for item in items:
        if item is None and not aten:
            out.append(None)
            continue
        if i >= len(dims):
            return None
        if item is None or (isinstance(item, slice) and item == slice(None)):
            out.append(dims[i])
        elif isinstance(item, slice):
            out.append(None)  # a part of the dim: its positions no longer match the parameter's
        elif isinstance(item, fx.Node) and isinstance(st.values.get(item.name), TensorMeta):
            tensors += 1
            out += [None] * len(st.values[item.name].shape)
        elif not isinstance(item, int):
            return None
        i += 1
    return None if tensors > 1 else tuple(out) + tuple(dims[i:])


def resize_constant(node: fx.Node, counts: dict[int, int]) -> None:
    """Give view / reshape / expand of a cut parameter the kept `counts` (output dim -> size)
    where its size arguments name them literally."""
    sizes = _sizes(node)
    for j, n in counts.items():
        if j < len(sizes) and isinstance(sizes[j], int) and sizes[j] != -1:
            sizes[j] = n
    args = node.args[1:]
    packed = len(args) == 1 and isinstance(args[0], (tuple, list))
    node.args = (node.args[0], type(args[0])(sizes)) if packed else (node.args[0], *sizes)


def resizes(node: fx.Node) -> bool:
    return base_name(node) in _RESIZES


def provenance_of(st: AnalysisState, a: Any) -> tuple[str, tuple[int | None, ...]] | None:
    return st.provenance.get(a.name) if isinstance(a, fx.Node) else None


register(
    OpSpec("placeholder", Match(), lambda st, node: st.pinned_fresh(st.values[node.name], f"model input {node.name}")),
    OpSpec("get_attr", Match(), rule_get_attr),
    OpSpec("output", Match(), rule_output),
    OpSpec("constant", Match(functions=FACTORY_FUNCTIONS,
                             aten=("zeros", "ones", "full", "arange", "eye", "linspace", "scalar_tensor",
                                   "zeros_like", "ones_like", "full_like", "empty", "empty_like")), rule_constant),
    OpSpec("opaque", Match(), opaque),
)
