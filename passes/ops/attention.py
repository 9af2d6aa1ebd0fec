"""Products of two activations (attention's q @ k^T and attn @ v).

Everything feeding one batch entry of the product goes together: for attention laid out as
[batch, heads, tokens, width], one entry is one head, so q, k and v lose whole heads at once.
A product with a weight tensor is a linear layer in disguise: it is not followed (nn.Linear is).
"""
from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from rwdeploy.passes.channel_state import CONST, AnalysisState, TensorMeta, compress
from rwdeploy.passes.ops.common import aligned, opaque, state_tensor
from rwdeploy.passes.ops.spec import Match, OpSpec, register


def rule_matmul(st: AnalysisState, node: fx.Node) -> Any:
    a, b = node.args[0], node.args[1]
    out = st.values[node.name]
    if not all(isinstance(v, fx.Node) and isinstance(st.values.get(v.name), TensorMeta) for v in (a, b)):
        return opaque(st, node)
    if state_tensor(st.gm, a) is not None or state_tensor(st.gm, b) is not None:
        return opaque(st, node, "matmul with a weight tensor (use nn.Linear)")
    ma, mb = st.maps[a.name], st.maps[b.name]
    if ma.dim() < 2 or mb.dim() < 2 or not isinstance(out, TensorMeta):
        return opaque(st, node)
    nb = len(out.shape) - 2
    # union, for every (broadcast) batch entry, all classes of a[entry] and b[entry]
    ga = aligned(ma, nb + 2).flatten(-2)
    gb = aligned(mb, nb + 2).flatten(-2)
    batch = torch.broadcast_shapes(ga.shape[:-1], gb.shape[:-1])
    ga = ga.expand(*batch, ga.shape[-1]).reshape(-1, ga.shape[-1])
    gb = gb.expand(*batch, gb.shape[-1]).reshape(-1, gb.shape[-1])
    rep = []
    for i in range(ga.shape[0]):
        ids = torch.cat([ga[i], gb[i]])
        st.uf.union_all(ids)
        known = ids[ids >= 0]
        rep.append(int(known.min()) if known.numel() else CONST)
    return compress(torch.tensor(rep, dtype=torch.long).reshape(*batch, 1, 1))


register(OpSpec("matmul", Match(functions=(torch.matmul, operator.matmul, torch.bmm), methods=("matmul", "bmm"),
                                aten=("matmul", "bmm")), rule_matmul))
