"""Layer weights computed in forward() from parameters only, folded into parameters.

Weight-standardised convolutions (NF-Net's `ScaledStdConv2d`, BiT's `StdConv2d`) compute their
weight in every forward pass: `F.batch_norm(w.reshape(1, O, -1), training=True) * gain`,
then `F.conv2d(x, that)`. The channel passes read a layer's tensors as parameters, so such a
layer would be opaque. Its weight does not depend on the input, though: evaluated once, it is
a parameter of the same function. `fold_computed_weights` replaces each such computation by a
parameter holding its value: the layer's own weight parameter when the computation reads it
alone (its key stays), else a new `_rw_folded_<layer node>`; then the layer is an ordinary
functional layer, and parameters only the computation read (the gain) are gone. Exactness: the folded value is what every forward computed (the same float
ops, run once); a zero filter stays zero after standardisation ((0 - 0) / sqrt(0 + eps) *
gain = 0), and input channels cut from the folded weight no longer change the other
weights' statistics, as they would if the standardisation ran again on the cut weight.

The channel analysis folds a copy of the graph it is given and the removal pass folds its
working copy the same way (same graph, same names), so the analysis's tensors and nodes are
the removal's. The caller's graph is never changed.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from rwdeploy.passes.ops.common import state_tensor, value_users
from rwdeploy.passes.ops.spec import matching

PREFIX = "_rw_folded_"


def _input_independent(node: fx.Node, gm: nn.Module, memo: dict[str, bool]) -> bool:
    """The node's value depends on parameters and buffers only (no model input)."""
    if node.name in memo:
        return memo[node.name]
    if node.op == "placeholder":
        ok = False
    elif node.op == "get_attr":
        ok = True
    elif node.op in ("call_function", "call_method"):
        ok = all(_input_independent(a, gm, memo) for a in node.all_input_nodes)
    else:  # a submodule call could hold state of its own: left alone
        ok = False
    memo[node.name] = ok
    return ok


def computed_weights(gm: fx.GraphModule) -> dict[str, tuple[fx.Node, str]]:
    """Layer call -> (its weight argument computed from parameters, the role it fills)."""
    memo: dict[str, bool] = {}
    found: dict[str, tuple[fx.Node, str]] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        spec = matching(node, gm)
        if spec is None or spec.layer is None or _input_independent(node, gm, memo):
            continue  # not a layer, or one inside a weight's computation (folded with it)
        names, _ = spec.layer.arguments(node)
        bound = {**dict(zip(names, node.args)), **node.kwargs}
        weight = bound.get("weight")
        if (isinstance(weight, fx.Node) and state_tensor(gm, weight) is None and weight.op != "get_attr"
                and len(value_users(weight)) == 1 and _input_independent(weight, gm, memo)):
            found[node.name] = (weight, "weight")
    return found


class _Capture(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted, self.found = wanted, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.wanted:
            self.found[n.name] = out.detach().clone()
        return out


def fold_computed_weights(gm: fx.GraphModule, example_input: Any) -> dict[str, str]:
    """Replace, in place, every layer weight computed from parameters by a parameter of its
    value (see the module doc). Returns layer node -> the new state_dict key."""
    found = computed_weights(gm)
    if not found:
        return {}
    cap = _Capture(gm, {w.name for w, _ in found.values()})
    with torch.no_grad():
        cap.run(*(example_input if isinstance(example_input, tuple) else (example_input,)))
    keys: dict[str, str] = {}
    by_name = {n.name: n for n in gm.graph.nodes}
    for layer_name, (weight, _) in found.items():
        layer, value = by_name[layer_name], cap.found[weight.name]
        key = _own_source(gm, weight, value) or f"{PREFIX}{layer_name}"
        owner, _, attr = key.rpartition(".")
        module = gm.get_submodule(owner) if owner else gm
        if hasattr(module, attr):
            delattr(module, attr)
        module.register_parameter(attr, nn.Parameter(value, requires_grad=False))
        with gm.graph.inserting_before(layer):
            folded = gm.graph.get_attr(key)
        layer.replace_input_with(weight, folded)
        _erase_unused(gm.graph, weight)
        keys[layer_name] = key
    _delete_unread_parameters(gm)
    gm.graph.lint()
    gm.recompile()
    return keys


def _delete_unread_parameters(gm: fx.GraphModule) -> None:
    """Parameters the folded weights were computed from, now read by nothing: gone (a slim
    model must not carry them into its files)."""
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    for key, _ in list(gm.named_parameters()):
        if key in read or any(key.startswith(f"{m}.") for m in called):
            continue
        owner, _, attr = key.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, attr)


def _own_source(gm: fx.GraphModule, weight: fx.Node, value: torch.Tensor) -> str | None:
    """The parameter the weight is computed from and can take the place of: the one source of
    the same shape, read by this computation only (a standardised conv's own `weight`). Its
    key stays, so masks and the layer's name still find it."""
    inside: set[fx.Node] = set()
    stack = [weight]
    while stack:
        n = stack.pop()
        if n not in inside:
            inside.add(n)
            stack.extend(n.all_input_nodes)
    sources = {n.target for n in inside if n.op == "get_attr" and state_tensor(gm, n) is not None}
    same = [k for k in sources if tuple(state_tensor(gm, next(n for n in inside if n.target == k)).shape)
            == tuple(value.shape)]
    if len(same) != 1:
        return None
    readers = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target == same[0]]
    if any(n not in inside or any(u not in inside for u in value_users(n)) for n in readers):
        return None
    owner = same[0].rpartition(".")[0]
    if any(n.op == "call_module" and n.target == owner for n in gm.graph.nodes):
        return None  # the module itself is called: it reads its weight
    return same[0]


def _erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """Erase `node` and then its inputs that nothing else uses (the weight's computation)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.users or n.op in ("placeholder", "output"):
            continue
        inputs = n.all_input_nodes
        graph.erase_node(n)
        stack.extend(inputs)


def folded_copy(gm: fx.GraphModule, example_input: Any) -> tuple[fx.GraphModule, dict[str, str]]:
    """`gm` itself when nothing is computed, else a folded deep copy (and what was folded)."""
    if not computed_weights(gm):
        return gm, {}
    work = copy.deepcopy(gm)
    return work, fold_computed_weights(work, example_input)
