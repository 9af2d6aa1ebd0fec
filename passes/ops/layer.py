"""A layer with weights, seen one way whatever form it has in a graph.

A layer is a submodule call (`self.conv(x)`), or a torch function / ATen op that reads its
tensors through get_attr (`F.conv2d(x, self.w)`; `aten.conv2d(x, conv_weight, ...)` in a
`.pt2` program). The *form* only decides where the tensors and settings live (module
attributes, or call arguments); a `LayerView` subclass per op family says what they mean:
which dims carry channels, how the layer is cut to the kept channels (`shrink`), and the layer
as a float64 function of its input without bias (`consumer`, what removed channels' constants
are folded through). The analysis, the removal pass, layer statistics and sparse packing all
read layers through a view.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import fx, nn

from rwdeploy.passes.channel_state import AnalysisState
from rwdeploy.passes.ops.common import base_name, bound_args, input_map, set_arg, state_tensor, value_users, with_args


def keep(t: torch.Tensor, dim: int, mask: torch.Tensor) -> torch.Tensor:
    """`t` restricted to the True entries of `mask` along `dim`."""
    return t.detach().index_select(dim, mask.nonzero().flatten())


def get_tensor(gm: nn.Module, key: str) -> torch.Tensor:
    owner, _, attr = key.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def replace_tensor(gm: nn.Module, key: str, value: torch.Tensor) -> None:
    """Store `value` under state_dict `key`, a parameter again if it was one."""
    owner_name, _, attr = key.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    old, value = getattr(owner, attr), value.clone()
    setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad)
            if isinstance(old, nn.Parameter) else value)


class ModuleForm:
    """A submodule; its settings are the module's attributes (`groups`, `num_features`, ...)."""

    def __init__(self, gm: nn.Module, path: str, module: nn.Module, node: fx.Node | None) -> None:
        self.gm, self.path, self.module, self.node = gm, path, module, node
        self.input = node.args[0] if node is not None and node.args else None
        self.name = path
        self.label = self.type = type(module).__name__

    def keys(self, roles: tuple[str, ...]) -> dict[str, str]:
        """The state_dict keys of the layer's tensors, by role (roles it lacks are left out)."""
        return {r: f"{self.path}.{r}" if self.path else r for r in roles
                if isinstance(getattr(self.module, r, None), torch.Tensor)}

    def exclusive(self, keys: dict[str, str]) -> bool:
        return self.node is None or (len(self.node.args) == 1 and not self.node.kwargs)

    def get(self, setting: str, default: Any = None) -> Any:
        return getattr(self.module, setting, default)

    def set(self, setting: str, value: Any) -> None:
        if hasattr(self.module, setting):  # a setting this module type does not carry is derived
            setattr(self.module, setting, value)

    def attach_bias(self, value: torch.Tensor) -> str:
        self.module.bias = nn.Parameter(value.clone())
        return self.keys(("bias",))["bias"]

    def without_bias(self, weight_key: str) -> Callable[[torch.Tensor], torch.Tensor]:
        ref = copy.deepcopy(self.module).double()  # the module's own forward: padding modes, ...
        ref.bias = None
        return ref

    def shapes(self, keys: dict[str, str]) -> dict[str, list[int]]:
        return {name: list(t.shape) for name, t in self.module.state_dict().items()}


class CallForm:
    """A torch function or ATen op; tensors are get_attr arguments, settings are arguments
    (`implied`: settings the op fixes, e.g. `transposed` for conv_transpose2d)."""

    def __init__(self, gm: nn.Module, node: fx.Node, names: tuple[str, ...], implied: dict[str, Any]) -> None:
        self.gm, self.node, self.names, self.implied = gm, node, names, implied
        self.args = bound_args(node, names)
        self.input = self.args.get("input")
        weight = self.args.get("weight")
        # a weight computed in the graph (weight standardisation) names no parameter: the node names it
        read = isinstance(weight, fx.Node) and weight.op == "get_attr"
        self.name = (weight.target.rpartition(".")[0] if read else "") or node.name
        self.label, self.type = f"{base_name(node)} (functional)", None

    def keys(self, roles: tuple[str, ...]) -> dict[str, str] | None:
        """None when an argument in `roles` is not a parameter or buffer of the graph."""
        given = {r: self.args[r] for r in roles if self.args.get(r) is not None}
        if any(state_tensor(self.gm, a) is None for a in given.values()):
            return None
        return {r: a.target for r, a in given.items()}

    def exclusive(self, keys: dict[str, str]) -> bool:
        """Its tensors are read by calls of this op only (the channel analysis joins the
        channels of several such calls: `channel_groups._join_shared`)."""
        return all(all(u.op == self.node.op and u.target == self.node.target for u in value_users(self.args[r]))
                   for r in keys)

    def get(self, setting: str, default: Any = None) -> Any:
        return self.args.get(setting, self.implied.get(setting, default))

    def set(self, setting: str, value: Any) -> None:
        if setting in self.names:  # settings a call does not name are derived from its tensors
            set_arg(self.node, self.names, setting, value)
            self.args[setting] = value

    def attach_bias(self, value: torch.Tensor) -> str:
        key = f"_rw_bias_{self.node.name}"
        self.gm.register_parameter(key, nn.Parameter(value.clone()))
        with self.gm.graph.inserting_before(self.node):
            self.set("bias", self.gm.graph.get_attr(key))
        return key

    def without_bias(self, weight_key: str) -> Callable[[torch.Tensor], torch.Tensor]:
        w, op = get_tensor(self.gm, weight_key).detach().double(), self.node.target

        def call(x: torch.Tensor) -> torch.Tensor:
            args, kwargs = with_args(self.node, self.names, input=x, weight=w, bias=None)
            return op(*args, **kwargs)
        return call

    def shapes(self, keys: dict[str, str]) -> dict[str, list[int]]:
        return {key: list(get_tensor(self.gm, key).shape) for key in keys.values()}


class LayerView:
    """One layer: its tensors by role, its settings, how it is cut. Subclassed per family."""

    roles: tuple[str, ...] = ("weight", "bias")  # tensors the layer may have, by role
    required: tuple[str, ...] = ("weight",)
    # argument names of the call forms ({"torch": ..., "aten": ...} where their orders differ),
    # and the settings a call implies without naming them
    call_args: tuple[str, ...] | dict[str, tuple[str, ...]] = ("input", "weight", "bias")
    implied: dict[str, Any] = {}
    kernel = False  # a weight matrix/kernel mixing input channels into output channels
    folds_maps = True  # a removed input's position-dependent constant can follow the layer as a map
    in_dim = out_dim = 1  # the channel dim of the input and of the output
    weight_dims = (0, 1)  # the weight's output-channel and input-channel dims (kernels)
    generic_type = "Layer"  # the module class a call of this family corresponds to

    def __init__(self, gm: nn.Module, node: fx.Node | None, form: ModuleForm | CallForm,
                 tensors: dict[str, str]) -> None:
        self.gm, self.node, self.form, self.tensors = gm, node, form, tensors
        self.name, self.input = form.name, form.input
        self.exclusive = form.exclusive(tensors)  # called on its input alone / tensors read by this op only

    @classmethod
    def arguments(cls, node: fx.Node) -> tuple[tuple[str, ...], dict[str, Any]]:
        """A call's argument names, and the settings its op implies (e.g. `transposed`)."""
        if isinstance(cls.call_args, dict):
            return cls.call_args["aten" if isinstance(node.target, torch._ops.OpOverload) else "torch"], cls.implied
        return cls.call_args, cls.implied

    @classmethod
    def of(cls, gm: nn.Module, node: fx.Node) -> LayerView | None:
        """The view of a node of this family; None when a tensor it reads is not a parameter
        or buffer of `gm` (a weight computed in forward())."""
        if node.op == "call_module":
            return cls._checked(gm, node, ModuleForm(gm, node.target, gm.get_submodule(node.target), node))
        return cls._checked(gm, node, CallForm(gm, node, *cls.arguments(node)))

    @classmethod
    def of_module(cls, model: nn.Module, path: str, module: nn.Module) -> LayerView | None:
        """The view of a submodule outside any graph (e.g. from a forward hook)."""
        return cls._checked(model, None, ModuleForm(model, path, module, None))

    @classmethod
    def _checked(cls, gm: nn.Module, node: fx.Node | None, form: ModuleForm | CallForm) -> LayerView | None:
        keys = form.keys(cls.roles)
        return cls(gm, node, form, keys) if keys is not None and all(r in keys for r in cls.required) else None

    @property
    def type(self) -> str:
        """The module class name (for a call: of the module it corresponds to)."""
        return self.form.type or self.generic_type

    def setting(self, name: str, default: Any = None) -> Any:
        """A setting of the layer (`groups`, `stride`, ...) wherever its form keeps it."""
        return self.form.get(name, default)

    def tensor(self, role: str) -> torch.Tensor | None:
        return get_tensor(self.gm, self.tensors[role]) if role in self.tensors else None

    @property
    def weight(self) -> torch.Tensor:
        return self.tensor("weight")

    @property
    def bias(self) -> torch.Tensor | None:
        return self.tensor("bias")

    def shapes(self) -> dict[str, list[int]]:
        return self.form.shapes(self.tensors)

    def consumer(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The layer as a float64 function of its input, without bias."""
        return self.form.without_bias(self.tensors["weight"])

    def geometry(self) -> Any:
        """A convolution's geometry for border kernels (`ops.conv`); None for other layers."""
        return None

    def macs(self, inp: torch.Tensor | None, out: torch.Tensor) -> int:
        """Multiply-accumulates of one call (kernels)."""
        raise NotImplementedError

    def shrink(self, keep_in: torch.Tensor, keep_out: torch.Tensor) -> None:
        """Cut the layer to the kept input / output channels (per-channel layers: keep_in)."""
        raise NotImplementedError

    def kept_out(self, sel: Any, values: dict[str, Any]) -> torch.Tensor:
        """For each output channel (along `out_dim` of the node's value): is it kept."""
        name = self.node.name
        return sel.present(name, self.out_dim, values[name].shape[self.out_dim])

    def kept_consumer_out(self, sel: Any, values: dict[str, Any], size: int) -> torch.Tensor:
        """For each entry along `out_dim` of `consumer()`'s result (`size` of them): is it kept."""
        return sel.present(self.node.name, self.out_dim, size)

    def cut(self, role: str, dim: int, mask: torch.Tensor) -> None:
        if role in self.tensors:
            replace_tensor(self.gm, self.tensors[role], keep(self.tensor(role), dim, mask))

    def fold_bias(self, vec: torch.Tensor) -> None:
        """Add `vec` to the output channels, giving the layer a bias if it had none."""
        vec = vec.to(self.weight.dtype)
        if "bias" in self.tensors:
            with torch.no_grad():
                self.bias.add_(vec)
        else:
            self.tensors["bias"] = self.form.attach_bias(vec)


def read_layer(st: AnalysisState, node: fx.Node, cls: type[LayerView],
               noun: str) -> tuple[Any, torch.Tensor | None, str | None]:
    """(view, class map of its input, None), or (.., .., why the analysis cannot follow it)."""
    view = cls.of(st.gm, node)
    m = input_map(st, view.input) if view is not None and view.exclusive else None
    if m is not None:
        st.layer_users.add(node.name)
        return view, m, None
    if view is not None and view.exclusive:
        return view, None, f"{noun} input is not a tensor"
    if node.op == "call_module":
        return view, None, f"{noun} called with extra arguments"
    return view, None, f"functional {noun} whose weight is not a parameter used once"
