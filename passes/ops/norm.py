"""Normalisations: batch norm, instance norm, group norm (nn, F, aten), layer norm.

Batch and instance norm treat each channel on its own: their per-channel tensors follow the
channel. Group norm's statistics are per group of channels, so a group goes or stays whole.
Layer norm normalises over the trailing dims: over channels it couples them all (removing
one would change the others' statistics), so it pins them.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from rwdeploy.passes.channel_state import AnalysisState, along, varying_dims
from rwdeploy.passes.ops.common import arg, channels_on_dim1, op_name, opaque, single_input
from rwdeploy.passes.ops.layer import LayerView, read_layer
from rwdeploy.passes.ops.spec import Match, OpSpec, register


class ChannelNormView(LayerView):
    """A norm whose tensors are per channel: keep_in == keep_out."""

    roles, required = ("weight", "bias", "running_mean", "running_var"), ()
    count = "num_features"  # the module attribute holding the channel count
    statistics = "channel"  # its statistics are per "channel", or per "group" of channels

    def shrink(self, keep_in: torch.Tensor, keep_out: torch.Tensor) -> None:
        for role in self.tensors:
            self.cut(role, 0, keep_in)
        self.form.set(self.count, int(keep_in.sum()))

    def updates_statistics(self) -> bool:
        """Running statistics updated in forward (training mode): not a fixed function."""
        return bool(self.setting("training", False))


class BatchNormView(ChannelNormView):
    generic_type = "BatchNorm"
    call_args = {"torch": ("input", "running_mean", "running_var", "weight", "bias", "training"),
                 "aten": ("input", "weight", "bias", "running_mean", "running_var", "training")}


class InstanceNormView(ChannelNormView):
    generic_type = "InstanceNorm"
    call_args = {"torch": ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats"),
                 "aten": ("input", "weight", "bias", "running_mean", "running_var", "use_input_stats")}
    implied = {"use_input_stats": True}

    def updates_statistics(self) -> bool:
        return "running_mean" in self.tensors and bool(self.setting("use_input_stats", self.setting("training")))


class GroupNormView(ChannelNormView):
    roles, count, statistics, generic_type = ("weight", "bias"), "num_channels", "group", "GroupNorm"
    call_args = ("input", "num_groups", "weight", "bias")

    def updates_statistics(self) -> bool:
        return False

    def shrink(self, keep_in: torch.Tensor, keep_out: torch.Tensor) -> None:
        per = len(keep_in) // self.setting("num_groups")
        super().shrink(keep_in, keep_out)
        self.form.set("num_groups", int(keep_in.sum()) // per)


def per_channel_rule(layer: type[ChannelNormView], noun: str) -> Any:
    """The rule of a norm whose tensors follow its channels on dim 1."""

    def rule(st: AnalysisState, node: fx.Node) -> Any:
        view, m, why = read_layer(st, node, layer, noun)
        if why:
            return opaque(st, node, why)
        if not channels_on_dim1(m):
            return opaque(st, node, f"{noun} input whose channels are not on dim 1")
        if view.updates_statistics():
            return opaque(st, node, f"{noun} in training mode (call .eval())")
        vec = along(m, 1, st.shape(view.input)[1])
        if view.statistics == "group":
            groups = view.setting("num_groups")
            if not isinstance(groups, int):
                return opaque(st, node)
            for ids in vec.reshape(groups, -1):
                st.uf.union_all(ids)  # statistics are per group: whole groups go or stay
        for key in view.tensors.values():
            st.add_slice(key, 0, torch.arange(len(vec)), vec, "follower", node.name)
        return m
    return rule


def rule_layer_norm(st: AnalysisState, node: fx.Node) -> Any:
    got = single_input(st, node)
    if got is None:
        return opaque(st, node)
    x, m = got
    if node.op == "call_module":
        k = len(st.module(node).normalized_shape)
    else:
        shape = arg(node, 1, "normalized_shape")
        if not isinstance(shape, (tuple, list, torch.Size)):
            return opaque(st, node)
        k = len(shape)
    if any(d >= m.dim() - k for d in varying_dims(m)):
        st.pin(m, f"{op_name(node)}: layer norm over channels; removing one would change the "
                  f"statistics of the others")
    return m


register(
    OpSpec("batch_norm", Match(modules=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), functions=(F.batch_norm,),
                               aten=("batch_norm",)), per_channel_rule(BatchNormView, "batch norm"),
           layer=BatchNormView),
    OpSpec("instance_norm", Match(modules=(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
                                  functions=(F.instance_norm,), aten=("instance_norm",)),
           per_channel_rule(InstanceNormView, "instance norm"), layer=InstanceNormView),
    OpSpec("group_norm", Match(modules=(nn.GroupNorm,), functions=(F.group_norm,), aten=("group_norm",)),
           per_channel_rule(GroupNormView, "group norm"), layer=GroupNormView),
    OpSpec("layer_norm", Match(modules=(nn.LayerNorm,), functions=(F.layer_norm,), aten=("layer_norm",)),
           rule_layer_norm),
)
