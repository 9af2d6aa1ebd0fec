"""Convolutions: nn.Conv{1,2,3}d / ConvTranspose{1,2,3}d, F.conv* / F.conv_transpose*,
aten.conv* / conv_transpose* / convolution.

A convolution reads its input channels through weight dim 1 (transposed: dim 0) and makes
fresh output channels on weight dim 0 (transposed: dim 1). A grouped convolution reads within
its group (consumer slices with a row span) and loses the same number of channels in every
group. A depthwise one passes input channel c to its outputs c*k..c*k+k-1 alone: they are a
new *segment* of c's channel (`channel_state.Link`), produced by their weight rows. Input
and outputs go together, but zero rows make the outputs constant whatever the input holds,
so the channel goes when its input is read by nothing else (`channel_selection.candidates`).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from rwdeploy.passes.channel_constants import ConvGeometry
from rwdeploy.passes.channel_state import AnalysisState, Link, along, varying_dims
from rwdeploy.passes.ops.common import opaque
from rwdeploy.passes.ops.layer import LayerView, keep, read_layer, replace_tensor
from rwdeploy.passes.ops.spec import Match, OpSpec, base_name, register

CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
TRANSPOSED_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding",
                    "groups")


def conv_weight(w: torch.Tensor, groups: int, keep_in: torch.Tensor,
                keep_out: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A conv weight [O, C/g, k...] cut to the kept channels, and its new group count."""
    cin = w.shape[1] * groups
    if groups == 1:
        return keep(keep(w, 0, keep_out), 1, keep_in), 1
    if groups == cin:  # depthwise: one conv group per remaining channel
        return keep(w, 0, keep_out), int(keep_in.sum())
    per_in, per_out = cin // groups, w.shape[0] // groups
    parts = []
    for j in range(groups):
        rows = keep(w[j * per_out:(j + 1) * per_out], 0, keep_out[j * per_out:(j + 1) * per_out])
        parts.append(keep(rows, 1, keep_in[j * per_in:(j + 1) * per_in]))
    return torch.cat(parts, 0), groups


class ConvView(LayerView):
    kernel = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        w, self.groups = self.weight, self.setting("groups", 1)
        self.transposed, self.spatial = bool(self.setting("transposed", False)), w.dim() - 2
        self.weight_dims = (1, 0) if self.transposed else (0, 1)
        self.generic_type = f"{'ConvTranspose' if self.transposed else 'Conv'}{self.spatial}d"
        g = self.groups if isinstance(self.groups, int) else 1
        self.in_channels = w.shape[0] if self.transposed else w.shape[1] * g
        self.out_channels = w.shape[1] * g if self.transposed else w.shape[0]

    @classmethod
    def arguments(cls, node: fx.Node) -> tuple[tuple[str, ...], dict[str, Any]]:
        name = base_name(node)
        if name == "convolution":
            return CONVOLUTION_ARGS, {}
        if name.startswith("conv_transpose"):
            return TRANSPOSED_ARGS, {"transposed": True}
        return CONV_ARGS, {}

    def macs(self, inp: torch.Tensor | None, out: torch.Tensor) -> int:
        # Each output element of a (grouped) convolution sums over in/groups * kernel elements;
        # for a transposed conv, count per input element instead (same products).
        w = self.weight
        per = w.shape[1] * math.prod(w.shape[2:])
        if self.transposed and inp is not None:
            return int(inp.numel() // inp.shape[0] * per)
        return int(out.numel() // out.shape[0] * per)

    def shrink(self, keep_in: torch.Tensor, keep_out: torch.Tensor) -> None:
        if self.transposed:  # groups == 1 (the analysis pins grouped transposed convolutions)
            new = keep(keep(self.weight, 0, keep_in), 1, keep_out)
        else:
            new, groups = conv_weight(self.weight, self.groups, keep_in, keep_out)
            if groups != self.groups:  # depthwise
                self.form.set("groups", groups)
        replace_tensor(self.gm, self.tensors["weight"], new)
        self.cut("bias", 0, keep_out)
        self.form.set("in_channels", int(keep_in.sum()))
        self.form.set("out_channels", int(keep_out.sum()))

    def geometry(self) -> ConvGeometry | None:
        """What the convolution does besides its weight, for border kernels (zero padding only)."""
        if self.transposed or self.setting("padding_mode", "zeros") != "zeros":
            return None
        return ConvGeometry(self.weight.detach().double(), self.groups, self.setting("stride", 1),
                            self.setting("padding", 0), self.setting("dilation", 1))


def rule_conv(st: AnalysisState, node: fx.Node) -> Any:
    view, m, why = read_layer(st, node, ConvView, "convolution")
    if why or not isinstance(view.groups, int):
        return opaque(st, node, why or "convolution with computed groups")
    if m.dim() != view.spatial + 2 or any(d != 1 for d in varying_dims(m)):
        return opaque(st, node, "convolution input whose channels are not on dim 1")
    if view.transposed and view.groups != 1:
        return opaque(st, node, "transposed convolution with groups")
    cin, cout, g = view.in_channels, view.out_channels, view.groups
    weight, bias = view.tensors["weight"], view.tensors.get("bias")
    vec, ones = along(m, 1, cin), [1] * view.spatial
    if g == cin and g > 1:  # depthwise (with channel multiplier k): outputs c*k.. read input c only
        k = cout // cin
        fresh = st.fresh(cin)  # the output channel is a new segment of input channel c (see Link)
        out = fresh.repeat_interleave(k)
        st.add_slice(weight, 0, torch.arange(cout), out, "producer", node.name)
        if bias is not None:
            st.add_slice(bias, 0, torch.arange(cout), out, "follower", node.name)
        st.links.append(Link(vec, fresh, weight, [list(range(c * k, c * k + k)) for c in range(cin)]))
        return out.reshape(1, cout, *ones)
    index, span = torch.arange(cin), None
    if g > 1:  # a grouped conv reads input c in the rows of c's group only
        per_in, per_out = cin // g, cout // g
        group, index = index // per_in, index % per_in
        span = torch.stack([group * per_out, (group + 1) * per_out], 1)
        st.uniform.append(list(vec.reshape(g, -1)))
    w_out, w_in = view.weight_dims
    st.add_slice(weight, w_in, index, vec, "consumer", node.name, span)
    st.fold_sites.append(node.name)
    out = st.fresh(cout)
    st.add_slice(weight, w_out, torch.arange(cout), out, "producer", node.name)
    if bias is not None:
        st.add_slice(bias, 0, torch.arange(cout), out, "follower", node.name)
    if g > 1:
        st.uniform.append(list(out.reshape(g, -1)))
    return out.reshape(1, cout, *ones)


register(OpSpec("conv", Match(
    modules=(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    functions=(F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d),
    aten=("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution")),
    rule_conv, layer=ConvView))
