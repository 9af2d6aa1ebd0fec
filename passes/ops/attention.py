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


def _einsum_operands(node: fx.Node) -> tuple[str, list[Any]]:
    """(equation, operands) of torch.einsum(eq, *ops), torch.einsum(eq, [ops]), aten.einsum(eq, ops)."""
    rest = list(node.args[1:])
    if len(rest) >= 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    return str(node.args[0]).replace(" ", ""), rest


def rule_einsum(st: AnalysisState, node: fx.Node) -> Any:
    """An einsum of activations is a product like matmul: the output letters that every
    activation operand shares index its entries (batch, heads, positions), and everything
    feeding one entry goes together. The output's classes vary along those letters only. A
    constant operand (MViT-V2's relative-position table) is fine where none of its letters
    indexes entries that differ in class: removing an entry then never needs a slice of it."""
    eq, operands = _einsum_operands(node)
    out = st.values[node.name]
    if "->" not in eq or "..." in eq or not isinstance(out, TensorMeta):
        return opaque(st, node, "einsum with an ellipsis or an implicit output")
    lhs, rhs = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != len(operands) or not all(_is_tensor(st, o) for o in operands) \
            or any(len(t) != len(st.shape(o)) or len(set(t)) != len(t) for t, o in zip(terms, operands)):
        return opaque(st, node, "einsum with an unexpected signature")
    maps = [st.canon(st.maps[o.name]) for o in operands]
    active = [i for i, m in enumerate(maps) if not bool((m == CONST).all())]
    batch = [letter for letter in rhs if all(letter in terms[i] for i in active)]
    flat = []
    for i in active:
        t, full = terms[i], maps[i].expand(st.shape(operands[i]))
        order = [t.index(letter) for letter in batch] + [j for j, letter in enumerate(t) if letter not in batch]
        flat.append(full.permute(order).reshape(*[full.shape[t.index(letter)] for letter in batch], -1).unsqueeze(-1))
    entries = compress(union_entries(st, flat, len(batch)).reshape([out.shape[rhs.index(c)] for c in batch]))
    varying = {letter for letter, n in zip(batch, entries.shape) if n > 1}
    if any(set(terms[i]) & varying for i in range(len(operands)) if i not in active):
        return opaque(st, node, "einsum with a constant operand along entries that carry channels")
    # batch letters are in the output's order: the entries' map, with 1 for the other letters
    return compress(entries.reshape([entries.shape[batch.index(letter)] if letter in batch else 1 for letter in rhs]))


register(
    OpSpec("matmul", Match(functions=(torch.matmul, operator.matmul, torch.bmm), methods=("matmul", "bmm"),
                           aten=("matmul", "bmm")), rule_matmul),
    OpSpec("einsum", Match(functions=(torch.einsum,), aten=("einsum",)), rule_einsum),
    OpSpec("scaled_dot_product_attention", Match(functions=(F.scaled_dot_product_attention,),
                                                 aten=("scaled_dot_product_attention",)), rule_sdpa),
)
