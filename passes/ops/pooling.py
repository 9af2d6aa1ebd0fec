"""Pooling, padding, resizing, im2col and col2im: per channel, over the trailing spatial dims.

Channels pass through unchanged as long as they do not sit on a spatial dim. Max pooling that
also returns indices (`aten.adaptive_max_pool2d` always does) gives both outputs the input's
classes: an index is per channel too.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from rwdeploy.passes.channel_state import CONST, AnalysisState, TensorMeta, compress, varying_dims
from rwdeploy.passes.ops.common import arg, op_name, opaque, single_input
from rwdeploy.passes.ops.spec import Match, OpSpec, base_name, register


def spatial_rule(rank: Callable[[AnalysisState, fx.Node, int], int | set[int]]) -> Callable[[AnalysisState, fx.Node], Any]:
    """The rule of an op over the last `rank(state, node, input rank)` dims (or over the dims,
    counted from the end as -1, -2, ..., of the set it returns)."""

    def rule(st: AnalysisState, node: fx.Node) -> Any:
        got = single_input(st, node)
        out = st.values[node.name]
        outs = out if isinstance(out, tuple) else (out,)
        if got is None or not all(isinstance(o, TensorMeta) and len(o.shape) == got[1].dim() for o in outs):
            return opaque(st, node, "pooling/padding with an unexpected signature")
        x, m = got
        over = rank(st, node, len(st.shape(x)))
        over = over if isinstance(over, set) else set(range(-over, 0))
        if any(d - m.dim() in over for d in varying_dims(m)):
            return opaque(st, node, "pooling/padding over a dim that carries channels")
        for a in node.all_input_nodes[1:]:
            st.pin(st.maps.get(a.name), f"{op_name(node)}: extra tensor argument")
        return tuple(m for _ in outs) if isinstance(out, tuple) else m
    return rule


def _rank_from_name(st: AnalysisState, node: fx.Node, ndim: int) -> int:
    """`max_pool2d`, `nn.AvgPool3d`, ...: the rank in the name; else every dim after N, C."""
    name = type(st.module(node)).__name__ if node.op == "call_module" else base_name(node)
    return next((k for k in (1, 2, 3) if name.endswith(f"{k}d")), ndim - 2)


def _padded_dims(st: AnalysisState, node: fx.Node, ndim: int) -> set[int]:
    """The dims (from the end) a pad widens: pairs (before, after) from the last dim back;
    a (0, 0) pair leaves its dim alone (Swin pads H and W of a channels-last value)."""
    pad = st.module(node).padding if node.op == "call_module" else arg(node, 1, "pad")
    pad = (pad,) * (2 * (ndim - 2)) if isinstance(pad, int) else tuple(pad)
    return {-(i // 2) - 1 for i in range(0, len(pad), 2) if tuple(pad[i:i + 2]) != (0, 0)}


def _im2col_args(st: AnalysisState, node: fx.Node) -> tuple[Any, Any, Any, Any]:
    if node.op == "call_module":
        mod = st.module(node)
        return mod.kernel_size, mod.dilation, mod.padding, mod.stride
    return (arg(node, 1, "kernel_size"), arg(node, 2, "dilation", 1), arg(node, 3, "padding", 0),
            arg(node, 4, "stride", 1))


def rule_im2col(st: AnalysisState, node: fx.Node) -> Any:
    """F.unfold / nn.Unfold / aten.im2col: (N, C, H, W) -> (N, C*kh*kw, L), where row
    c*kh*kw + j copies channel c at kernel offset j or the zero padding. T2T-ViT, TNT and VOLO
    cut patches this way. A map that varies along channels only repeats each channel kh*kw
    times; any other goes through the same gather (ids shifted so that the padding's zeros
    stay apart from them, and become constants)."""
    got = single_input(st, node)
    out = st.values[node.name]
    if got is None or not isinstance(out, TensorMeta) or len(st.shape(got[0])) != 4:
        return opaque(st, node, "im2col with an unexpected signature")
    x, m = got
    kernel, dilation, padding, stride = _im2col_args(st, node)
    if set(varying_dims(m)) <= {1}:
        # channels only: every element of row c*kh*kw + j belongs to channel c, the padding's
        # zeros included (they go with the row), so the map varies along the rows alone
        channels = st.shape(x)[1]
        per_channel = m.reshape(-1).expand(channels) if m.shape[1] == 1 else m.reshape(-1)
        return compress(per_channel.repeat_interleave(out.shape[1] // channels).reshape(1, -1, 1))
    shifted = m.expand(st.shape(x)).to(torch.float64) + 2  # ids are exact in float64 up to 2**53
    cols = F.unfold(shifted, kernel, dilation=dilation, padding=padding, stride=stride).round().long() - 2
    cols[cols == -2] = CONST
    return compress(cols)


def rule_col2im(st: AnalysisState, node: fx.Node) -> Any:
    """F.fold / nn.Fold / aten.col2im, the inverse of im2col: (N, C*kh*kw, L) -> (N, C, H, W),
    channel c summing its kh*kw rows over the overlapping windows (VOLO folds its outlook
    attention back). A channel's rows go together, so their classes are unified and the
    output channel takes that class."""
    got = single_input(st, node)
    out = st.values[node.name]
    if got is None or not isinstance(out, TensorMeta) or len(st.shape(got[0])) != 3 or len(out.shape) != 4:
        return opaque(st, node, "col2im with an unexpected signature")
    x, m = got
    if not set(varying_dims(m)) <= {1}:
        return opaque(st, node, "col2im of a value whose classes vary along positions")
    channels, rows = out.shape[1], st.shape(x)[1]
    blocks = m.reshape(-1).expand(rows).reshape(channels, rows // channels)
    for block in blocks:
        st.uf.union_all(block)
    return compress(st.canon(blocks[:, 0]).expand(channels).reshape(1, channels, 1, 1))


register(
    OpSpec("pool", Match(
        modules=(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                 nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                 nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d),
        functions=(F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
                   F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
                   F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool1d, F.lp_pool2d),
        aten=("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d",
              "adaptive_max_pool2d", "adaptive_max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
              "max_pool1d", "max_pool2d", "max_pool3d")), spatial_rule(_rank_from_name)),
    OpSpec("resize", Match(modules=(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
                           functions=(F.interpolate,),
                           aten=("upsample_nearest2d", "upsample_bilinear2d", "upsample_bicubic2d",
                                 "upsample_bilinear2d_aa", "upsample_bicubic2d_aa")),
           spatial_rule(_rank_from_name)),
    OpSpec("pad", Match(modules=(nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
                                 nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d),
                        functions=(F.pad,), aten=("pad", "constant_pad_nd")), spatial_rule(_padded_dims)),
    OpSpec("im2col", Match(modules=(nn.Unfold,), functions=(F.unfold,), aten=("im2col",)), rule_im2col),
    OpSpec("col2im", Match(modules=(nn.Fold,), functions=(F.fold,), aten=("col2im",)), rule_col2im),
)
