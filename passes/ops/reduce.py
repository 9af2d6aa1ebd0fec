"""Reductions, norms, softmax, normalize and cumsum: ops that combine positions along some dims.

Reducing over dims that do not carry channels keeps the classes (global pooling by `mean`, a
GRN's spatial norm); reducing over channels mixes them, so they are unified: all go together
or all stay. Softmax and `F.normalize` over a channel dim unify them likewise (every output
depends on every input along it). Argument positions differ by op: `mean(x, dim, keepdim)`,
`norm(x, p, dim, keepdim)`, `normalize(x, p, dim)` (dim 1 unless given).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from rwdeploy.passes.channel_state import CONST, AnalysisState, TensorMeta, varying_dims
from rwdeploy.passes.ops.common import arg, opaque, single_input
from rwdeploy.passes.ops.elementwise import rule_binary
from rwdeploy.passes.ops.spec import Match, OpSpec, base_name, register


def _dim_arg(node: fx.Node, at: int) -> Any:
    """The `dim` argument; None for a whole-tensor reduction (var(x, unbiased) passes a bool there)."""
    dim = arg(node, at, "dim")
    return None if isinstance(dim, bool) else dim


def _reduce_dims(node: fx.Node, ndim: int, at: int) -> list[int] | None:
    dim = _dim_arg(node, at)
    if dim is None or isinstance(dim, fx.Node):
        return None if dim is None else []
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % ndim for d in dims)


def reduce_rule(dim_at: int, keepdim_at: int | None = None) -> Any:
    """The rule of a reduction whose `dim` is argument `dim_at` and `keepdim` the next one (or
    argument `keepdim_at`: `var(x, dim, unbiased, keepdim)`)."""
    keepdim_at = dim_at + 1 if keepdim_at is None else keepdim_at

    def rule(st: AnalysisState, node: fx.Node) -> Any:
        got = single_input(st, node)
        out = st.values[node.name]
        if got is None or not isinstance(out, TensorMeta):
            return opaque(st, node)
        x, m = got
        dims = _reduce_dims(node, m.dim(), dim_at)
        if dims == []:
            return opaque(st, node, "reduction over dims computed at run time")
        given = _dim_arg(node, dim_at) is not None
        dims = list(range(m.dim())) if dims is None else dims
        keepdim = bool(arg(node, keepdim_at, "keepdim", False)) if given else False
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
    return rule


def rule_max_min(st: AnalysisState, node: fx.Node) -> Any:
    """max / min in their three forms: of two tensors (elementwise, as `maximum`), of every
    element (a reduction), or along one dim, returning (values, indices) that both keep the
    classes of the dims left (VOLO's class head takes `max(1)[0]` over tokens)."""
    dim = arg(node, 1, "dim")
    if isinstance(dim, fx.Node):
        return rule_binary(st, node)
    out = st.values[node.name]
    if isinstance(out, TensorMeta):
        return reduce_rule(1)(st, node)
    got = single_input(st, node)
    if got is None or not isinstance(dim, int) or not isinstance(out, tuple) or len(out) != 2:
        return opaque(st, node, "max/min with an unexpected signature")
    m = got[1]
    d, keepdim = dim % m.dim(), bool(arg(node, 2, "keepdim", False))
    if d in varying_dims(m):  # over channels: they mix, as in any reduction
        st.uf.union_all(m)
        known = m[m >= 0]
        r = torch.full([1] * len(out[0].shape), int(known.min()) if known.numel() else CONST, dtype=torch.long)
    else:
        r = m.narrow(d, 0, 1) if keepdim else m.narrow(d, 0, 1).squeeze(d)
    return r, r


def along_dim_rule(default_dim: int | None) -> Any:
    """The rule of an op that combines positions along one dim and keeps the shape (softmax,
    normalize): over a channel dim it unifies the channels."""

    def rule(st: AnalysisState, node: fx.Node) -> Any:
        got = single_input(st, node)
        if got is None:
            return opaque(st, node)
        x, m = got
        if node.op == "call_module":
            dim = st.module(node).dim
        else:
            dim = arg(node, 2 if base_name(node) == "normalize" else 1, "dim", default_dim)
        if not isinstance(dim, int):
            return opaque(st, node, f"{base_name(node) or 'softmax'} without an explicit dim")
        if dim % m.dim() in varying_dims(m):
            st.uf.union_all(m)
        return m
    return rule


register(
    OpSpec("reduce", Match(functions=(torch.mean, torch.sum, torch.amax, torch.amin, torch.logsumexp, torch.prod),
                           methods=("mean", "sum", "amax", "amin", "logsumexp", "prod"),
                           aten=("mean", "sum", "amax", "amin", "logsumexp", "prod")), reduce_rule(1)),
    OpSpec("max_min", Match(functions=(torch.max, torch.min), methods=("max", "min"), aten=("max", "min")),
           rule_max_min),
    # var(x, dim, unbiased, keepdim) (aten.var.dim too); var.correction takes keepdim by name
    OpSpec("variance", Match(functions=(torch.std, torch.var), methods=("std", "var"), aten=("std", "var")),
           reduce_rule(1, keepdim_at=3)),
    OpSpec("norm", Match(functions=(torch.norm, torch.linalg.vector_norm), methods=("norm",),
                         aten=("norm", "linalg_vector_norm")), reduce_rule(2)),
    OpSpec("softmax", Match(modules=(nn.Softmax, nn.LogSoftmax),
                            functions=(torch.nn.functional.softmax, torch.nn.functional.log_softmax,
                                       torch.softmax, torch.log_softmax),
                            methods=("softmax", "log_softmax"), aten=("softmax", "log_softmax")),
           along_dim_rule(None)),
    OpSpec("normalize", Match(functions=(torch.nn.functional.normalize,)), along_dim_rule(1)),
    # a running sum mixes the positions before each one along its dim (EdgeNeXt's positional
    # encoding sums a mask over H and W): over channels it couples them like softmax
    OpSpec("cumsum", Match(functions=(torch.cumsum,), methods=("cumsum",), aten=("cumsum",)), along_dim_rule(None)),
)
