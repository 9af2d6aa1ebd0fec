"""Which dims of a constant computed in forward() are dims of a parameter.

A relative-position bias (Swin) is `table[index].view(N, N, -1).permute(2, 0, 1)`: its dim 0
is the table's head dim. When such a constant is added to attention logits, removing a head
means slicing the *table* along that dim. Provenance follows a parameter through the ops
that keep a dim intact (indexing along another dim, permutes, reshapes that keep trailing
dims, unsqueeze, copies); anything else loses it, and the channels it meets stay pinned.
Provenance of a node: (state_dict key, for each dim of the value: the parameter dim or None).
"""
from __future__ import annotations

from typing import Any

from torch import fx

from rwdeploy.passes.channel_state import AnalysisState, TensorMeta

Provenance = tuple[str, tuple[int | None, ...]]

_COPIES = {"contiguous", "clone", "to", "float", "detach", "alias", "to_copy"}


def start(st: AnalysisState, node: fx.Node) -> None:
    """A get_attr of a state_dict tensor read by exactly one op."""
    meta = st.values.get(node.name)
    if isinstance(meta, TensorMeta) and node.target in st.gm.state_dict() and len(node.users) == 1:
        st.provenance[node.name] = (node.target, tuple(range(len(meta.shape))))


def follow(st: AnalysisState, node: fx.Node, name: str) -> None:
    """Provenance of a node whose inputs are all constants (or none)."""
    src = node.args[0] if node.args else None
    meta = st.values.get(node.name)
    if not isinstance(src, fx.Node) or src.name not in st.provenance or not isinstance(meta, TensorMeta) \
            or len(node.users) != 1:
        return
    key, dims = st.provenance[src.name]
    out = _dims(st, node, name, dims, st.values[src.name].shape, meta.shape)
    if out is not None and any(d is not None for d in out):
        st.provenance[node.name] = (key, out)


def _dims(st: AnalysisState, node: fx.Node, name: str, dims: tuple, shape: tuple, out_shape: tuple):
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


def provenance_of(st: AnalysisState, arg: Any) -> Provenance | None:
    return st.provenance.get(arg.name) if isinstance(arg, fx.Node) else None
