"""Per-layer statistics of a network at an input shape: params, MACs and zeros.

An analysis: it reads a model and returns data. Layers are the convolutions and linear layers,
read through their op spec's LayerView (`passes/ops`): the modules and, in a GraphModule, the
function / ATen calls reading their weights (a loaded `.pt2`; an `F.linear(x, self.w)` beside
module layers), in the order they run.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn

from rwdeploy.passes.ops import LayerView, layer_view, module_layer_view


@dataclass(frozen=True)
class LayerStats:
    name: str
    type: str
    weight_shape: tuple[int, ...]
    params: int  # weight + bias elements
    macs: int  # multiply-accumulates for one forward pass at the given input
    zero_fraction: float  # of the weight tensor
    zero_filters: int  # output channels whose weights are all zero
    zero_in_channels: int  # input channels (weight dim 1) whose weights are all zero
    out_channels: int
    in_channels: int

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["weight_shape"] = list(self.weight_shape)
        return d


@dataclass(frozen=True)
class Totals:
    layers: int
    params: int  # every parameter of the model, not only the listed layers
    layer_params: int
    macs: int
    zero_weights: int
    weights: int

    @property
    def zero_fraction(self) -> float:
        return self.zero_weights / self.weights if self.weights else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "zero_fraction": self.zero_fraction}


def _stats(view: LayerView, inp: torch.Tensor | None, out: torch.Tensor) -> LayerStats:
    w = view.weight.detach().movedim(view.weight_dims, (0, 1))  # [out, in, ...]
    zero = w == 0
    zero_filters = int(zero.reshape(w.shape[0], -1).all(dim=1).sum())
    zero_in = int(zero.transpose(0, 1).reshape(w.shape[1], -1).all(dim=1).sum()) if w.dim() >= 2 else 0
    frac = float(zero.float().mean()) if w.numel() else 0.0
    params = w.numel() + (view.bias.numel() if view.bias is not None else 0)
    return LayerStats(view.name, view.type, tuple(view.weight.shape), int(params), view.macs(inp, out), frac,
                      zero_filters, zero_in, int(w.shape[0]), int(w.shape[1]) if w.dim() >= 2 else 1)


def _hook_modules(model: nn.Module, found: list[LayerStats]) -> list[Any]:
    """Forward hooks that append each conv / linear submodule's stats to `found` when it runs."""
    def hook_for(view: LayerView):
        def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
            found.append(_stats(view, inp, out))
        return hook

    handles = []
    for name, mod in model.named_modules():
        view = module_layer_view(model, name, mod)
        if view is not None and view.kernel:
            handles.append(mod.register_forward_hook(hook_for(view)))
    return handles


class _CallCollector(fx.Interpreter):
    """Runs a graph, appending the stats of its conv/linear calls whose weights are attributes
    (a .pt2, an `F.linear(x, self.w)`) to `found`; submodule layers append theirs through their
    hooks as they run, so `found` is in execution order. A call on constants only (a folded
    border kernel) is a constant, not a layer."""

    def __init__(self, gm: fx.GraphModule, found: list[LayerStats]) -> None:
        super().__init__(gm)
        self.found = found
        self.live: set[fx.Node] = set()  # nodes that depend on the model's input

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "placeholder" or any(a in self.live for a in n.all_input_nodes):
            self.live.add(n)
        view = layer_view(self.module, n) if n.op == "call_function" and n in self.live else None
        if view is not None and view.kernel:
            inp = self.env.get(view.input) if isinstance(view.input, fx.Node) else None
            self.found.append(_stats(view, inp, out))
        return out


def layer_stats(model: nn.Module, example_input: torch.Tensor) -> list[LayerStats]:
    """Statistics for every convolution and linear layer, module or call, in execution order.

    A layer called twice is listed twice (its MACs count twice, as they are spent twice).
    """
    found: list[LayerStats] = []
    handles = _hook_modules(model, found)
    try:
        with torch.no_grad():
            if isinstance(model, fx.GraphModule):
                _CallCollector(model, found).run(example_input)
            else:
                model(example_input)
    finally:
        for h in handles:
            h.remove()
    return found


def totals(model: nn.Module, stats: list[LayerStats]) -> Totals:
    weights = sum(math.prod(s.weight_shape) for s in _unique(stats))
    zeros = sum(round(s.zero_fraction * math.prod(s.weight_shape)) for s in _unique(stats))
    return Totals(
        layers=len(stats),
        params=sum(p.numel() for p in model.parameters()) + _attr_tensor_count(model),
        layer_params=sum(s.params for s in _unique(stats)),
        macs=sum(s.macs for s in stats),
        zero_weights=zeros,
        weights=weights,
    )


def _unique(stats: list[LayerStats]) -> list[LayerStats]:
    seen: dict[str, LayerStats] = {}
    for s in stats:
        seen.setdefault(s.name, s)
    return list(seen.values())


def _attr_tensor_count(model: nn.Module) -> int:
    # A GraphModule from torch.export may keep weights as plain tensor attributes.
    if not isinstance(model, fx.GraphModule) or any(True for _ in model.parameters()):
        return 0
    count = 0
    for node in model.graph.nodes:
        if node.op == "get_attr":
            obj = model
            for part in node.target.split("."):
                obj = getattr(obj, part)
            if isinstance(obj, torch.Tensor):
                count += obj.numel()
    return count
