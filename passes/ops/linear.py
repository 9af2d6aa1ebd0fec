"""Linear layers: nn.Linear, F.linear, aten.linear.

A linear layer reads channels on its input's last dim through weight dim 1 and makes fresh
output channels on weight dim 0. Its input may be a flattened conv activation: then one
input channel is a run of columns (channel x spatial size), which the class map already says.
A linear layer over a dim that carries no channels (token mixing in MLP-Mixer, ResMLP, gMLP:
tokens on the last dim, channels on another) acts on each channel alone: the channels pass
through, and its rows are token positions, not channels.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from rwdeploy.passes.channel_state import CONST, AnalysisState, along, varying_dims
from rwdeploy.passes.ops.common import opaque
from rwdeploy.passes.ops.layer import LayerView, keep, read_layer, replace_tensor
from rwdeploy.passes.ops.spec import Match, OpSpec, register


class LinearView(LayerView):
    kernel = True
    in_dim = out_dim = -1
    generic_type = "Linear"

    def macs(self, inp: torch.Tensor | None, out: torch.Tensor) -> int:
        fout, fin = self.weight.shape  # leading dims beyond batch (tokens) multiply the work
        return int(out.numel() // out.shape[0] * fin) if out.dim() > 1 else int(fin * fout)

    def shrink(self, keep_in: torch.Tensor, keep_out: torch.Tensor) -> None:
        replace_tensor(self.gm, self.tensors["weight"], keep(keep(self.weight, 0, keep_out), 1, keep_in))
        self.cut("bias", 0, keep_out)
        self.form.set("in_features", int(keep_in.sum()))
        self.form.set("out_features", int(keep_out.sum()))


def channel_vector(st: AnalysisState, m: torch.Tensor, dim: int, size: int) -> torch.Tensor | None:
    """The class of each index along `dim`. Where other dims hold several classes at one
    index (tokens of two producers concatenated: PiT's class token made by a Linear, its
    patch tokens by a conv) the layer reads them as one channel: they are unified.

    Positions holding a constant (a class token concatenated in front of the tokens) may
    share an index with a class only when that class is pinned: a kept channel keeps them.
    """
    dim = dim % m.dim()
    others = [d for d in varying_dims(m) if d != dim]
    if not others:
        return along(m, dim, size)
    cols = m.movedim(dim, 0).reshape(m.shape[dim], -1)
    vec = []
    for col in cols:
        ids = col.unique()
        known = ids[ids >= 0]
        st.uf.union_all(known)
        if len(known) and len(ids) > len(known) and not st.is_pinned(st.uf.find(int(known[0]))):
            return None
        vec.append(int(known[0]) if len(known) else CONST)
    return along(torch.tensor(vec, dtype=torch.long), 0, size)


def rule_linear(st: AnalysisState, node: fx.Node) -> Any:
    view, m, why = read_layer(st, node, LinearView, "linear")
    if why or view.weight.dim() != 2:
        return opaque(st, node, why or "linear layer whose weight is not a matrix")
    fout, fin = view.weight.shape
    last = m.dim() - 1
    if m.shape[last] == 1 and varying_dims(m):  # channels elsewhere, tokens mixed: per channel
        return m
    vec = channel_vector(st, m, last, fin)
    if vec is None:
        return opaque(st, node, "linear input whose channels are not on the last dim")
    weight, bias = view.tensors["weight"], view.tensors.get("bias")
    st.add_slice(weight, 1, torch.arange(fin), vec, "consumer", node.name)
    st.fold_sites.append(node.name)
    out = st.fresh(fout)
    st.add_slice(weight, 0, torch.arange(fout), out, "producer", node.name)
    if bias is not None:
        st.add_slice(bias, 0, torch.arange(fout), out, "follower", node.name)
    return out.reshape([1] * last + [fout])


register(OpSpec("linear", Match(modules=(nn.Linear,), functions=(F.linear,), aten=("linear",)), rule_linear,
                layer=LinearView))
