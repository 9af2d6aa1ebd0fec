"""Per-op channel rules: how each kind of op couples, creates, reads or passes channel classes.

`classify(node, state)` names the op kind; `RULES[kind](state, node)` returns the class map(s)
of the node's output and records slices, unions and pins in the AnalysisState. Every op not
listed here is `opaque`: it pins the classes of its inputs and gives its outputs a fresh pinned
class, so an op the analysis does not understand can only keep channels, never break a model.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from rwdeploy.passes import channel_provenance as provenance
from rwdeploy.passes.channel_state import (
    CONST,
    AnalysisState,
    TensorMeta,
    along,
    compress,
    const_map,
    has_tensor,
    varying_dims,
)

Rule = Callable[[AnalysisState, fx.Node], Any]

ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid, nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad1d,
    nn.ConstantPad2d, nn.ConstantPad3d, nn.ReflectionPad1d, nn.ReflectionPad2d,
    nn.ReplicationPad1d, nn.ReplicationPad2d,
)
UNARY_FUNCTIONS = {
    F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.elu,
    F.leaky_relu, F.mish, F.softplus, F.hardtanh, F.selu, F.celu, F.logsigmoid, F.softsign,
    F.dropout, F.dropout1d, F.dropout2d, F.threshold, torch.relu, torch.sigmoid, torch.tanh,
    torch.exp, torch.abs, torch.sqrt, torch.rsqrt, torch.clamp, torch.clip, torch.neg, torch.erf,
    torch.log, torch.sin, torch.cos, torch.square, torch.log1p, torch.expm1, torch.reciprocal,
    operator.neg,
}
UNARY_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "exp", "abs", "sqrt", "rsqrt", "clamp",
    "clamp_", "clip", "neg", "erf", "log", "sin", "cos", "square", "clamp_min", "clamp_max",
    "reciprocal", "log1p", "contiguous", "clone", "detach", "to", "float", "double", "half",
    "type_as", "hardswish",
}
BINARY_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, operator.pow, torch.add, torch.sub, torch.subtract,
    torch.mul, torch.multiply, torch.div, torch.true_divide, torch.maximum, torch.minimum,
    torch.pow,
}
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum",
                  "minimum", "true_divide"}
SHAPE_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.cat, torch.concat, torch.stack, torch.flip, torch.roll, torch.movedim, torch.swapaxes,
    torch.t, torch.split, torch.chunk, torch.unbind, torch.narrow, torch.select, torch.tile,
    operator.getitem, F.pixel_shuffle, F.pixel_unshuffle,
}
SHAPE_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "expand",
    "expand_as", "repeat", "flip", "roll", "movedim", "t", "split", "chunk", "unbind", "narrow",
    "select", "swapaxes", "unflatten",
}
REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var,
                    torch.logsumexp, torch.prod}
REDUCE_METHODS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod"}
SOFTMAX_FUNCTIONS = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
SOFTMAX_METHODS = {"softmax", "log_softmax"}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm}
MATMUL_METHODS = {"matmul", "bmm"}
SPATIAL_FUNCTIONS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.lp_pool1d, F.lp_pool2d, F.pad,
}
FACTORY_FUNCTIONS = {torch.zeros, torch.ones, torch.full, torch.arange, torch.tensor, torch.eye,
                     torch.linspace, torch.zeros_like, torch.ones_like, torch.full_like}
NORM_FUNCTIONS = {F.layer_norm, F.instance_norm}
# Ops whose arguments name channel-dim sizes or offsets that the removal pass rewrites.
RESIZING = {"view", "reshape", "expand", "unflatten", "split", "chunk", "narrow", "select", "getitem"}


def op_name(node: fx.Node) -> str:
    """A short human name of the op a node runs (for pin reasons and records)."""
    if node.op == "call_module":
        return f"{node.target} ({type(node.graph.owning_module.get_submodule(node.target)).__name__})"
    if node.op == "call_method":
        return f"{node.name} (.{node.target}())"
    name = getattr(node.target, "__name__", str(node.target))
    return f"{node.name} ({name})"


def base_name(node: fx.Node) -> str:
    """'conv2d' for aten.conv2d.default, F.conv2d and .conv2d(); the op's plain name."""
    t = node.target
    if node.op == "call_method":
        return t
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__.lstrip("_")
    return getattr(t, "__name__", "")


# ATen ops (graphs from torch.export / .pt2 programs), by plain name.
ATEN_KINDS: dict[str, str] = {
    **dict.fromkeys(("relu", "relu_", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "sigmoid", "tanh",
                     "hardswish", "hardswish_", "hardsigmoid", "leaky_relu", "elu", "mish", "softplus",
                     "clone", "dropout", "alias", "detach", "contiguous", "to_copy", "clamp", "clamp_min",
                     "clamp_max", "exp", "abs", "sqrt", "rsqrt", "neg", "erf", "log", "square",
                     "reciprocal"), "unary"),
    **dict.fromkeys(("add", "add_", "sub", "mul", "mul_", "div", "maximum", "minimum", "pow"), "binary"),
    **dict.fromkeys(("view", "unsafe_view", "reshape", "flatten", "permute", "transpose", "t", "unsqueeze",
                     "squeeze", "cat", "concat", "stack", "split", "split_with_sizes", "chunk", "slice",
                     "select", "expand", "unbind", "narrow", "roll", "flip", "repeat"), "shape"),
    **dict.fromkeys(("mean", "sum", "amax", "amin"), "reduce"),
    **dict.fromkeys(("softmax", "log_softmax"), "softmax"),
    **dict.fromkeys(("matmul", "bmm"), "matmul"),
    **dict.fromkeys(("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d",
                     "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
                     "upsample_nearest2d", "upsample_bilinear2d", "pad", "constant_pad_nd"), "spatial"),
    **dict.fromkeys(("conv1d", "conv2d", "conv3d"), "fconv"),
    **dict.fromkeys(("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"), "fconv_transpose"),
    "linear": "flinear",
    "batch_norm": "fbatchnorm",
    "group_norm": "fgroupnorm",
    "prelu": "fprelu",
    "layer_norm": "functional_norm",
}


def classify(node: fx.Node, st: AnalysisState) -> str:
    """The op kind of a node; the key of RULES."""
    if node.op in ("placeholder", "get_attr", "output"):
        return node.op
    meta = st.values.get(node.name)
    if not has_tensor(meta) and node.op != "call_module":
        if node.op == "call_method" and node.target in ("item", "tolist"):
            return "opaque"
        return "shape_value"  # sizes, dims, ints: reading shapes never couples channels
    tensor_inputs = [a for a in node.all_input_nodes if has_tensor(st.values.get(a.name))]
    if tensor_inputs and all(_is_const(st.maps.get(a.name)) for a in tensor_inputs) and node.op != "call_module":
        return "constant"
    if node.op == "call_module":
        mod = st.module(node)
        if type(mod).__name__ == "GuardsFn" and not has_tensor(meta):
            return "shape_value"  # torch.export's input-shape guards: they read shapes only
        for types, kind in _MODULE_KINDS:
            if isinstance(mod, types):
                return kind
        return "opaque"
    t = node.target
    if node.op == "call_method":
        for names, kind in _METHOD_KINDS:
            if t in names:
                return kind
        return "opaque"
    if isinstance(t, torch._ops.OpOverload):
        return ATEN_KINDS.get(base_name(node), "opaque")
    for funcs, kind in _FUNCTION_KINDS:
        if t in funcs:
            return kind
    return "opaque"


def _is_const(m: Any) -> bool:
    if isinstance(m, torch.Tensor):
        return bool((m == CONST).all())
    if isinstance(m, (tuple, list)):
        return all(_is_const(x) for x in m)
    return m is None


# ---------------------------------------------------------------------------------------
# rules


def rule_placeholder(st: AnalysisState, node: fx.Node) -> Any:
    return st.pinned_fresh(st.values[node.name], f"model input {node.name}")


def rule_get_attr(st: AnalysisState, node: fx.Node) -> Any:
    meta = st.values[node.name]
    provenance.start(st, node)
    return const_map(len(meta.shape)) if isinstance(meta, TensorMeta) else None


def rule_output(st: AnalysisState, node: fx.Node) -> Any:
    for a in node.all_input_nodes:
        st.pin(st.maps.get(a.name), "model output")
    return None


def rule_shape_value(st: AnalysisState, node: fx.Node) -> Any:
    return None


def rule_constant(st: AnalysisState, node: fx.Node) -> Any:
    provenance.follow(st, node, base_name(node))
    return _const_like(st.values[node.name])


def _const_like(meta: Any) -> Any:
    if isinstance(meta, TensorMeta):
        return const_map(len(meta.shape))
    if isinstance(meta, (tuple, list)) and not isinstance(meta, torch.Size):
        return tuple(_const_like(m) for m in meta)
    return None


def rule_opaque(st: AnalysisState, node: fx.Node, why: str = "not understood by the channel analysis") -> Any:
    reason = f"{op_name(node)}: {why}"
    for a in node.all_input_nodes:
        st.pin(st.maps.get(a.name), reason)
    return st.pinned_fresh(st.values[node.name], reason)


def _single_input(st: AnalysisState, node: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node) or not isinstance(st.maps.get(x.name), torch.Tensor):
        return None
    return x, st.canon(st.maps[x.name])


def channel_vector(st: AnalysisState, m: torch.Tensor, dim: int, size: int) -> torch.Tensor | None:
    """The class of each index along `dim`, when the other dims do not change it.

    Positions holding a constant (a class token concatenated in front of the tokens) may
    share an index with a class only when that class is pinned: a kept channel keeps them.
    """
    dim = dim % m.dim()
    others = [d for d in varying_dims(m) if d != dim]
    if not others:
        return along(m, dim, size)
    cols = m.movedim(dim, 0).reshape(m.shape[dim], -1)
    vec = []
    for col in cols:
        ids = col.unique()
        known = ids[ids >= 0]
        if len(known) > 1 or (len(known) == 1 and len(ids) > 1 and not st.is_pinned(int(known[0]))):
            return None
        vec.append(int(known[0]) if len(known) else CONST)
    return along(torch.tensor(vec, dtype=torch.long), 0, size)


def rule_unary(st: AnalysisState, node: fx.Node) -> Any:
    got = _single_input(st, node)
    if got is None:
        return rule_opaque(st, node)
    out = st.values[node.name]
    if not isinstance(out, TensorMeta) or len(out.shape) != got[1].dim():
        return rule_opaque(st, node, "elementwise op changes the rank")
    for a in node.all_input_nodes[1:]:  # e.g. type_as(other): other's values are not read
        if node.op == "call_method" and node.target in ("type_as", "to"):
            continue
        st.pin(st.maps.get(a.name), f"{op_name(node)}: extra tensor argument")
    return got[1]


def _aligned(m: torch.Tensor, ndim: int) -> torch.Tensor:
    return m.reshape((1,) * (ndim - m.dim()) + tuple(m.shape))


def rule_binary(st: AnalysisState, node: fx.Node) -> Any:
    operands = [a for a in list(node.args) + list(node.kwargs.values())
                if isinstance(a, fx.Node) and isinstance(st.values.get(a.name), TensorMeta)]
    out = st.values[node.name]
    if not isinstance(out, TensorMeta) or not operands or len(operands) > 2:
        return rule_opaque(st, node)
    ndim = len(out.shape)
    if len(operands) == 1:  # the other operand is a Python scalar
        return _aligned(st.maps[operands[0].name], ndim)
    a, b = operands
    ma, mb = torch.broadcast_tensors(_aligned(st.maps[a.name], ndim), _aligned(st.maps[b.name], ndim))
    for this, mine, other in ((a, ma, mb), (b, mb, ma)):
        _constant_operand(st, node, this, mine, other, ndim)
    st.uf.union_pairs(ma, mb)
    return compress(torch.where(ma >= 0, ma, mb))


def _constant_operand(st: AnalysisState, node: fx.Node, arg: fx.Node, mine: torch.Tensor,
                      other: torch.Tensor, ndim: int) -> None:
    """A constant operand that varies along channels must be sliced with them (or pins them)."""
    shape = (1,) * (ndim - len(st.shape(arg))) + tuple(st.shape(arg))
    dims = [d for d in range(ndim) if other.shape[d] > 1 and shape[d] > 1
            and bool(((mine == CONST) & (other >= 0)).any())]
    if not dims:
        return
    prov = provenance.provenance_of(st, arg)
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


def _state_tensor(st: AnalysisState, arg: fx.Node) -> torch.Tensor | None:
    if arg.op != "get_attr":
        return None
    try:
        t = st.gm.get_parameter(arg.target)
    except AttributeError:
        try:
            t = st.gm.get_buffer(arg.target)
        except AttributeError:
            return None
    return t if arg.target in st.gm.state_dict() else None


def _materialize(st: AnalysisState, a: Any) -> Any:
    if isinstance(a, fx.Node):
        meta, m = st.values.get(a.name), st.maps.get(a.name)
        if isinstance(meta, TensorMeta):
            return m.expand(meta.shape)
        if isinstance(meta, (tuple, list)) and not isinstance(meta, torch.Size) and has_tensor(meta):
            return tuple(mm.expand(mt.shape) if isinstance(mt, TensorMeta) else mt for mm, mt in zip(m, meta))
        return meta
    if isinstance(a, (tuple, list)):
        return type(a)(_materialize(st, x) for x in a)
    if isinstance(a, dict):
        return {k: _materialize(st, v) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_materialize(st, a.start), _materialize(st, a.stop), _materialize(st, a.step))
    return a


def _matches(result: Any, meta: Any) -> bool:
    if isinstance(meta, TensorMeta):
        return isinstance(result, torch.Tensor) and tuple(result.shape) == meta.shape
    if isinstance(meta, (tuple, list)):
        return isinstance(result, (tuple, list)) and len(result) == len(meta) and all(
            _matches(r, m) for r, m in zip(result, meta))
    return not isinstance(result, torch.Tensor)


def _compress_all(result: Any) -> Any:
    if isinstance(result, torch.Tensor):
        return compress(result)
    if isinstance(result, (tuple, list)):
        return tuple(_compress_all(r) for r in result)
    return None


def rule_shape(st: AnalysisState, node: fx.Node) -> Any:
    """Ops that only move elements: apply the same op to the class maps."""
    args, kwargs = _materialize(st, node.args), _materialize(st, node.kwargs)
    try:
        if node.op == "call_method":
            name = "reshape" if node.target == "view" else node.target
            result = getattr(args[0], name)(*args[1:], **kwargs)
        elif base_name(node) in ("view", "unsafe_view"):  # class maps are expanded views
            result = torch.reshape(*args, **kwargs)
        else:
            result = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - an op the int maps cannot follow is not understood
        return rule_opaque(st, node, "shape op the analysis could not follow")
    if not _matches(result, st.values[node.name]):
        return rule_opaque(st, node, "shape op the analysis could not follow")
    if not _record_presence(st, node):
        return rule_opaque(st, node, "indexing along channels in a way the pass cannot rewrite")
    return _compress_all(result)


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _record_presence(st: AnalysisState, node: fx.Node) -> bool:
    """Splits, slices and selects along a channel dim: each piece must keep >= 1 channel."""
    name = base_name(node)
    x = node.args[0] if node.args else None
    m = st.maps.get(x.name) if isinstance(x, fx.Node) else None
    if not isinstance(m, torch.Tensor):
        return True
    shape = st.shape(x)
    if name == "slice":  # aten.slice(x, dim, start, end, step)
        dim = _arg(node, 1, "dim", 0) % len(shape)
        if m.shape[dim] == 1:
            return True
        if _arg(node, 4, "step", 1) != 1:
            return False
        lo, hi, _ = slice(_arg(node, 2, "start"), _arg(node, 3, "end")).indices(shape[dim])
        if hi > lo:
            st.presence.append((x.name, dim, lo, hi))
        return True
    if name in ("split", "split_with_sizes", "chunk", "unbind"):
        dim = _arg(node, 2 if name != "unbind" else 1, "dim", 0)
        dim = dim % len(shape)
        if m.shape[dim] == 1:
            return True
        start = 0
        for piece in st.values[node.name]:
            size = piece.shape[dim] if name != "unbind" else 1
            st.presence.append((x.name, dim, start, start + size))
            start += size
        return True
    if name in ("narrow", "select"):
        dim = _arg(node, 1, "dim") % len(shape)
        if m.shape[dim] == 1:
            return True
        if not all(isinstance(v, int) for v in node.args[1:]):
            return False
        start = _arg(node, 2, "start" if name == "narrow" else "index") % shape[dim]
        length = _arg(node, 3, "length", 1) if name == "narrow" else 1
        st.presence.append((x.name, dim, start, start + length))
        return True
    if name == "getitem":
        items = index_items(node.args[1], len(shape))
        if items is None:
            return False
        for dim, item in items:
            if dim is None or m.shape[dim] == 1:
                continue
            if isinstance(item, slice):
                if item.step not in (None, 1) or not all(
                        v is None or isinstance(v, int) for v in (item.start, item.stop)):
                    return False
                lo, hi, _ = item.indices(shape[dim])
                if hi > lo:
                    st.presence.append((x.name, dim, lo, hi))
            elif isinstance(item, int):
                i = item % shape[dim]
                st.presence.append((x.name, dim, i, i + 1))
            else:
                return False
    return True


def index_items(idx: Any, ndim: int) -> list[tuple[int | None, Any]] | None:
    """Pair each element of a tensor index with the input dim it addresses (None for `None`)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    consuming = sum(1 for e in idx if e is not None and e is not Ellipsis)
    items: list[tuple[int | None, Any]] = []
    d = 0
    for e in idx:
        if e is None:
            items.append((None, e))
        elif e is Ellipsis:
            d += ndim - consuming
        elif isinstance(e, (int, slice)):
            items.append((d, e))
            d += 1
        else:
            return None
    return items


def rule_spatial(st: AnalysisState, node: fx.Node) -> Any:
    """Pooling, interpolation and padding work per channel over the trailing spatial dims."""
    got = _single_input(st, node)
    out = st.values[node.name]
    if got is None or not isinstance(out, TensorMeta) or len(out.shape) != got[1].dim():
        return rule_opaque(st, node, "pooling/padding with an unexpected signature")
    x, m = got
    spatial = _spatial_rank(st, node, len(st.shape(x)))
    if any(d >= m.dim() - spatial for d in varying_dims(m)):
        return rule_opaque(st, node, "pooling/padding over a dim that carries channels")
    for a in node.all_input_nodes[1:]:
        st.pin(st.maps.get(a.name), f"{op_name(node)}: extra tensor argument")
    return m


def _spatial_rank(st: AnalysisState, node: fx.Node, ndim: int) -> int:
    if node.op == "call_module":
        mod = st.module(node)
        if isinstance(mod, (nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
                            nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d,
                            nn.ReplicationPad2d)):
            return len(mod.padding) // 2
        for k in (1, 2, 3):
            if type(mod).__name__.endswith(f"{k}d"):
                return k
        return ndim - 2
    if node.target is F.pad or base_name(node) in ("pad", "constant_pad_nd"):
        return len(_arg(node, 1, "pad")) // 2
    name = base_name(node)
    for k in (1, 2, 3):
        if name.endswith(f"{k}d"):
            return k
    return ndim - 2


def _reduce_dims(node: fx.Node, ndim: int) -> list[int] | None:
    dim = _arg(node, 1, "dim")
    if dim is None or isinstance(dim, fx.Node):
        return None if dim is None else []
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % ndim for d in dims)


def rule_reduce(st: AnalysisState, node: fx.Node) -> Any:
    got = _single_input(st, node)
    out = st.values[node.name]
    if got is None or not isinstance(out, TensorMeta):
        return rule_opaque(st, node)
    x, m = got
    dims = _reduce_dims(node, m.dim())
    if dims == []:
        return rule_opaque(st, node, "reduction over dims computed at run time")
    dims = list(range(m.dim())) if dims is None else dims
    keepdim = bool(_arg(node, 2, "keepdim", False)) if _arg(node, 1, "dim") is not None else False
    if any(d in varying_dims(m) for d in dims):
        st.uf.union_all(m)  # a reduction over channels mixes them: they go together or stay
        known = m[m >= 0]
        rep = int(known.min()) if known.numel() else CONST
        return torch.full([1] * len(out.shape), rep, dtype=torch.long)
    index = tuple(slice(0, 1) if d in dims else slice(None) for d in range(m.dim()))
    r = m[index]
    if not keepdim:
        r = r.reshape([s for d, s in enumerate(r.shape) if d not in dims])
    if r.dim() != len(out.shape):
        return rule_opaque(st, node)
    return r


def rule_softmax(st: AnalysisState, node: fx.Node) -> Any:
    got = _single_input(st, node)
    if got is None:
        return rule_opaque(st, node)
    x, m = got
    if node.op == "call_module":
        dim = st.module(node).dim
    else:
        dim = _arg(node, 1, "dim")
    if not isinstance(dim, int):
        return rule_opaque(st, node, "softmax without an explicit dim")
    if dim % m.dim() in varying_dims(m):
        st.uf.union_all(m)
    return m


def rule_matmul(st: AnalysisState, node: fx.Node) -> Any:
    """Activation x activation products (attention): everything feeding one batch entry goes together."""
    a, b = node.args[0], node.args[1]
    out = st.values[node.name]
    if not all(isinstance(v, fx.Node) and isinstance(st.values.get(v.name), TensorMeta) for v in (a, b)):
        return rule_opaque(st, node)
    if _state_tensor(st, a) is not None or _state_tensor(st, b) is not None:
        return rule_opaque(st, node, "matmul with a weight tensor (use nn.Linear)")
    ma, mb = st.maps[a.name], st.maps[b.name]
    if ma.dim() < 2 or mb.dim() < 2 or not isinstance(out, TensorMeta):
        return rule_opaque(st, node)
    nb = len(out.shape) - 2
    # union, for every (broadcast) batch entry, all classes of a[entry] and b[entry]
    ga = _aligned(ma, nb + 2).flatten(-2)
    gb = _aligned(mb, nb + 2).flatten(-2)
    batch = torch.broadcast_shapes(ga.shape[:-1], gb.shape[:-1])
    ga = ga.expand(*batch, ga.shape[-1]).reshape(-1, ga.shape[-1])
    gb = gb.expand(*batch, gb.shape[-1]).reshape(-1, gb.shape[-1])
    rep = []
    for i in range(ga.shape[0]):
        ids = torch.cat([ga[i], gb[i]])
        st.uf.union_all(ids)
        known = ids[ids >= 0]
        rep.append(int(known.min()) if known.numel() else CONST)
    return compress(torch.tensor(rep, dtype=torch.long).reshape(*batch, 1, 1))


def rule_conv(st: AnalysisState, node: fx.Node) -> Any:
    mod = st.module(node)
    got = _single_input(st, node)
    if got is None or len(node.args) != 1 or node.kwargs:
        return rule_opaque(st, node, "convolution called with extra arguments")
    bias = f"{node.target}.bias" if mod.bias is not None else None
    return _conv_classes(st, node, got[1], f"{node.target}.weight", bias, mod.in_channels,
                         mod.out_channels, mod.groups, len(mod.kernel_size))


CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
CONV_TRANSPOSE_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
LINEAR_ARGS = ("input", "weight", "bias")
GROUPNORM_ARGS = ("input", "num_groups", "weight", "bias", "eps")
PRELU_ARGS = ("input", "weight")
BATCHNORM_ARGS = {  # F.batch_norm and aten.batch_norm order their arguments differently
    "F": ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
    "aten": ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps",
             "cudnn_enabled"),
}


def bound_args(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    out = dict(zip(names, node.args))
    out.update(node.kwargs)
    return out


def batchnorm_arg_names(node: fx.Node) -> tuple[str, ...]:
    return BATCHNORM_ARGS["aten" if isinstance(node.target, torch._ops.OpOverload) else "F"]


def param_key(st: AnalysisState, arg: Any) -> str | None:
    """The state_dict key of a get_attr argument used by this node only, else None."""
    if not isinstance(arg, fx.Node) or _state_tensor(st, arg) is None or len(arg.users) != 1:
        return None
    return arg.target


def _param_keys(st: AnalysisState, b: dict[str, Any], required: tuple[str, ...],
                optional: tuple[str, ...]) -> dict[str, str | None] | None:
    keys: dict[str, str | None] = {}
    for name in required + optional:
        arg = b.get(name)
        keys[name] = param_key(st, arg) if arg is not None else None
        if keys[name] is None and (name in required or arg is not None):
            return None
    return keys


def _functional_layer(st: AnalysisState, node: fx.Node, names: tuple[str, ...]):
    """(bound args, parameter keys, weight) of a functional layer, or None if not a plain one."""
    b = bound_args(node, names)
    keys = _param_keys(st, b, ("weight",), ("bias",))
    x = b.get("input")
    if keys is None or not isinstance(st.maps.get(getattr(x, "name", None)), torch.Tensor):
        return None
    return b, keys, _state_tensor(st, b["weight"])


def rule_fconv(st: AnalysisState, node: fx.Node) -> Any:
    """F.conv2d / aten.conv2d with parameters read through get_attr (graphs of .pt2 programs)."""
    got = _functional_layer(st, node, CONV_ARGS)
    if got is None:
        return rule_opaque(st, node, "functional convolution whose weight is not a parameter used once")
    b, keys, w = got
    x = b["input"]
    g = b.get("groups", 1)
    if not isinstance(g, int):
        return rule_opaque(st, node)
    return _conv_classes(st, node, st.canon(st.maps[x.name]), keys["weight"], keys["bias"],
                         w.shape[1] * g, w.shape[0], g, w.dim() - 2)


def _conv_classes(st: AnalysisState, node: fx.Node, m: torch.Tensor, weight: str, bias: str | None,
                  cin: int, cout: int, g: int, spatial: int) -> Any:
    if m.dim() != spatial + 2 or any(d != 1 for d in varying_dims(m)):
        return rule_opaque(st, node, "convolution input whose channels are not on dim 1")
    vec = along(m, 1, cin)
    ones = [1] * spatial
    if g == cin and g > 1:  # depthwise (with channel multiplier k): output c*k.. follows input c
        out = vec.repeat_interleave(cout // cin)
        for key in (weight, bias):
            if key is not None:
                st.add_slice(key, 0, torch.arange(cout), out, "follower", node.name)
        return compress(out.reshape(1, cout, *ones))
    index = torch.arange(cin)
    span = None
    if g > 1:
        per_in, per_out = cin // g, cout // g
        group = index // per_in
        index = index % per_in
        span = torch.stack([group * per_out, (group + 1) * per_out], 1)
    st.add_slice(weight, 1, index, vec, "consumer", node.name, span)
    st.fold_sites.append(node.name)
    out = st.fresh(cout)
    st.add_slice(weight, 0, torch.arange(cout), out, "producer", node.name)
    if bias is not None:
        st.add_slice(bias, 0, torch.arange(cout), out, "follower", node.name)
    if g > 1:
        st.uniform.append(list(vec.reshape(g, -1)))
        st.uniform.append(list(out.reshape(g, -1)))
    return out.reshape(1, cout, *ones)


def rule_conv_transpose(st: AnalysisState, node: fx.Node) -> Any:
    mod = st.module(node)
    got = _single_input(st, node)
    if got is None or len(node.args) != 1 or node.kwargs or mod.groups != 1:
        return rule_opaque(st, node, "transposed convolution with groups or output_size")
    bias = f"{node.target}.bias" if mod.bias is not None else None
    return _conv_transpose_classes(st, node, got[1], f"{node.target}.weight", bias,
                                   mod.in_channels, mod.out_channels, len(mod.kernel_size))


def rule_fconv_transpose(st: AnalysisState, node: fx.Node) -> Any:
    got = _functional_layer(st, node, CONV_TRANSPOSE_ARGS)
    if got is None or got[0].get("groups", 1) != 1:
        return rule_opaque(st, node, "functional transposed convolution with groups or shared weights")
    b, keys, w = got
    return _conv_transpose_classes(st, node, st.canon(st.maps[b["input"].name]), keys["weight"], keys["bias"],
                                   w.shape[0], w.shape[1], w.dim() - 2)


def _conv_transpose_classes(st: AnalysisState, node: fx.Node, m: torch.Tensor, weight: str, bias: str | None,
                            cin: int, cout: int, spatial: int) -> Any:
    """Weight [Cin, Cout, k...]: dim 0 reads the input channels, dim 1 produces the output."""
    if m.dim() != spatial + 2 or any(d != 1 for d in varying_dims(m)):
        return rule_opaque(st, node, "convolution input whose channels are not on dim 1")
    st.add_slice(weight, 0, torch.arange(cin), along(m, 1, cin), "consumer", node.name)
    st.fold_sites.append(node.name)
    out = st.fresh(cout)
    st.add_slice(weight, 1, torch.arange(cout), out, "producer", node.name)
    if bias is not None:
        st.add_slice(bias, 0, torch.arange(cout), out, "follower", node.name)
    return out.reshape(1, cout, *([1] * spatial))


def rule_linear(st: AnalysisState, node: fx.Node) -> Any:
    mod = st.module(node)
    got = _single_input(st, node)
    if got is None or len(node.args) != 1 or node.kwargs:
        return rule_opaque(st, node)
    bias = f"{node.target}.bias" if mod.bias is not None else None
    return _linear_classes(st, node, got[1], f"{node.target}.weight", bias, mod.in_features, mod.out_features)


def rule_flinear(st: AnalysisState, node: fx.Node) -> Any:
    got = _functional_layer(st, node, LINEAR_ARGS)
    if got is None:
        return rule_opaque(st, node, "functional linear whose weight is not a parameter used once")
    b, keys, w = got
    x = b["input"]
    if w.dim() != 2:
        return rule_opaque(st, node)
    return _linear_classes(st, node, st.canon(st.maps[x.name]), keys["weight"], keys["bias"], w.shape[1], w.shape[0])


def _linear_classes(st: AnalysisState, node: fx.Node, m: torch.Tensor, weight: str, bias: str | None,
                    fin: int, fout: int) -> Any:
    last = m.dim() - 1
    vec = channel_vector(st, m, last, fin)
    if vec is None:
        return rule_opaque(st, node, "linear input whose channels are not on the last dim")
    st.add_slice(weight, 1, torch.arange(fin), vec, "consumer", node.name)
    st.fold_sites.append(node.name)
    out = st.fresh(fout)
    st.add_slice(weight, 0, torch.arange(fout), out, "producer", node.name)
    if bias is not None:
        st.add_slice(bias, 0, torch.arange(fout), out, "follower", node.name)
    return out.reshape([1] * last + [fout])


def _channel_dim1(st: AnalysisState, node: fx.Node) -> tuple[fx.Node, torch.Tensor] | None:
    got = _single_input(st, node)
    if got is None or len(node.args) != 1 or node.kwargs:
        return None
    if any(d != 1 for d in varying_dims(got[1])) or got[1].dim() < 2:
        return None
    return got


def rule_batchnorm(st: AnalysisState, node: fx.Node) -> Any:
    got = _channel_dim1(st, node)
    if got is None:
        return rule_opaque(st, node, "batch norm input whose channels are not on dim 1")
    mod = st.module(node)
    if mod.training:
        return rule_opaque(st, node, "batch norm in training mode (call .eval())")
    vec = along(got[1], 1, mod.num_features)
    st.add_module_slices(node, ("weight", "bias", "running_mean", "running_var"), 0, vec, "follower")
    return got[1]


def rule_fbatchnorm(st: AnalysisState, node: fx.Node) -> Any:
    b = bound_args(node, batchnorm_arg_names(node))
    keys = _param_keys(st, b, (), ("weight", "bias", "running_mean", "running_var"))
    x = b.get("input")
    m = st.maps.get(getattr(x, "name", None))
    if keys is None or not isinstance(m, torch.Tensor) or b.get("training", False) is not False:
        return rule_opaque(st, node, "functional batch norm (training, or parameters used elsewhere)")
    m = st.canon(m)
    if m.dim() < 2 or any(d != 1 for d in varying_dims(m)):
        return rule_opaque(st, node, "batch norm input whose channels are not on dim 1")
    vec = along(m, 1, st.shape(x)[1])
    for key in keys.values():
        if key is not None:
            st.add_slice(key, 0, torch.arange(len(vec)), vec, "follower", node.name)
    return m


def rule_groupnorm(st: AnalysisState, node: fx.Node) -> Any:
    got = _channel_dim1(st, node)
    if got is None:
        return rule_opaque(st, node, "group norm input whose channels are not on dim 1")
    mod = st.module(node)
    keys = [f"{node.target}.{n}" for n in ("weight", "bias") if getattr(mod, n, None) is not None]
    return _groupnorm_classes(st, node, got[1], mod.num_channels, mod.num_groups, keys)


def rule_fgroupnorm(st: AnalysisState, node: fx.Node) -> Any:
    b = bound_args(node, GROUPNORM_ARGS)
    keys = _param_keys(st, b, (), ("weight", "bias"))
    x = b.get("input")
    m = st.maps.get(getattr(x, "name", None))
    if keys is None or not isinstance(m, torch.Tensor) or not isinstance(b.get("num_groups"), int):
        return rule_opaque(st, node, "functional group norm with parameters used elsewhere")
    m = st.canon(m)
    if m.dim() < 2 or any(d != 1 for d in varying_dims(m)):
        return rule_opaque(st, node, "group norm input whose channels are not on dim 1")
    return _groupnorm_classes(st, node, m, st.shape(x)[1], b["num_groups"],
                              [k for k in keys.values() if k is not None])


def _groupnorm_classes(st: AnalysisState, node: fx.Node, m: torch.Tensor, channels: int, groups: int,
                       keys: list[str]) -> Any:
    vec = along(m, 1, channels)
    for ids in vec.reshape(groups, -1):
        st.uf.union_all(ids)  # statistics are per group: whole groups go or stay
    for key in keys:
        st.add_slice(key, 0, torch.arange(channels), vec, "follower", node.name)
    return m


def rule_layernorm(st: AnalysisState, node: fx.Node) -> Any:
    got = _single_input(st, node)
    if got is None:
        return rule_opaque(st, node)
    x, m = got
    if node.op == "call_module":
        k = len(st.module(node).normalized_shape)
    else:
        shape = _arg(node, 1, "normalized_shape")
        if not isinstance(shape, (tuple, list, torch.Size)):
            return rule_opaque(st, node)
        k = len(shape)
    if any(d >= m.dim() - k for d in varying_dims(m)):
        st.pin(m, f"{op_name(node)}: layer norm over channels; removing one would change the "
                  f"statistics of the others")
    return m


def rule_functional_norm(st: AnalysisState, node: fx.Node) -> Any:
    if node.target is F.layer_norm or base_name(node) == "layer_norm":
        return rule_layernorm(st, node)
    got = _single_input(st, node)
    if got is None:
        return rule_opaque(st, node)
    if varying_dims(got[1]):
        st.pin(got[1], f"{op_name(node)}: functional normalisation with channel-wise parameters")
    return got[1]


def rule_prelu(st: AnalysisState, node: fx.Node) -> Any:
    mod = st.module(node)
    if mod.num_parameters == 1:
        return rule_unary(st, node)
    got = _channel_dim1(st, node)
    if got is None:
        return rule_opaque(st, node, "PReLU input whose channels are not on dim 1")
    st.add_module_slices(node, ("weight",), 0, along(got[1], 1, mod.num_parameters), "follower")
    return got[1]


def rule_fprelu(st: AnalysisState, node: fx.Node) -> Any:
    b = bound_args(node, PRELU_ARGS)
    key = param_key(st, b.get("weight"))
    x = b.get("input")
    m = st.maps.get(getattr(x, "name", None))
    if key is None or not isinstance(m, torch.Tensor):
        return rule_opaque(st, node, "functional PReLU whose weight is not a parameter used once")
    m = st.canon(m)
    n = _state_tensor(st, b["weight"]).numel()
    if n == 1:
        return m
    if m.dim() < 2 or any(d != 1 for d in varying_dims(m)):
        return rule_opaque(st, node, "PReLU input whose channels are not on dim 1")
    st.add_slice(key, 0, torch.arange(n), along(m, 1, n), "follower", node.name)
    return m


def rule_flatten_module(st: AnalysisState, node: fx.Node) -> Any:
    got = _single_input(st, node)
    if got is None:
        return rule_opaque(st, node)
    mod = st.module(node)
    x, m = got
    r = torch.flatten(m.expand(st.shape(x)), mod.start_dim, mod.end_dim)
    return compress(r)


_MODULE_KINDS: list[tuple[Any, str]] = [
    ((nn.Conv1d, nn.Conv2d, nn.Conv3d), "conv"),
    ((nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), "conv_transpose"),
    ((nn.Linear,), "linear"),
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), "batchnorm"),
    ((nn.GroupNorm,), "groupnorm"),
    ((nn.LayerNorm,), "layernorm"),
    ((nn.PReLU,), "prelu"),
    (ELEMENTWISE_MODULES, "unary"),
    (SPATIAL_MODULES, "spatial"),
    ((nn.Softmax, nn.LogSoftmax), "softmax"),
    ((nn.Flatten,), "flatten_module"),
]
_METHOD_KINDS: list[tuple[set[str], str]] = [
    (UNARY_METHODS, "unary"), (BINARY_METHODS, "binary"), (SHAPE_METHODS, "shape"),
    (REDUCE_METHODS, "reduce"), (SOFTMAX_METHODS, "softmax"), (MATMUL_METHODS, "matmul"),
]
_FUNCTION_KINDS: list[tuple[set[Any], str]] = [
    (UNARY_FUNCTIONS, "unary"), (BINARY_FUNCTIONS, "binary"), (SHAPE_FUNCTIONS, "shape"),
    (REDUCE_FUNCTIONS, "reduce"), (SOFTMAX_FUNCTIONS, "softmax"), (MATMUL_FUNCTIONS, "matmul"),
    (SPATIAL_FUNCTIONS, "spatial"), (FACTORY_FUNCTIONS, "constant"), (NORM_FUNCTIONS, "functional_norm"),
    ({F.conv1d, F.conv2d, F.conv3d}, "fconv"),
    ({F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}, "fconv_transpose"), ({F.linear}, "flinear"), ({F.batch_norm}, "fbatchnorm"),
    ({F.group_norm}, "fgroupnorm"), ({F.prelu}, "fprelu"),
]

RULES: dict[str, Rule] = {
    "placeholder": rule_placeholder,
    "get_attr": rule_get_attr,
    "output": rule_output,
    "shape_value": rule_shape_value,
    "constant": rule_constant,
    "opaque": rule_opaque,
    "unary": rule_unary,
    "binary": rule_binary,
    "shape": rule_shape,
    "spatial": rule_spatial,
    "reduce": rule_reduce,
    "softmax": rule_softmax,
    "matmul": rule_matmul,
    "conv": rule_conv,
    "fconv": rule_fconv,
    "fconv_transpose": rule_fconv_transpose,
    "flinear": rule_flinear,
    "fbatchnorm": rule_fbatchnorm,
    "fgroupnorm": rule_fgroupnorm,
    "fprelu": rule_fprelu,
    "conv_transpose": rule_conv_transpose,
    "linear": rule_linear,
    "batchnorm": rule_batchnorm,
    "groupnorm": rule_groupnorm,
    "layernorm": rule_layernorm,
    "functional_norm": rule_functional_norm,
    "prelu": rule_prelu,
    "flatten_module": rule_flatten_module,
}
