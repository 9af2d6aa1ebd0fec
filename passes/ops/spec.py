"""What an op spec is, and the registry: which spec a graph node's op is, by lookup.

An `OpSpec` is all the channel passes know about one op, in every form it takes in a graph
(module type, torch function, tensor method, ATen overload). Family modules (`ops/conv.py`,
`ops/norm.py`, ...) `register` their specs; nothing else switches on which op a node runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import fx, nn

from rwdeploy.passes.channel_state import CONST, AnalysisState, has_tensor
from rwdeploy.passes.ops.common import base_name  # noqa: F401  (re-exported for the family files)

if TYPE_CHECKING:
    from rwdeploy.passes.ops.layer import LayerView

Rule = Callable[[AnalysisState, fx.Node], Any]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Match:
    """The forms of an op: module types (subclasses match too), torch / F / operator callables,
    tensor method names, ATen op names (every overload of `aten.<name>`)."""

    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    aten: tuple[str, ...] = ()


class ChannelArgs:
    """Arguments that name channel counts or offsets (split sizes, slice bounds, view sizes),
    read by both passes side by side so that they agree. Both are called when argument 0 is a
    tensor value `x` (class map `m`, shape `shape`). `record` (analysis) notes what each piece
    must keep, False when the arguments are of a form `rewrite` cannot handle (the op is then
    pinned); `rewrite` (removal) renames them for the kept channels, True when it did."""

    def record(self, st: AnalysisState, node: fx.Node, x: fx.Node, m: torch.Tensor, shape: Shape) -> bool:
        return True

    def rewrite(self, node: fx.Node, sel: Any, x: fx.Node, shape: Shape) -> bool:
        return False


@dataclass(frozen=True)
class OpSpec:
    """rule(state, node) -> the class map(s) of the node's output (`channel_state`), recording
                         slices, unions and pins; `common.opaque(...)` for a form it cannot follow.
    channel_args       -> the op's ChannelArgs, if it names channel counts or offsets.
    layer              -> the LayerView class of a weight-bearing op (`layer.of(gm, node)`)."""

    name: str
    match: Match
    rule: Rule
    channel_args: ChannelArgs | None = None
    layer: type[LayerView] | None = None


SPECS: dict[str, OpSpec] = {}
_BY_MODULE: dict[type, OpSpec] = {}
_BY_FUNCTION: dict[Callable, OpSpec] = {}
_BY_METHOD: dict[str, OpSpec] = {}
_BY_ATEN: dict[str, OpSpec] = {}


def register(*specs: OpSpec) -> None:
    """Add specs. A name or form claimed by two specs is a programming error: nothing is added."""
    claims = [(SPECS, spec.name, spec) for spec in specs]
    for spec in specs:
        for table, keys in ((_BY_MODULE, spec.match.modules), (_BY_FUNCTION, spec.match.functions),
                            (_BY_METHOD, spec.match.methods), (_BY_ATEN, spec.match.aten)):
            claims += [(table, key, spec) for key in keys]
    for table, key, spec in claims:
        if table.get(key, spec) is not spec:
            raise ValueError(f"{key!r} is claimed by op specs {table[key].name!r} and {spec.name!r}")
    for table, key, spec in claims:
        table[key] = spec


def module_spec(mod: nn.Module) -> OpSpec | None:
    return next((_BY_MODULE[c] for c in type(mod).__mro__ if c in _BY_MODULE), None)


def matching(node: fx.Node, gm: nn.Module) -> OpSpec | None:
    """The spec whose Match covers the op `node` runs, or None."""
    if node.op == "call_module":
        return module_spec(gm.get_submodule(node.target))
    if node.op == "call_method":
        return _BY_METHOD.get(node.target)
    if node.op != "call_function":
        return None
    if isinstance(node.target, torch._ops.OpOverload):
        return _BY_ATEN.get(base_name(node))
    return _BY_FUNCTION.get(node.target)


def classify(node: fx.Node, st: AnalysisState) -> OpSpec:
    """The spec the analysis applies to `node`: the values it recorded decide the structural
    cases (shape arithmetic, constants); `opaque` for an op no spec claims."""
    if node.op in ("placeholder", "get_attr", "output"):
        return SPECS[node.op]
    meta = st.values.get(node.name)
    if not has_tensor(meta) and node.op != "call_module":
        if node.op == "call_method" and node.target in ("item", "tolist"):
            return SPECS["opaque"]
        return SPECS["shape_value"]  # sizes, dims, ints: reading shapes never couples channels
    tensor_inputs = [a for a in node.all_input_nodes if has_tensor(st.values.get(a.name))]
    spec = matching(node, st.gm)
    if tensor_inputs and all(_is_const(st.maps.get(a.name)) for a in tensor_inputs) and node.op != "call_module" \
            and (spec is None or spec.layer is None):  # a layer on constants still makes channels
        return SPECS["constant"]
    if node.op == "call_module" and type(st.module(node)).__name__ == "GuardsFn" and not has_tensor(meta):
        return SPECS["shape_value"]  # torch.export's input-shape guards: they read shapes only
    return spec or SPECS["opaque"]


def _is_const(m: Any) -> bool:
    if isinstance(m, torch.Tensor):
        return bool((m == CONST).all())
    return all(_is_const(x) for x in m) if isinstance(m, (tuple, list)) else m is None


def layer_view(gm: nn.Module, node: fx.Node) -> LayerView | None:
    """The LayerView of a weight-bearing op's node (None for other ops, or for a call whose
    tensors are not parameters of `gm`)."""
    spec = matching(node, gm)
    return spec.layer.of(gm, node) if spec is not None and spec.layer is not None else None


def module_layer_view(model: nn.Module, path: str, module: nn.Module) -> LayerView | None:
    """The LayerView of `model`'s weight-bearing submodule `module` (at `path`)."""
    spec = module_spec(module)
    return spec.layer.of_module(model, path, module) if spec is not None and spec.layer is not None else None
