"""Per-layer statistics of a network at an input shape: params, MACs and zeros.

An analysis: it reads a model and returns data. Layers are the modules (or, in a graph
without leaf modules such as a loaded `.pt2`, the aten calls) that own a weight matrix or
kernel: convolutions and linear layers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import fx, nn

_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_ATEN_CONV = {
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv3d.default,
    torch.ops.aten.convolution.default,
}
_ATEN_LINEAR = {torch.ops.aten.linear.default}


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


def _zero_counts(weight: torch.Tensor, transposed: bool) -> tuple[float, int, int, int, int]:
    w = weight.detach()
    if transposed:  # ConvTranspose stores [in, out/groups, ...]
        w = w.transpose(0, 1)
    zero = w == 0
    flat_out = zero.reshape(w.shape[0], -1)
    zero_filters = int(flat_out.all(dim=1).sum())
    if w.dim() >= 2:
        flat_in = zero.transpose(0, 1).reshape(w.shape[1], -1)
        zero_in = int(flat_in.all(dim=1).sum())
        cin = w.shape[1]
    else:
        zero_in, cin = 0, 1
    frac = float(zero.float().mean()) if w.numel() else 0.0
    return frac, zero_filters, zero_in, int(w.shape[0]), int(cin)


def _stats(name: str, kind: str, weight: torch.Tensor, bias: torch.Tensor | None, macs: int,
           transposed: bool = False) -> LayerStats:
    frac, zf, zi, cout, cin = _zero_counts(weight, transposed)
    params = weight.numel() + (bias.numel() if bias is not None else 0)
    return LayerStats(name, kind, tuple(weight.shape), int(params), int(macs), frac, zf, zi, cout, cin)


def _conv_macs(weight: torch.Tensor, out: torch.Tensor, transposed: bool, inp: torch.Tensor | None) -> int:
    # Each output element of a (grouped) convolution sums over in/groups * kernel elements;
    # for a transposed conv, count per input element instead (same products).
    kernel = math.prod(weight.shape[2:])
    if transposed and inp is not None:
        return int(inp.numel() // inp.shape[0] * weight.shape[1] * kernel)
    return int(out.numel() // out.shape[0] * weight.shape[1] * kernel)


def _with_hooks(model: nn.Module, example_input: torch.Tensor) -> list[LayerStats]:
    found: list[LayerStats] = []
    handles = []

    def hook_for(name: str, mod: nn.Module):
        def hook(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if isinstance(m, nn.Linear):
                macs = out.numel() // out.shape[0] * m.in_features if out.dim() > 1 else m.in_features * m.out_features
                # Leading dims beyond batch (tokens) multiply the work.
                found.append(_stats(name, "Linear", m.weight, m.bias, macs))
            else:
                transposed = isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))
                found.append(_stats(name, type(m).__name__, m.weight, m.bias,
                                    _conv_macs(m.weight, out, transposed, inp), transposed))
        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, _CONV_MODULES + (nn.Linear,)):
            handles.append(mod.register_forward_hook(hook_for(name, mod)))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return found


class _AtenLayerCollector(fx.Interpreter):
    """Collects conv/linear aten calls in a graph whose weights are attributes (e.g. a .pt2)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.found: list[LayerStats] = []

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.op == "call_function" and n.target in _ATEN_CONV | _ATEN_LINEAR:
            w_node = n.args[1]
            if isinstance(w_node, fx.Node) and w_node.op == "get_attr":
                weight = self.fetch_attr(w_node.target)
                b_node = n.args[2] if len(n.args) > 2 else None
                bias = self.fetch_attr(b_node.target) if isinstance(b_node, fx.Node) and b_node.op == "get_attr" else None
                name = w_node.target.rsplit(".", 1)[0] if "." in w_node.target else w_node.target
                if n.target in _ATEN_LINEAR:
                    macs = out.numel() // out.shape[0] * weight.shape[1]
                    self.found.append(_stats(name, "Linear", weight, bias, macs))
                else:
                    transposed = n.target is torch.ops.aten.convolution.default and bool(n.args[6])
                    kind = f"Conv{weight.dim() - 2}d" if not transposed else f"ConvTranspose{weight.dim() - 2}d"
                    inp = self.env[n.args[0]] if isinstance(n.args[0], fx.Node) else None
                    self.found.append(_stats(name, kind, weight, bias,
                                             _conv_macs(weight, out, transposed, inp), transposed))
        return out


def layer_stats(model: nn.Module, example_input: torch.Tensor) -> list[LayerStats]:
    """Statistics for every convolution and linear layer, in execution order.

    A layer called twice is listed twice (its MACs count twice, as they are spent twice).
    """
    stats = _with_hooks(model, example_input)
    if not stats and isinstance(model, fx.GraphModule):
        collector = _AtenLayerCollector(model)
        with torch.no_grad():
            collector.run(example_input)
        stats = collector.found
    return stats


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
