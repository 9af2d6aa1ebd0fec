"""Op specs by family, and `classify`: which spec a graph node's op is, by registry lookup.

Adding an op is one spec in the family file it belongs to (or a new family file imported
below) plus a test network in tests/nets.py. See `spec.OpSpec` and `layer.LayerView`.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from rwdeploy.passes.channel_state import CONST, AnalysisState, has_tensor
# each family module registers its specs when imported
from rwdeploy.passes.ops import (  # noqa: F401
    attention, conv, elementwise, graph, indexing, linear, norm, pooling, reduce, shape,
)
from rwdeploy.passes.ops.layer import LayerView
from rwdeploy.passes.ops.spec import SPECS, OpSpec, matching, module_spec

__all__ = ["SPECS", "LayerView", "OpSpec", "classify", "layer_view", "module_layer_view"]


def classify(node: fx.Node, st: AnalysisState) -> OpSpec:
    """The spec the analysis applies to `node` (values it recorded in `st` decide the
    structural cases: shape arithmetic, constants); `opaque` for an op no spec claims."""
    if node.op in ("placeholder", "get_attr", "output"):
        return SPECS[node.op]
    meta = st.values.get(node.name)
    if not has_tensor(meta) and node.op != "call_module":
        if node.op == "call_method" and node.target in ("item", "tolist"):
            return SPECS["opaque"]
        return SPECS["shape_value"]  # sizes, dims, ints: reading shapes never couples channels
    tensor_inputs = [a for a in node.all_input_nodes if has_tensor(st.values.get(a.name))]
    if tensor_inputs and all(_is_const(st.maps.get(a.name)) for a in tensor_inputs) and node.op != "call_module":
        return SPECS["constant"]
    if node.op == "call_module" and type(st.module(node)).__name__ == "GuardsFn" and not has_tensor(meta):
        return SPECS["shape_value"]  # torch.export's input-shape guards: they read shapes only
    return matching(node, st.gm) or SPECS["opaque"]


def _is_const(m: Any) -> bool:
    if isinstance(m, torch.Tensor):
        return bool((m == CONST).all())
    if isinstance(m, (tuple, list)):
        return all(_is_const(x) for x in m)
    return m is None


def layer_view(gm: nn.Module, node: fx.Node) -> LayerView | None:
    """The LayerView of a weight-bearing op's node (None for other ops, or a call whose
    tensors are not the graph's parameters)."""
    spec = matching(node, gm) if node.op.startswith("call_") else None
    return spec.layer.of(gm, node) if spec is not None and spec.layer is not None else None


def module_layer_view(model: nn.Module, path: str, module: nn.Module) -> LayerView | None:
    """The LayerView of a weight-bearing submodule `module` of `model` at `path`."""
    spec = module_spec(module)
    return spec.layer.of_module(model, path, module) if spec is not None and spec.layer is not None else None
