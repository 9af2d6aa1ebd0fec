"""Sliding-window ops the TorchScript ONNX exporter cannot write, rewritten into ones it can.

`F.fold` / `nn.Fold` / `aten.col2im`:
ONNX's Col2Im needs opset 18 and the TorchScript exporter refuses `aten::col2im` below it, yet
fold is a plain linear map: each of the C*kh*kw input rows adds its L sliding-window values into
one kernel position of one channel. That is a grouped transposed convolution (groups = C) whose
kernel is one-hot - row c*kh*kw + i*kw + j puts a 1 at position (i, j) - over the input viewed
as (N, C*kh*kw, Lh, Lw); `output_padding` restores the rows and columns no window reaches.
VOLO's outlook attention ends in a fold.

`Tensor.unfold(dim, size, step)` / `aten.unfold`: the exporter needs the unfolded dim's size
from ONNX shape inference, which a graph with a dynamic batch often loses ("input size not
accessible"; HaloNet's blocked attention). With the size read from the example input the
windows are `size`-long slices stacked along `dim`, the window axis moved last: Slice, Concat
and Transpose.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def fold_by_conv_transpose(x: torch.Tensor, output_size: Any, kernel_size: Any, dilation: Any = 1,
                           padding: Any = 0, stride: Any = 1) -> torch.Tensor:
    """`F.fold(x, output_size, kernel_size, dilation, padding, stride)` for a batched (N, C*kh*kw, L)
    input, as `conv_transpose2d` (see the module docstring)."""
    (oh, ow), (kh, kw) = _pair(output_size), _pair(kernel_size)
    (dh, dw), (ph, pw), (sh, sw) = _pair(dilation), _pair(padding), _pair(stride)
    lh = (oh + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    lw = (ow + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    channels = int(x.shape[1]) // (kh * kw)
    weight = torch.eye(kh * kw, dtype=x.dtype, device=x.device).reshape(kh * kw, 1, kh, kw).repeat(channels, 1, 1, 1)
    reached = ((lh - 1) * sh - 2 * ph + dh * (kh - 1) + 1, (lw - 1) * sw - 2 * pw + dw * (kw - 1) + 1)
    return F.conv_transpose2d(x.unflatten(2, (lh, lw)), weight, stride=(sh, sw), padding=(ph, pw),
                              output_padding=(oh - reached[0], ow - reached[1]), groups=channels,
                              dilation=(dh, dw))


def _fold_call(gm: fx.GraphModule, node: fx.Node) -> tuple[Any, ...] | None:
    """(input, output_size, kernel_size, dilation, padding, stride) of a fold node, else None."""
    if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Fold):
        m = gm.get_submodule(node.target)
        return (node.args[0], m.output_size, m.kernel_size, m.dilation, m.padding, m.stride)
    if node.op != "call_function":
        return None
    if node.target is F.fold:
        names = ("input", "output_size", "kernel_size", "dilation", "padding", "stride")
        defaults = (None, None, None, 1, 0, 1)
        return tuple(node.args[i] if i < len(node.args) else node.kwargs.get(n, d)
                     for i, (n, d) in enumerate(zip(names, defaults)))
    if node.target is torch.ops.aten.col2im.default:
        return tuple(node.args[:6])
    return None


def folds_as_conv_transposes(gm: fx.GraphModule) -> int:
    """Replace every batched fold in `gm` by `fold_by_conv_transpose`; returns how many."""
    replaced = 0
    for node in list(gm.graph.nodes):
        call = _fold_call(gm, node)
        value = node.meta.get("val", node.meta.get("tensor_meta"))
        if call is None or (value is not None and len(value.shape) != 4):  # unbatched folds stay
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(fold_by_conv_transpose, call)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        replaced += 1
    return replaced


def unfold_by_slices(x: torch.Tensor, dim: int, size: int, step: int, length: int) -> torch.Tensor:
    """`x.unfold(dim, size, step)` for an `x` whose size along `dim` is `length`, from slices."""
    d = dim % x.dim()
    windows = [x.narrow(d, i * step, size) for i in range((length - size) // step + 1)]
    return torch.stack(windows, dim=d).movedim(d + 1, -1)


def _unfold_call(node: fx.Node) -> tuple[Any, Any, Any, Any] | None:
    """(input, dim, size, step) of a `Tensor.unfold` / `aten.unfold` node, else None."""
    if (node.op == "call_method" and node.target == "unfold") or (
            node.op == "call_function" and node.target is torch.ops.aten.unfold.default):
        names = ("self", "dimension", "size", "step")
        return tuple(node.args[i] if i < len(node.args) else node.kwargs.get(n) for i, n in enumerate(names))
    return None


def unfolds_as_slices(gm: fx.GraphModule, example_input: Any) -> int:
    """Replace every `unfold` in `gm` whose input size is known at the example input by
    `unfold_by_slices`; returns how many."""
    nodes = [node for node in gm.graph.nodes if _unfold_call(node) is not None]
    if not nodes:
        return 0
    with torch.no_grad():
        ShapeProp(gm).propagate(*(example_input if isinstance(example_input, tuple) else (example_input,)))
    replaced = 0
    for node in nodes:
        x, dim, size, step = _unfold_call(node)  # read now: an earlier replacement may feed it
        meta = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
        if meta is None or not all(isinstance(v, int) for v in (dim, size, step)):
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(unfold_by_slices, (x, dim, size, step, int(meta.shape[dim])))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        replaced += 1
    return replaced
