"""Values that carry no channel op: inputs, parameters, outputs, constants, unknown ops.

Model inputs and outputs are pinned (their channels are the model's interface); every op no
family claims is `opaque`. A value computed from constants only is a constant, and its
*provenance* says which of its dims are a parameter's: a relative-position bias (Swin) is
`table[index].view(N, N, -1).permute(2, 0, 1)`, whose dim 0 is the table's head dim, so
removing a head from the logits it is added to means slicing the table. Provenance follows a
parameter through ops that keep a dim intact (indexing along another dim, permutes, reshapes
keeping trailing dims, unsqueeze, copies); anything else loses it, and the channels it meets
stay pinned. Provenance of a node: (state_dict key, per dim of the value: the key's dim or None).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from rwdeploy.passes.channel_state import AnalysisState, TensorMeta, const_map
from rwdeploy.passes.ops.common import opaque
from rwdeploy.passes.ops.spec import Match, OpSpec, base_name, register

FACTORY_FUNCTIONS = (torch.zeros, torch.ones, torch.full, torch.arange, torch.tensor, torch.eye,
                     torch.linspace, torch.zeros_like, torch.ones_like, torch.full_like)
_COPIES = {"contiguous", "clone", "to", "float", "detach", "alias", "to_copy"}


def rule_get_attr(st: AnalysisState, node: fx.Node) -> Any:
    meta = st.values[node.name]
    if not isinstance(meta, TensorMeta):
        return None
    if node.target in st.gm.state_dict() and len(node.users) == 1:  # a tensor read by one op
        st.provenance[node.name] = (node.target, tuple(range(len(meta.shape))))
    return const_map(len(meta.shape))


def rule_output(st: AnalysisState, node: fx.Node) -> Any:
    for a in node.all_input_nodes:
        st.pin(st.maps.get(a.name), "model output")
    return None


def rule_constant(st: AnalysisState, node: fx.Node) -> Any:
    src, meta = node.args[0] if node.args else None, st.values[node.name]
    if isinstance(src, fx.Node) and src.name in st.provenance and isinstance(meta, TensorMeta) \
            and len(node.users) == 1:
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
    if name in ("view", "reshape"):
        sizes = list(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else list(args)
        out: list[int | None] = [None] * len(out_shape)
        i, j = len(shape) - 1, len(out_shape) - 1
        while i >= 0 and j >= 0 and shape[i] == out_shape[j]:
            if dims[i] is not None and sizes[j] != -1:
                return None  # a literal size along a parameter dim could not follow its slicing
            out[j] = dims[i]
            i, j = i - 1, j - 1
        return tuple(out)
    if name in ("getitem", "index"):  # x[index] / aten.index(x, [index])
        idx = tuple(args[0]) if isinstance(args[0], (tuple, list)) else (args[0],)
        if len(idx) == 1 and isinstance(idx[0], fx.Node):  # table[index]: gathers along dim 0
            index_meta = st.values.get(idx[0].name)
            if isinstance(index_meta, TensorMeta):
                return (None,) * len(index_meta.shape) + tuple(dims[1:])
    return None


def provenance_of(st: AnalysisState, a: Any) -> tuple[str, tuple[int | None, ...]] | None:
    return st.provenance.get(a.name) if isinstance(a, fx.Node) else None


register(
    OpSpec("placeholder", Match(), lambda st, node: st.pinned_fresh(st.values[node.name], f"model input {node.name}")),
    OpSpec("get_attr", Match(), rule_get_attr),
    OpSpec("output", Match(), rule_output),
    OpSpec("constant", Match(functions=FACTORY_FUNCTIONS), rule_constant),
    OpSpec("opaque", Match(), opaque),
)
