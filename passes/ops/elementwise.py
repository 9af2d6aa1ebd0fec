"""Elementwise ops: activations and copies (unary), arithmetic on two or three operands
(add, mul, ..., addcmul), PReLU.

A unary op keeps every class where it is. An arithmetic op unifies its operands' classes
position by position (a residual add couples every producer of the sum; a gate multiplies into
the stream; `addcmul(beta, alpha, x)` is ResMLP's affine layer). A constant operand that
varies along channels (a layer-scale vector, a position table) is sliced with them when it is
a parameter read through known dims, and pins them otherwise. PReLU's weight follows its
input channels.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from rwdeploy.passes.channel_state import CONST, AnalysisState, TensorMeta, along, compress
from rwdeploy.passes.ops.common import aligned, channels_on_dim1, op_name, opaque, single_input
from rwdeploy.passes.ops.graph import provenance_of
from rwdeploy.passes.ops.layer import LayerView, read_layer
from rwdeploy.passes.ops.spec import Match, OpSpec, base_name, register

UNARY = Match(
    modules=(nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
             nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
             nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.Identity,
             nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout),
    functions=(F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.elu,
               F.leaky_relu, F.mish, F.softplus, F.hardtanh, F.selu, F.celu, F.logsigmoid, F.softsign,
               F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
               F.threshold, torch.relu, torch.sigmoid, torch.tanh,
               torch.exp, torch.abs, torch.sqrt, torch.rsqrt, torch.clamp, torch.clip, torch.neg, torch.erf,
               torch.log, torch.sin, torch.cos, torch.square, torch.log1p, torch.expm1, torch.reciprocal,
               torch.sign, torch.floor, torch.ceil, torch.round, torch.trunc, operator.neg, operator.invert),
    methods=("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "abs", "sqrt", "rsqrt", "clamp",
             "clamp_", "clip", "neg", "erf", "log", "sin", "cos", "square", "clamp_min", "clamp_max",
             "reciprocal", "log1p", "contiguous", "clone", "detach", "to", "float", "double", "half",
             "type_as", "hardswish", "bool", "int", "long", "sign", "floor", "ceil", "round", "gelu",
             "silu", "softplus", "expm1"),
    aten=("relu", "relu_", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "sigmoid", "tanh", "hardswish",
          "hardswish_", "hardsigmoid", "leaky_relu", "elu", "mish", "softplus", "clone", "dropout", "alias",
          "detach", "contiguous", "to_copy", "clamp", "clamp_min", "clamp_max", "exp", "abs", "sqrt", "rsqrt",
          "neg", "erf", "log", "square", "reciprocal", "to", "type_as", "sin", "cos", "log1p", "expm1", "sign",
          "floor", "ceil", "round", "trunc", "logical_not", "bitwise_not", "gelu_", "elu_", "leaky_relu_", "celu",
          "selu", "softshrink", "hardshrink", "log_sigmoid", "lift_fresh_copy",
          # in-place forms, as a .pt2 of a module that calls them keeps them
          "dropout_", "sigmoid_", "tanh_", "exp_", "clamp_", "clamp_min_", "clamp_max_", "hardsigmoid_",
          "mish_", "abs_", "neg_", "sqrt_", "rsqrt_", "erf_", "celu_", "selu_",
          # dropout2d / alpha dropout: the identity at inference, as the module forms above
          "feature_dropout", "alpha_dropout", "feature_alpha_dropout"),
)
BINARY = Match(
    functions=(operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
               operator.imul, operator.itruediv, operator.pow, torch.add, torch.sub, torch.subtract,
               torch.mul, torch.multiply, torch.div, torch.true_divide, torch.maximum, torch.minimum,
               torch.pow),
    methods=("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum",
             "true_divide", "copy_"),
    # copy_(view, src) writes src into a view of a value: the view's positions and src's join
    # classes as an add's operands do (MViT-V2 writes its relative positions into the logits)
    aten=("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow", "pow_",
          "copy_"),
)
# input + value * t1 * t2 (or / t2): three operands, coupled position by position like two
TERNARY = Match(functions=(torch.addcmul, torch.addcdiv), methods=("addcmul", "addcmul_", "addcdiv", "addcdiv_"),
                aten=("addcmul", "addcdiv"))
# casts read another tensor's dtype (and device) only, never its values
_READS_DTYPE_ONLY = {"to", "type_as"}


def rule_unary(st: AnalysisState, node: fx.Node) -> Any:
    got = single_input(st, node)
    if got is None:
        return opaque(st, node)
    out = st.values[node.name]
    if not isinstance(out, TensorMeta) or len(out.shape) != got[1].dim():
        return opaque(st, node, "elementwise op changes the rank")
    if base_name(node) in _READS_DTYPE_ONLY:  # x.to(other), type_as(other): other's values are not read
        return got[1]
    for a in node.all_input_nodes[1:]:
        st.pin(st.maps.get(a.name), f"{op_name(node)}: extra tensor argument")
    return got[1]


def rule_binary(st: AnalysisState, node: fx.Node) -> Any:
    """add, mul, ... (two operands) and addcmul / addcdiv (three): classes unify by position."""
    operands = [a for a in list(node.args) + list(node.kwargs.values())
                if isinstance(a, fx.Node) and isinstance(st.values.get(a.name), TensorMeta)]
    out = st.values[node.name]
    if not isinstance(out, TensorMeta) or not operands or len(operands) > 3:
        return opaque(st, node)
    ndim = len(out.shape)
    if len(operands) == 1:  # the others are Python scalars
        return aligned(st.maps[operands[0].name], ndim)
    maps = torch.broadcast_tensors(*(aligned(st.maps[a.name], ndim) for a in operands))
    for i, this in enumerate(operands):
        others = _first_known([m for j, m in enumerate(maps) if j != i])
        constant_operand(st, node, this, maps[i], others, ndim)
    known = maps[0]
    for m in maps[1:]:
        st.uf.union_pairs(known, m)
        known = torch.where(known >= 0, known, m)
    return compress(known)


def _first_known(maps: list[torch.Tensor]) -> torch.Tensor:
    """Position by position, the first map's class that is not CONST."""
    out = maps[0]
    for m in maps[1:]:
        out = torch.where(out >= 0, out, m)
    return out


def constant_operand(st: AnalysisState, node: fx.Node, arg: fx.Node, mine: torch.Tensor,
                     other: torch.Tensor, ndim: int) -> None:
    """A constant operand (class map `mine`, broadcast at rank `ndim`) combined with values of
    classes `other` must be sliced with them where it varies along them (or pins them)."""
    shape = (1,) * (ndim - len(st.shape(arg))) + tuple(st.shape(arg))
    dims = [d for d in range(ndim) if other.shape[d] > 1 and shape[d] > 1
            and bool(((mine == CONST) & (other >= 0)).any())]
    if not dims:
        return
    prov = provenance_of(st, arg)
    offset = ndim - len(prov[1]) if prov is not None else 0
    if prov is None or any(d < offset or prov[1][d - offset] is None for d in dims):
        st.pin(other, f"{op_name(node)}: operand {arg.name} is computed in forward() (or shared) "
                      f"and varies along channels, so it cannot be sliced")
        return
    key, param_dims = prov
    st.attr_followers.add(key)
    for d in dims:
        # index i along d belongs to every class found at i; the tensor keeps i unless all go
        moved = other.movedim(d, 0).reshape(other.shape[d], -1)
        for col in range(moved.shape[1]):
            st.add_slice(key, param_dims[d - offset], torch.arange(moved.shape[0]), moved[:, col],
                         "follower", node.name)


class PReLUView(LayerView):
    roles = ("weight",)
    call_args = ("input", "weight")
    generic_type = "PReLU"

    def shrink(self, keep_in: torch.Tensor, keep_out: torch.Tensor) -> None:
        if self.weight.numel() > 1:  # one slope per channel (a single shared slope stays)
            self.cut("weight", 0, keep_in)
            self.form.set("num_parameters", int(keep_in.sum()))


def rule_prelu(st: AnalysisState, node: fx.Node) -> Any:
    view, m, why = read_layer(st, node, PReLUView, "PReLU")
    if why:
        return opaque(st, node, why)
    n = view.weight.numel()
    if n == 1:
        return m
    if not channels_on_dim1(m):
        return opaque(st, node, "PReLU input whose channels are not on dim 1")
    st.add_slice(view.tensors["weight"], 0, torch.arange(n), along(m, 1, n), "follower", node.name)
    return m


register(
    OpSpec("unary", UNARY, rule_unary),
    OpSpec("binary", BINARY, rule_binary),
    OpSpec("ternary", TERNARY, rule_binary),
    OpSpec("prelu", Match(modules=(nn.PReLU,), functions=(F.prelu,), aten=("prelu",)), rule_prelu,
           layer=PReLUView),
)
