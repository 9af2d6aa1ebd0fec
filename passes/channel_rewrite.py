"""Edits that make a GraphModule physically smaller once the removed channels are chosen.

Module edits slice a layer's tensors by the kept channels of its input and output values;
argument edits rewrite the sizes, split points and indices that reshapes, splits and slices
name along channel dims. Both read kept masks from a `Selection`, so they agree by construction.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch import fx, nn

from rwdeploy.passes.channel_rules import (
    CONV_ARGS,
    CONV_TRANSPOSE_ARGS,
    GROUPNORM_ARGS,
    LINEAR_ARGS,
    PRELU_ARGS,
    base_name,
    batchnorm_arg_names,
    bound_args,
    index_items,
)
from rwdeploy.passes.channel_selection import Selection
from rwdeploy.passes.channel_state import TensorMeta


def _keep(t: torch.Tensor, dim: int, mask: torch.Tensor) -> torch.Tensor:
    return t.detach().index_select(dim, mask.nonzero().flatten())


def _set(mod: nn.Module, name: str, value: torch.Tensor | None) -> None:
    old = getattr(mod, name)
    if old is None or value is None:
        return
    if isinstance(old, nn.Parameter):
        setattr(mod, name, nn.Parameter(value.clone(), requires_grad=old.requires_grad))
    else:
        setattr(mod, name, value.clone())


def conv_weight(w: torch.Tensor, groups: int, keep_in: torch.Tensor, keep_out: torch.Tensor) -> tuple[torch.Tensor, int]:
    """A conv weight [O, C/g, k...] cut to the kept channels, and its new group count."""
    cin = w.shape[1] * groups
    if groups == 1:
        return _keep(_keep(w, 0, keep_out), 1, keep_in), 1
    if groups == cin:  # depthwise: one conv group per remaining channel
        return _keep(w, 0, keep_out), int(keep_in.sum())
    per_in, per_out = cin // groups, w.shape[0] // groups
    parts = []
    for j in range(groups):
        rows = _keep(w[j * per_out:(j + 1) * per_out], 0, keep_out[j * per_out:(j + 1) * per_out])
        parts.append(_keep(rows, 1, keep_in[j * per_in:(j + 1) * per_in]))
    return torch.cat(parts, 0), groups


def shrink_conv(mod: nn.Module, keep_in: torch.Tensor, keep_out: torch.Tensor) -> None:
    new, groups = conv_weight(mod.weight, mod.groups, keep_in, keep_out)
    _set(mod, "weight", new)
    if mod.bias is not None:
        _set(mod, "bias", _keep(mod.bias, 0, keep_out))
    mod.groups = groups
    mod.in_channels = int(keep_in.sum())
    mod.out_channels = int(keep_out.sum())


def shrink_conv_transpose(mod: nn.Module, keep_in: torch.Tensor, keep_out: torch.Tensor) -> None:
    _set(mod, "weight", _keep(_keep(mod.weight, 0, keep_in), 1, keep_out))
    if mod.bias is not None:
        _set(mod, "bias", _keep(mod.bias, 0, keep_out))
    mod.in_channels, mod.out_channels = int(keep_in.sum()), int(keep_out.sum())


def shrink_linear(mod: nn.Module, keep_in: torch.Tensor, keep_out: torch.Tensor) -> None:
    _set(mod, "weight", _keep(_keep(mod.weight, 0, keep_out), 1, keep_in))
    if mod.bias is not None:
        _set(mod, "bias", _keep(mod.bias, 0, keep_out))
    mod.in_features, mod.out_features = int(keep_in.sum()), int(keep_out.sum())


def shrink_batchnorm(mod: nn.Module, keep: torch.Tensor, _: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        t = getattr(mod, name, None)
        if t is not None:
            _set(mod, name, _keep(t, 0, keep))
    mod.num_features = int(keep.sum())


def shrink_groupnorm(mod: nn.Module, keep: torch.Tensor, _: torch.Tensor) -> None:
    per = mod.num_channels // mod.num_groups
    for name in ("weight", "bias"):
        if getattr(mod, name, None) is not None:
            _set(mod, name, _keep(getattr(mod, name), 0, keep))
    mod.num_channels = int(keep.sum())
    mod.num_groups = mod.num_channels // per


def shrink_prelu(mod: nn.Module, keep: torch.Tensor, _: torch.Tensor) -> None:
    if mod.num_parameters > 1:
        _set(mod, "weight", _keep(mod.weight, 0, keep))
        mod.num_parameters = int(keep.sum())


# kind -> (shrink function, input channel dim, output channel dim)
MODULE_SHRINKERS: dict[str, tuple[Callable[[nn.Module, torch.Tensor, torch.Tensor], None], int, int]] = {
    "conv": (shrink_conv, 1, 1),
    "conv_transpose": (shrink_conv_transpose, 1, 1),
    "linear": (shrink_linear, -1, -1),
    "batchnorm": (shrink_batchnorm, 1, 1),
    "groupnorm": (shrink_groupnorm, 1, 1),
    "prelu": (shrink_prelu, 1, 1),
}


def _set_param(gm: fx.GraphModule, key: str, value: torch.Tensor) -> None:
    owner_name, _, attr = key.rpartition(".")
    _set(gm.get_submodule(owner_name) if owner_name else gm, attr, value)


def set_arg(node: fx.Node, names: tuple[str, ...], name: str, value: Any) -> None:
    i = names.index(name)
    if name in node.kwargs or len(node.args) <= i:
        node.kwargs = {**node.kwargs, name: value}
    else:
        node.args = node.args[:i] + (value,) + node.args[i + 1:]


FUNCTIONAL_ARGS = {"fconv": CONV_ARGS, "fconv_transpose": CONV_TRANSPOSE_ARGS, "flinear": LINEAR_ARGS,
                   "fgroupnorm": GROUPNORM_ARGS, "fprelu": PRELU_ARGS}


def shrink_functional(gm: fx.GraphModule, node: fx.Node, kind: str, keep_in: torch.Tensor,
                      keep_out: torch.Tensor) -> dict[str, tuple[list[int], list[int]]]:
    """Cut the get_attr parameters of a functional conv / linear / batch norm node; returns
    {key: (shape before, shape after)}."""
    names = FUNCTIONAL_ARGS.get(kind) or batchnorm_arg_names(node)
    b = bound_args(node, names)
    keys = {n: b[n].target for n in ("weight", "bias", "running_mean", "running_var")
            if isinstance(b.get(n), fx.Node)}
    new: dict[str, torch.Tensor] = {}
    if kind == "fconv":
        groups = b.get("groups", 1)
        new[keys["weight"]], new_groups = conv_weight(gm.get_parameter(keys["weight"]), groups, keep_in, keep_out)
        if new_groups != groups:
            set_arg(node, CONV_ARGS, "groups", new_groups)
    elif kind == "flinear":
        new[keys["weight"]] = _keep(_keep(gm.get_parameter(keys["weight"]), 0, keep_out), 1, keep_in)
    elif kind == "fconv_transpose":
        new[keys["weight"]] = _keep(_keep(gm.get_parameter(keys["weight"]), 0, keep_in), 1, keep_out)
    if kind == "fgroupnorm":
        per = len(keep_in) // b["num_groups"]
        set_arg(node, GROUPNORM_ARGS, "num_groups", int(keep_in.sum()) // per)
    if kind == "fprelu" and gm.get_parameter(keys["weight"]).numel() > 1:
        new[keys["weight"]] = _keep(gm.get_parameter(keys["weight"]), 0, keep_in)
    if "bias" in keys and kind not in ("fbatchnorm", "fgroupnorm"):
        new[keys["bias"]] = _keep(_state(gm, keys["bias"]), 0, keep_out)
    if kind in ("fbatchnorm", "fgroupnorm"):
        for key in keys.values():
            new[key] = _keep(_state(gm, key), 0, keep_in)
    shapes = {}
    for key, value in new.items():
        shapes[key] = (list(_state(gm, key).shape), list(value.shape))
        _set_param(gm, key, value)
    return shapes


def _state(gm: fx.GraphModule, key: str) -> torch.Tensor:
    try:
        return gm.get_parameter(key)
    except AttributeError:
        return gm.get_buffer(key)


def _count(mask: torch.Tensor, stop: int) -> int:
    return int(mask[:stop].sum())


def rewrite_args(node: fx.Node, kind: str, sel: Selection, values: dict[str, Any]) -> bool:
    """Rewrite channel sizes/offsets named in a node's arguments. Returns True if changed."""
    if kind == "shape_value":
        return _freeze_size_reads(node, sel, values)
    if kind != "shape":
        return False
    name = base_name(node)
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or not isinstance(values.get(x.name), TensorMeta):
        return False
    shape = values[x.name].shape
    if name in ("view", "unsafe_view", "reshape", "expand"):
        return _rewrite_sizes(node, sel, values, 1)
    if name == "unflatten":
        return _rewrite_unflatten(node, sel, values)
    if name == "slice":  # aten.slice(x, dim, start, end, step)
        dim = node.args[1] % len(shape) if len(node.args) > 1 else 0
        keep = sel.present(x.name, dim, shape[dim])
        if keep.all():
            return False
        start = node.args[2] if len(node.args) > 2 else None
        end = node.args[3] if len(node.args) > 3 else None
        lo, hi, _ = slice(start, end).indices(shape[dim])
        node.args = (x, dim, _count(keep, lo), _count(keep, hi))
        return True
    if name in ("split", "split_with_sizes", "chunk"):
        dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % len(shape)
        keep = sel.present(x.name, dim, shape[dim])
        if keep.all():
            return False
        sizes, start = [], 0
        for piece in values[node.name]:
            sizes.append(int(keep[start:start + piece.shape[dim]].sum()))
            start += piece.shape[dim]
        node.op, node.target = "call_function", torch.split
        node.args, node.kwargs = (x, sizes), {"dim": dim}
        return True
    if name in ("narrow", "select"):
        dim = node.args[1] % len(shape)
        keep = sel.present(x.name, dim, shape[dim])
        if keep.all():
            return False
        start = node.args[2] % shape[dim]
        if name == "narrow":
            node.args = (x, node.args[1], _count(keep, start), int(keep[start:start + node.args[3]].sum()))
        else:
            node.args = (x, node.args[1], _count(keep, start))
        return True
    if name == "getitem":
        items = index_items(node.args[1], len(shape))
        idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        new, changed, pos = [], False, 0
        for e in idx:
            if e is None or e is Ellipsis:
                new.append(e)
                if e is None:
                    pos += 1
                continue
            dim, item = items[pos]
            pos += 1
            keep = sel.present(x.name, dim, shape[dim])
            if keep.all():
                new.append(item)
                continue
            changed = True
            if isinstance(item, int):
                new.append(_count(keep, item % shape[dim]))
            else:
                lo, hi, _ = item.indices(shape[dim])
                new.append(slice(None if item.start is None else _count(keep, lo),
                                 None if item.stop is None else _count(keep, hi)))
        if changed:
            node.args = (x, tuple(new) if isinstance(node.args[1], tuple) else new[0])
        return changed
    return False


def _rewrite_sizes(node: fx.Node, sel: Selection, values: dict[str, Any], first: int) -> bool:
    out = values[node.name].shape
    sizes = list(node.args[first:])
    packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list, fx.Node))
    if not sizes:
        sizes = [node.kwargs.get("shape", node.kwargs.get("size"))]
        packed = True
    seq = sizes[0] if packed else sizes
    # Channel dims get literal sizes: a size computed at run time may come from another tensor
    # whose channels changed (e.g. `c // heads` with c read from the residual stream).
    m = sel.analysis.state.maps.get(node.name)
    channel_dims = [d for d in range(len(out)) if isinstance(m, torch.Tensor) and m.shape[d] > 1]
    new_sizes = {d: int(sel.present(node.name, d, out[d]).sum()) for d in channel_dims}
    if isinstance(seq, fx.Node):
        if all(new_sizes[d] == out[d] for d in channel_dims):
            return False
        with node.graph.inserting_before(node):  # a torch.Size computed at run time: index it
            seq = [node.graph.call_function(operator.getitem, (seq, d)) for d in range(len(out))]
    seq = list(seq)
    changed = False
    for d, n in new_sizes.items():
        if not (isinstance(seq[d], int) and (seq[d] == -1 or seq[d] == n)):
            seq[d], changed = n, True
    if not changed:
        return False
    node.args = tuple(node.args[:first]) + ((tuple(seq),) if packed else tuple(seq))
    node.kwargs = {k: v for k, v in node.kwargs.items() if k not in ("shape", "size")}
    return True


def _rewrite_unflatten(node: fx.Node, sel: Selection, values: dict[str, Any]) -> bool:
    out = values[node.name].shape
    dim = node.args[1] % len(values[node.args[0].name].shape)
    sizes = list(node.args[2])
    changed = False
    for i in range(len(sizes)):
        n = int(sel.present(node.name, dim + i, out[dim + i]).sum())
        if n != out[dim + i] and sizes[i] != -1:
            sizes[i], changed = n, True
    if changed:
        node.args = (node.args[0], node.args[1], tuple(sizes))
    return changed


def frozen_size(t: torch.Tensor, fixed: tuple[tuple[int, int], ...]) -> torch.Size:
    """`t.shape` with the channel dims reported at their size in the original model."""
    size = list(t.shape)
    for d, n in fixed:
        size[d] = n
    return torch.Size(size)


def _freeze_size_reads(node: fx.Node, sel: Selection, values: dict[str, Any]) -> bool:
    """Reads of a channel dim's size keep returning the original size.

    Arithmetic on channel counts (`c // heads` in an attention scale) is part of the
    function; every structural use of a size (reshape, split) is rewritten separately.
    """
    is_size = node.op == "call_method" and node.target == "size"
    is_shape = node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",)
    if not (is_size or is_shape):
        return False
    x = node.args[0]
    if not isinstance(x, fx.Node) or not isinstance(values.get(x.name), TensorMeta):
        return False
    shape = values[x.name].shape
    fixed = tuple((d, shape[d]) for d in range(len(shape))
                  if not sel.present(x.name, d, shape[d]).all())
    if not fixed:
        return False
    dim = node.args[1] if is_size and len(node.args) > 1 else node.kwargs.get("dim") if is_size else None
    if dim is not None:
        original = shape[dim % len(shape)]
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a: original if a is node else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a: original if a is node else a)
        node.graph.erase_node(node)
        return True
    node.op, node.target, node.args, node.kwargs = "call_function", frozen_size, (x, fixed), {}
    return True
