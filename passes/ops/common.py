"""Helpers every op family uses: naming a node, reading its arguments, the opaque fallback."""
from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from rwdeploy.passes.channel_state import AnalysisState, TensorMeta, varying_dims


def op_name(node: fx.Node) -> str:
    """A short human name of the op a node runs (for pin reasons and records)."""
    if node.op == "call_module":
        return f"{node.target} ({type(node.graph.owning_module.get_submodule(node.target)).__name__})"
    if node.op == "call_method":  # no parentheses inside: readers split "<node> (<op>): <why>"
        return f"{node.name} (.{node.target})"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({name})"


_METADATA = {"shape", "device", "dtype", "ndim", "is_cuda", "requires_grad"}


def reads_metadata_only(user: fx.Node) -> bool:
    """`t.shape`, `t.size(...)`, `t.dim()`, `t.device`, aten.sym_size(t, d): no values read."""
    if user.op == "call_function" and user.target is getattr:
        return len(user.args) > 1 and user.args[1] in _METADATA
    if user.op == "call_method":
        return user.target in ("size", "dim")
    return user.op == "call_function" and base_name(user) in ("sym_size", "sym_numel", "sym_stride")


def value_users(node: fx.Node) -> list[fx.Node]:
    """The users of `node` that read its values (not only its shape, dtype or device)."""
    return [u for u in node.users if not reads_metadata_only(u)]


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Argument `name`, passed at position `i` or by keyword."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def bound_args(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    return {**dict(zip(names, node.args)), **node.kwargs}


def with_args(node: fx.Node, names: tuple[str, ...], **values: Any) -> tuple[tuple, dict[str, Any]]:
    """The node's (args, kwargs) with the named arguments replaced, where they were passed."""
    args, kwargs = list(node.args), dict(node.kwargs)
    for name, value in values.items():
        i = names.index(name)
        if name in kwargs or len(args) <= i:
            kwargs[name] = value
        else:
            args[i] = value
    return tuple(args), kwargs


def set_arg(node: fx.Node, names: tuple[str, ...], name: str, value: Any) -> None:
    node.args, node.kwargs = with_args(node, names, **{name: value})


def state_tensor(gm: nn.Module, a: Any) -> torch.Tensor | None:
    """The parameter or buffer of `gm`'s state_dict a get_attr node reads, else None."""
    if not isinstance(a, fx.Node) or a.op != "get_attr" or a.target not in gm.state_dict():
        return None
    owner, _, attr = a.target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def opaque(st: AnalysisState, node: fx.Node, why: str = "not understood by the channel analysis") -> Any:
    """An op the analysis does not follow: its inputs' channels are kept, its outputs get a
    fresh pinned class. Never wrong, only conservative."""
    reason = f"{op_name(node)}: {why}"
    for a in node.all_input_nodes:
        st.pin(st.maps.get(a.name), reason)
    return st.pinned_fresh(st.values[node.name], reason)


def input_map(st: AnalysisState, x: Any) -> torch.Tensor | None:
    """The class map of `x` with current roots, when `x` is a tensor value of the graph."""
    if not isinstance(x, fx.Node) or not isinstance(st.maps.get(x.name), torch.Tensor):
        return None
    return st.canon(st.maps[x.name])


def single_input(st: AnalysisState, node: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
    """(argument 0, its class map) when argument 0 is a tensor value."""
    x = node.args[0] if node.args else None
    m = input_map(st, x)
    return None if m is None else (x, m)


def tensor_arg(node: fx.Node, values: dict[str, Any]) -> fx.Node | None:
    """Argument 0 when it is a tensor value (by the recorded `values`)."""
    x = node.args[0] if node.args else None
    return x if isinstance(x, fx.Node) and isinstance(values.get(x.name), TensorMeta) else None


def channels_on_dim1(m: torch.Tensor) -> bool:
    """The classes vary along dim 1 only (an [N, C, ...] activation)."""
    return m.dim() >= 2 and all(d == 1 for d in varying_dims(m))


def aligned(m: torch.Tensor, ndim: int) -> torch.Tensor:
    """The map with leading size-1 dims, as broadcasting sees it at rank `ndim`."""
    return m.reshape((1,) * (ndim - m.dim()) + tuple(m.shape))


def base_name(node: fx.Node) -> str:
    """'conv2d' for aten.conv2d.default, F.conv2d and .conv2d(); the op's plain name."""
    t = node.target
    if node.op == "call_method":
        return t
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__.lstrip("_")
    return getattr(t, "__name__", "")
