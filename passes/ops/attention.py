"""Products of two activations (attention's q @ k^T and attn @ v), and fused attention
(`F.scaled_dot_product_attention`, `aten.scaled_dot_product_attention`).

Everything feeding one batch entry of the product goes together: for attention laid out as
[batch, heads, tokens, width], one entry is one head, so q, k and v lose whole heads at once.
Fused attention is the same for q, k and v (its default scale reads the width, which whole
heads leave alone); an additive mask that is a parameter per head (a learned attention bias
indexed by relative position) is sliced with the heads, as in an add.
A product with a weight tensor is a linear layer in disguise: it is not followed (nn.Linear is).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from rwdeploy.passes.channel_state import CONST, AnalysisState, TensorMeta, compress
from rwdeploy.passes.ops.common import aligned, arg, opaque, state_tensor
from rwdeploy.passes.ops.elementwise import constant_operand
from rwdeploy.passes.ops.spec import Match, OpSpec, register

SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def union_entries(st: AnalysisState, maps: list[torch.Tensor], batch_dims: int) -> torch.Tensor:
    """Unify, for every (broadcast) batch entry, all classes the operands hold in it; the map
    of the entries' classes, shaped [*batch, 1, 1]."""
    flat = [aligned(m, batch_dims + 2).flatten(-2) for m in maps]
    batch = torch.broadcast_shapes(*(f.shape[:-1] for f in flat))
    flat = [f.expand(*batch, f.shape[-1]).reshape(-1, f.shape[-1]) for f in flat]
    rep = []
    for i in range(flat[0].shape[0]):
        ids = torch.cat([f[i] for f in flat])
        st.uf.union_all(ids)
        known = ids[ids >= 0]
        rep.append(int(known.min()) if known.numel() else CONST)
    return torch.tensor(rep, dtype=torch.long).reshape(*batch, 1, 1)


def _is_tensor(st: AnalysisState, a: Any) -> bool:
    return isinstance(a, fx.Node) and isinstance(st.values.get(a.name), TensorMeta)


def rule_matmul(st: AnalysisState, node: fx.Node) -> Any:
    a, b = node.args[0], node.args[1]
    out = st.values[node.name]
    if not all(_is_tensor(st, v) for v in (a, b)):
        return opaque(st, node)
    if state_tensor(st.gm, a) is not None or state_tensor(st.gm, b) is not None:
        return opaque(st, node, "matmul with a weight tensor (use nn.Linear)")
    ma, mb = st.maps[a.name], st.maps[b.name]
    if ma.dim() < 2 or mb.dim() < 2 or not isinstance(out, TensorMeta):
        return opaque(st, node)
    return compress(union_entries(st, [ma, mb], len(out.shape) - 2))


def rule_sdpa(st: AnalysisState, node: fx.Node) -> Any:
    q, k, v, mask = (arg(node, i, name) for i, name in enumerate(SDPA_ARGS[:4]))
    out = st.values[node.name]
    if not all(_is_tensor(st, t) for t in (q, k, v)) or not isinstance(out, TensorMeta):
        return opaque(st, node)
    if arg(node, 7, "enable_gqa", False):
        return opaque(st, node, "grouped-query attention (key/value heads shared by query heads)")
    maps = [st.maps[t.name] for t in (q, k, v)]
    if any(m.dim() < 2 for m in maps):
        return opaque(st, node)
    ndim = len(out.shape)
    masked = _is_tensor(st, mask)
    if masked and not bool((st.maps[mask.name] == CONST).all()):
        maps.append(st.maps[mask.name])  # a mask computed from activations: one more operand
        masked = False
    entries = union_entries(st, maps, ndim - 2)
    if masked:  # a constant mask is added to the logits: sliced with the heads, or pins them
        constant_operand(st, node, mask, aligned(st.maps[mask.name], ndim), aligned(entries, ndim), ndim)
    return compress(entries)


register(
    OpSpec("matmul", Match(functions=(torch.matmul, operator.matmul, torch.bmm), methods=("matmul", "bmm"),
                           aten=("matmul", "bmm")), rule_matmul),
    OpSpec("scaled_dot_product_attention", Match(functions=(F.scaled_dot_product_attention,),
                                                 aten=("scaled_dot_product_attention",)), rule_sdpa),
)
