"""Reductions and softmax: ops that combine positions along some dims.

Reducing over dims that do not carry channels keeps the classes (global pooling by `mean`);
reducing over channels mixes them, so they are unified: all go together or all stay. Softmax
over a channel dim unifies them likewise (every output depends on every input along it).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from rwdeploy.passes.channel_state import CONST, AnalysisState, TensorMeta, varying_dims
from rwdeploy.passes.ops.common import arg, opaque, single_input
from rwdeploy.passes.ops.spec import Match, OpSpec, register


def _reduce_dims(node: fx.Node, ndim: int) -> list[int] | None:
    dim = arg(node, 1, "dim")
    if dim is None or isinstance(dim, fx.Node):
        return None if dim is None else []
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % ndim for d in dims)


def rule_reduce(st: AnalysisState, node: fx.Node) -> Any:
    got = single_input(st, node)
    out = st.values[node.name]
    if got is None or not isinstance(out, TensorMeta):
        return opaque(st, node)
    x, m = got
    dims = _reduce_dims(node, m.dim())
    if dims == []:
        return opaque(st, node, "reduction over dims computed at run time")
    dims = list(range(m.dim())) if dims is None else dims
    keepdim = bool(arg(node, 2, "keepdim", False)) if arg(node, 1, "dim") is not None else False
    if any(d in varying_dims(m) for d in dims):
        st.uf.union_all(m)  # a reduction over channels mixes them: they go together or stay
        known = m[m >= 0]
        rep = int(known.min()) if known.numel() else CONST
        return torch.full([1] * len(out.shape), rep, dtype=torch.long)
    index = tuple(slice(0, 1) if d in dims else slice(None) for d in range(m.dim()))
    r = m[index]
    if not keepdim:
        r = r.reshape([s for d, s in enumerate(r.shape) if d not in dims])
    if r.dim() != len(out.shape):
        return opaque(st, node)
    return r


def rule_softmax(st: AnalysisState, node: fx.Node) -> Any:
    got = single_input(st, node)
    if got is None:
        return opaque(st, node)
    x, m = got
    dim = st.module(node).dim if node.op == "call_module" else arg(node, 1, "dim")
    if not isinstance(dim, int):
        return opaque(st, node, "softmax without an explicit dim")
    if dim % m.dim() in varying_dims(m):
        st.uf.union_all(m)
    return m


register(
    OpSpec("reduce", Match(functions=(torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var,
                                      torch.logsumexp, torch.prod),
                           methods=("mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod"),
                           aten=("mean", "sum", "amax", "amin")), rule_reduce),
    OpSpec("softmax", Match(modules=(nn.Softmax, nn.LogSoftmax),
                            functions=(torch.nn.functional.softmax, torch.nn.functional.log_softmax,
                                       torch.softmax, torch.log_softmax),
                            methods=("softmax", "log_softmax"), aten=("softmax", "log_softmax")), rule_softmax),
)
