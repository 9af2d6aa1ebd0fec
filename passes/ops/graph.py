"""Graph values that carry no channel op: inputs, parameters, outputs, constants, unknown ops.

Model inputs and outputs are pinned (their channels are the model's interface). A value
computed from constants only (parameters, factories) is a constant: it has no channels of
its own, and `channel_provenance` follows which of its dims are a parameter's dims. Every op
no family claims is `opaque`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx

from rwdeploy.passes import channel_provenance as provenance
from rwdeploy.passes.channel_state import AnalysisState, TensorMeta, const_map
from rwdeploy.passes.ops.common import opaque
from rwdeploy.passes.ops.spec import Match, OpSpec, base_name, register

FACTORY_FUNCTIONS = (torch.zeros, torch.ones, torch.full, torch.arange, torch.tensor, torch.eye,
                     torch.linspace, torch.zeros_like, torch.ones_like, torch.full_like)


def rule_placeholder(st: AnalysisState, node: fx.Node) -> Any:
    return st.pinned_fresh(st.values[node.name], f"model input {node.name}")


def rule_get_attr(st: AnalysisState, node: fx.Node) -> Any:
    meta = st.values[node.name]
    provenance.start(st, node)
    return const_map(len(meta.shape)) if isinstance(meta, TensorMeta) else None


def rule_output(st: AnalysisState, node: fx.Node) -> Any:
    for a in node.all_input_nodes:
        st.pin(st.maps.get(a.name), "model output")
    return None


def rule_constant(st: AnalysisState, node: fx.Node) -> Any:
    provenance.follow(st, node, base_name(node))
    return _const_like(st.values[node.name])


def _const_like(meta: Any) -> Any:
    if isinstance(meta, TensorMeta):
        return const_map(len(meta.shape))
    if isinstance(meta, (tuple, list)) and not isinstance(meta, torch.Size):
        return tuple(_const_like(m) for m in meta)
    return None


register(
    OpSpec("placeholder", Match(), rule_placeholder),
    OpSpec("get_attr", Match(), rule_get_attr),
    OpSpec("output", Match(), rule_output),
    OpSpec("constant", Match(functions=FACTORY_FUNCTIONS), rule_constant),
    OpSpec("opaque", Match(), opaque),
)
