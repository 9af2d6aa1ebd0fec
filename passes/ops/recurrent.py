"""Recurrent layers: nn.LSTM and aten.lstm (one layer, either direction or both).

An LSTM reads channels on its input's last dim through the columns of `weight_ih` (one per
direction) and makes hidden units: unit j of a direction owns rows j, H+j, 2H+j, 3H+j (the
input, forget, cell and output gates) of that direction's `weight_ih`, `weight_hh` and
biases, and reads itself back through column j of `weight_hh`. The output concatenates the
directions' units on its last dim; h_n and c_n hold them as [direction, batch, unit].

Removal is exact in both directions of a unit's life:
- an input channel's constant adds `weight_ih[:, c] * v` to every gate pre-activation at every
  step, which folds into `bias_ih` (the LSTM is a fold site like a linear layer);
- a hidden unit whose gate rows and biases are all zero ("zero producers") starts at
  h = c = 0 and stays there (its gates are sigmoid(0) = 1/2 and tanh(0) = 0, so
  c' = c / 2 and h = tanh(c) / 2 = 0); one that nothing reads (its `weight_hh` column and every
  consumer downstream zero) changes nothing. Either way its rows and its column go.
  This needs the initial state to be zeros: an LSTM given h0 / c0 keeps its units.
Both directions must keep as many units as each other (one `hidden_size`): they lose the
same number, as the conv groups of a grouped conv do. Stacked LSTMs (num_layers > 1) and
projections (proj_size) are not followed: they are pinned with that reason.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch import fx, nn

from rwdeploy.passes.channel_state import AnalysisState, const_map
from rwdeploy.passes.ops.common import base_name, opaque, state_tensor, value_users
from rwdeploy.passes.ops.layer import CallForm, LayerView, ModuleForm, get_tensor, keep, read_layer, replace_tensor
from rwdeploy.passes.ops.linear import channel_vector
from rwdeploy.passes.ops.spec import Match, OpSpec, register

GATES = 4  # input, forget, cell, output: the rows of a unit in each gate block
_KINDS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
_SUFFIXES = ("", "_reverse")
_ATEN_ARGS = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train", "bidirectional",
              "batch_first")


def _param_names(has_biases: bool, num_layers: int, bidirectional: bool) -> list[str]:
    """aten.lstm's flat `params`, named as nn.LSTM names its parameters."""
    kinds = _KINDS if has_biases else _KINDS[:2]
    return [f"{k}_l{layer}{s}" for layer in range(num_layers) for s in _SUFFIXES[:1 + bidirectional]
            for k in kinds]


class LstmCallForm(CallForm):
    """aten.lstm.input: the tensors are the get_attr nodes of its `params` list."""

    def __init__(self, gm: nn.Module, node: fx.Node) -> None:
        super().__init__(gm, node, _ATEN_ARGS, {})
        self.name = node.name
        params = self.args.get("params")
        first = params[0] if isinstance(params, (list, tuple)) and params else None
        if isinstance(first, fx.Node) and first.op == "get_attr":
            self.name = first.target.rpartition(".")[0] or node.name
        self.label, self.type = "lstm (functional)", None

    def _params(self) -> dict[str, Any] | None:
        params = self.args.get("params")
        if not isinstance(params, (list, tuple)):
            return None
        names = _param_names(bool(self.args.get("has_biases")), int(self.args.get("num_layers", 1)),
                             bool(self.args.get("bidirectional")))
        return dict(zip(names, params)) if len(names) == len(params) else None

    def keys(self, roles: tuple[str, ...]) -> dict[str, str] | None:
        params = self._params()
        if params is None or any(state_tensor(self.gm, p) is None for p in params.values()):
            return None
        return {r: p.target for r, p in params.items() if r in roles}

    def exclusive(self, keys: dict[str, str]) -> bool:
        params = self._params() or {}
        return all(u is self.node for p in params.values() for u in value_users(p))

    def get(self, setting: str, default: Any = None) -> Any:
        if setting == "hidden_size":
            return int(state_tensor(self.gm, self._params()["weight_hh_l0"]).shape[1])
        if setting == "bias":
            return bool(self.args.get("has_biases"))
        return self.args.get(setting, default)

    def set(self, setting: str, value: Any) -> None:
        if setting != "hidden_size":
            return
        for state in self.args["hx"]:  # the initial state's zeros name the width
            if state.op == "get_attr":  # folded to a constant (a symbolic trace of a .pt2's module)
                old = get_tensor(self.gm, state.target)
                replace_tensor(self.gm, state.target, old.new_zeros((*old.shape[:-1], value)))
            else:
                size = list(state.args[0])
                state.args = (size[:-1] + [value], *state.args[1:])

    def initial_state_is_zeros(self) -> bool:
        """h0 and c0 are zeros this pass can resize: `aten.zeros` with a literal width, or a
        zero constant; each read by this LSTM alone."""
        hx = self.args.get("hx")
        return isinstance(hx, (list, tuple)) and all(
            isinstance(h, fx.Node) and len(h.users) == 1 and (_zeros_call(h) or _zero_constant(self.gm, h))
            for h in hx)


def _zeros_call(h: fx.Node) -> bool:
    return (h.op == "call_function" and base_name(h) == "zeros" and isinstance(h.args[0], (list, tuple))
            and isinstance(h.args[0][-1], int))


def _zero_constant(gm: nn.Module, h: fx.Node) -> bool:
    if h.op != "get_attr":
        return False
    try:
        t = get_tensor(gm, h.target)
    except AttributeError:
        return False
    return isinstance(t, torch.Tensor) and t.dim() == 3 and not bool(t.any())


class LstmView(LayerView):
    roles = tuple(f"{k}_l0{s}" for s in _SUFFIXES for k in _KINDS)
    required = ("weight_ih_l0", "weight_hh_l0")
    kernel = True  # counted in layer statistics (weight, bias, MACs below)
    # a removed input's constant enters every gate inside the recurrence: it folds into bias_ih
    # when it is the same at every step, and has nowhere to go when it varies along the sequence
    folds_maps = False
    in_dim = out_dim = -1
    generic_type = "LSTM"

    @property
    def weight(self) -> torch.Tensor:
        """For statistics: every gate row of both directions, [weight_ih | weight_hh]."""
        return torch.cat([torch.cat([self.tensor(f"weight_ih_l0{s}"), self.tensor(f"weight_hh_l0{s}")], 1)
                          for s in self.suffixes]).detach()

    @property
    def bias(self) -> torch.Tensor | None:
        parts = [self.tensor(f"{k}_l0{s}") for s in self.suffixes for k in ("bias_ih", "bias_hh")
                 if f"{k}_l0{s}" in self.tensors]
        return torch.cat(parts).detach() if parts else None

    def macs(self, inp: torch.Tensor | None, out: Any) -> int:
        """Every step of every sequence: each gate row reads the input and the hidden state."""
        y = out[0] if isinstance(out, (tuple, list)) else out
        batch = 1 if y.dim() < 3 else y.shape[0 if self.setting("batch_first") else 1]
        rows, width = self.weight.shape  # per sample, as the other layers count
        return int(y.numel() // y.shape[-1] // batch * rows * width)

    @classmethod
    def of(cls, gm: nn.Module, node: fx.Node) -> LayerView | None:
        if node.op == "call_module":
            return cls._checked(gm, node, ModuleForm(gm, node.target, gm.get_submodule(node.target), node))
        return cls._checked(gm, node, LstmCallForm(gm, node))

    @property
    def suffixes(self) -> tuple[str, ...]:
        return _SUFFIXES[:2 if self.setting("bidirectional") else 1]

    @property
    def hidden_size(self) -> int:
        return int(self.tensor("weight_hh_l0").shape[1])

    def unsupported(self) -> str | None:
        """Why the rule cannot follow this LSTM, or None."""
        if int(self.setting("num_layers", 1)) != 1:
            return f"stacked LSTM (num_layers={self.setting('num_layers')}): only one layer is followed"
        if int(self.setting("proj_size", 0) or 0):
            return "LSTM with proj_size: not followed"
        if any(f"weight_ih_l0{s}" not in self.tensors for s in self.suffixes):
            return "LSTM whose tensors are not all parameters"
        return None

    def initial_state_is_zeros(self) -> bool:
        if isinstance(self.form, LstmCallForm):
            return self.form.initial_state_is_zeros()
        return True  # a module call with its input alone (checked by `exclusive`) starts from zeros

    def consumer(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The input's part of every gate pre-activation, directions concatenated: x @ W_ih^T."""
        ws = [self.tensor(f"weight_ih_l0{s}").detach().double() for s in self.suffixes]
        return lambda x: torch.cat([x @ w.T for w in ws], -1)

    def kept_out(self, sel: Any, values: dict[str, Any]) -> torch.Tensor:
        """The kept hidden units, directions concatenated (the output's last dim)."""
        return sel.present_map(sel.analysis.class_maps[self.node.name][0], -1,
                               self.hidden_size * len(self.suffixes))

    def kept_consumer_out(self, sel: Any, values: dict[str, Any], size: int) -> torch.Tensor:
        units = self.kept_out(sel, values).reshape(len(self.suffixes), -1)
        return torch.cat([u.repeat(GATES) for u in units])

    def shrink(self, keep_in: torch.Tensor, keep_out: torch.Tensor) -> None:
        units = keep_out.reshape(len(self.suffixes), -1)
        for s, unit in zip(self.suffixes, units):
            rows = unit.repeat(GATES)
            w_ih = self.tensor(f"weight_ih_l0{s}")
            replace_tensor(self.gm, self.tensors[f"weight_ih_l0{s}"], keep(keep(w_ih, 0, rows), 1, keep_in))
            w_hh = self.tensor(f"weight_hh_l0{s}")
            replace_tensor(self.gm, self.tensors[f"weight_hh_l0{s}"], keep(keep(w_hh, 0, rows), 1, unit))
            for kind in ("bias_ih", "bias_hh"):
                self.cut(f"{kind}_l0{s}", 0, rows)
        self.form.set("input_size", int(keep_in.sum()))
        if not keep_out.all():
            self.form.set("hidden_size", int(units[0].sum()))

    def fold_bias(self, vec: torch.Tensor) -> None:
        for s, part in zip(self.suffixes, vec.reshape(len(self.suffixes), -1)):
            with torch.no_grad():
                self.tensor(f"bias_ih_l0{s}").add_(part.to(self.tensor(f"bias_ih_l0{s}").dtype))


def rule_lstm(st: AnalysisState, node: fx.Node) -> Any:
    view, m, why = read_layer(st, node, LstmView, "LSTM")
    if why or view.unsupported():
        return opaque(st, node, why or view.unsupported())
    hidden, width = view.hidden_size, view.tensor("weight_ih_l0").shape[1]
    last = m.dim() - 1
    vec = channel_vector(st, m, last, width)
    if vec is None:
        return opaque(st, node, "LSTM input whose channels are not on the last dim")
    for s in view.suffixes:
        st.add_slice(view.tensors[f"weight_ih_l0{s}"], 1, torch.arange(width), vec, "consumer", node.name)
    if "bias_ih_l0" in view.tensors:
        st.fold_sites.append(node.name)
    else:
        st.pin(vec, f"{node.name} (lstm): an LSTM without biases has nowhere to fold a removed input's constant")
    units = []
    for s in view.suffixes:
        cls = st.fresh(hidden)
        rows = cls.repeat(GATES)
        for kind in _KINDS:  # biases too: a unit with zero rows but a bias is not zero
            if f"{kind}_l0{s}" in view.tensors:
                st.add_slice(view.tensors[f"{kind}_l0{s}"], 0, torch.arange(GATES * hidden), rows, "producer",
                             node.name)
        st.add_slice(view.tensors[f"weight_hh_l0{s}"], 1, torch.arange(hidden), cls, "consumer", node.name)
        units.append(cls)
    if len(units) > 1:
        st.uniform.append(units)  # one hidden_size for both directions
    if not view.initial_state_is_zeros():
        for cls in units:
            st.pin(cls, f"{node.name} (lstm): an initial state other than zeros keeps every hidden unit")
    out = torch.cat(units).reshape([1] * last + [hidden * len(units)])
    # h_n, c_n: [direction, batch, unit]. Read downstream, they hold the units (and a unit goes
    # only where the same unit goes in both directions, as for any map over two dims); unread,
    # they carry no channels, so that the directions may lose different units.
    state = torch.stack(units).reshape(len(units), 1, hidden) if _state_read(node) else const_map(3)
    if node.op == "call_module":  # nn.LSTM returns (output, (h_n, c_n)); aten.lstm a flat triple
        return (out, (state, state.clone()))
    return (out, state, state.clone())


def _state_read(node: fx.Node) -> bool:
    """Does anything read h_n or c_n (element 1, or 1 and 2, of the LSTM's result)?"""
    for user in node.users:
        if not (user.op == "call_function" and user.target is operator.getitem):
            return True
        if user.args[1] != 0 and value_users(user):
            return True
    return False


register(OpSpec("lstm", Match(modules=(nn.LSTM,), aten=("lstm",)), rule_lstm, layer=LstmView))
