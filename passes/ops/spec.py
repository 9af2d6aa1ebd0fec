"""What an op spec is, and the registry that classifies a graph node by looking its op up.

An `OpSpec` is everything the channel passes know about one op, for every form the op takes
in a graph: a module type, a torch function, a tensor method, an ATen overload. Family
modules (`ops/conv.py`, `ops/norm.py`, ...) `register` their specs; nothing else switches on
which op a node runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import fx, nn

if TYPE_CHECKING:
    from rwdeploy.passes.channel_selection import Selection
    from rwdeploy.passes.channel_state import AnalysisState
    from rwdeploy.passes.ops.layer import LayerView

Rule = Callable[["AnalysisState", fx.Node], Any]
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Match:
    """The forms of one op: module types (subclasses match too), torch/F/operator callables,
    tensor method names, and ATen op names (every overload of `aten.<name>`)."""

    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    aten: tuple[str, ...] = ()


class ChannelArgs:
    """Arguments that name channel counts or offsets (split sizes, slice bounds, view sizes).

    The two sides sit together so that they agree. Both are called when the op's argument 0
    is a tensor value `x` (its class map `m`, its shape): `record` (analysis) notes what each
    piece must keep and returns False when the arguments are of a form `rewrite` could not
    handle (the op is then pinned); `rewrite` (removal pass) renames them for the kept
    channels and returns True when it changed the node.
    """

    def record(self, st: AnalysisState, node: fx.Node, x: fx.Node, m: torch.Tensor, shape: Shape) -> bool:
        return True

    def rewrite(self, node: fx.Node, sel: Selection, x: fx.Node, shape: Shape) -> bool:
        return False


@dataclass(frozen=True)
class OpSpec:
    """One op: how channels flow through it, the arguments that name channels, its weights.

    rule(state, node) -> class map(s) of the output (see `channel_state`), recording slices,
                         unions and pins; it returns `common.opaque(...)` for a form it cannot follow.
    channel_args       -> ChannelArgs of the op, or None.
    layer              -> the LayerView class of a weight-bearing op: `layer.of(gm, node)` views
                         a node (None when a tensor it reads is not a parameter, e.g. a weight
                         computed in forward()), `layer.of_module(model, path, module)` a module.
    """

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
    """Add specs; a name or a form claimed by two specs is a programming error (nothing of the
    specs is added then)."""
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


def base_name(node: fx.Node) -> str:
    """'conv2d' for aten.conv2d.default, F.conv2d and .conv2d(); the op's plain name."""
    t = node.target
    if node.op == "call_method":
        return t
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__.lstrip("_")
    return getattr(t, "__name__", "")


def module_spec(mod: nn.Module) -> OpSpec | None:
    for cls in type(mod).__mro__:
        if cls in _BY_MODULE:
            return _BY_MODULE[cls]
    return None


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
