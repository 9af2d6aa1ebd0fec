"""rwdeploy's sparse custom ops in TVM Relax: converters to `call_tir` kernels, fused epilogues.

`import_exported_program(ep)` wraps `tvm.relax.frontend.torch.from_exported_program` with a
`custom_convert_map` (`convert_map()`) that turns every `rwdeploy::sparse_linear` /
`rwdeploy::sparse_conv2d` node into a `relax.call_tir` of a TIR kernel specialised to the layer
(`runtime.tvm_kernels`, `runtime.tvm_conv_kernels`). The kernels are plain TIR, so the module
builds for any LLVM target (x86, aarch64).

Fusion. A conv whose only user is a ReLU / ReLU6 (hardtanh, clamp) or a same-shape add is not
emitted when it is converted: its call is kept aside, and the user's converter emits one call
with the activation (and the add's other operand as a residual input) applied in the kernel's
epilogue. conv -> add -> relu (a ResNet block) becomes one kernel. Anything else falls back to
TVM's own converters, after the pending conv is emitted.

The weight arrays are graph inputs while converters run (bound as constants afterwards), so
everything derived from them - each stored weight's input offset - is emitted as Relax
arithmetic that the build folds into constants (FoldConstant).

Threads: TVM's pool is sized from TVM_NUM_THREADS when it starts (default: half the cores on
x86), so this module sets it to every core unless the caller already chose.
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import math  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from typing import Any, Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tvm  # noqa: E402
from torch import fx  # noqa: E402
from tvm import relax  # noqa: E402

from rwdeploy.runtime.tvm_conv_kernels import (  # noqa: E402
    ConvGeometry, ConvSpec, can_fuse_pointwise, conv_geometry, conv_kernel, describe, fused_name,
    fused_pointwise_depthwise_kernel, fused_scratch_shapes, indptr_size, kblock_span, OFFSET_LAYOUTS,
    offsets_func, offsets_geometry, split_indptr_func, split_indptr_name, split_indptr_numpy,
    offsets_name, fused_input_geometry, fused_input_transform, fused_pointwise_geometry, fused_transform_name,
    residual_shape, scale_shape, scratch_shape, slot_offsets_numpy, slot_origins, transform_for)
from rwdeploy.runtime.tvm_fold import constant_value, evaluate, rewrite_functions  # noqa: E402
from rwdeploy.runtime.tvm_kernels import LinearSpec, kernel_for, linear_scale_shape, scratch_shapes  # noqa: E402
from rwdeploy.sparse import ops as _ops  # noqa: E402,F401  (registers the custom ops)

OPAQUE = 8  # relax op pattern kOpaque: never fuse our hand-scheduled kernels with neighbours


def host_target() -> tvm.target.Target:
    """The host's LLVM target with its real CPU name ("native" silently means generic code)."""
    return tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})


def threads() -> int:
    return int(os.environ["TVM_NUM_THREADS"])


def _shape(expr: relax.Expr) -> list[int]:
    return [int(v) for v in expr.ty.shape]


def _dtype(expr: relax.Expr) -> str:
    return str(expr.ty.dtype)


def _scheduled(func: tvm.tirx.PrimFunc, layer: str) -> tvm.tirx.PrimFunc:
    # hand-scheduled: Relax must not fuse it, schedulers (dlight, MetaSchedule, tvm_schedule) skip it;
    # "rwdeploy.layer" says what it computes (reports, profiles)
    return func.with_attr("op_pattern", OPAQUE).with_attr("tirx.is_scheduled", True) \
        .with_attr("rwdeploy.layer", layer)


def _describe_linear(s: LinearSpec) -> str:
    fmt = "dense" if s.fmt == "dense" else ("csr" if s.block == (1, 1) else f"bsr{s.block[0]}x{s.block[1]}")
    return (f"linear {s.in_features}->{s.out_features} batch {s.batch} {fmt}"
            f"{' int8' if s.values == 'int8' else ''} nnz={s.nnz_blocks}")


def _prim(bb: relax.BlockBuilder, spec: LinearSpec) -> relax.GlobalVar:
    return bb.add_func(_scheduled(kernel_for(spec), _describe_linear(spec)), spec.name())


def _call(bb: relax.BlockBuilder, spec: LinearSpec, args: list[relax.Expr],
          out_shape: tuple[int, ...]) -> relax.Var:
    """call_tir of a linear kernel; its scratch outputs are allocated by Relax and dropped."""
    outs = [relax.TensorType(sh, "float32") for sh in scratch_shapes(spec)]
    outs.append(relax.TensorType(out_shape, "float32"))
    res = bb.emit(relax.call_tir(_prim(bb, spec), args, outs))
    return bb.emit(relax.TupleGetItem(res, len(outs) - 1))


def _bias(bias: relax.Expr | None, n: int) -> relax.Expr:
    return relax.const(np.zeros(n, np.float32)) if bias is None else bias


# ----------------------------------------------------------------------------- conv emission

@dataclass(frozen=True)
class ConvCall:
    """Everything one conv kernel call needs; `spec` carries the fused epilogue."""

    spec: ConvSpec
    x: relax.Expr
    values: relax.Expr
    offsets: relax.Expr
    indptr: relax.Expr
    bias: relax.Expr
    scale: relax.Expr | None = None      # per-row float32 scales of int8 values
    residual: relax.Expr | None = None
    columns: relax.Expr | np.ndarray | None = None   # the CSR column indices (offsets are derived)
    producer: "ConvCall | None" = None   # a 1x1 conv computed inside this (depthwise) kernel


def _offsets(bb: relax.BlockBuilder, g: ConvGeometry, columns: relax.Expr | np.ndarray) -> relax.Expr:
    """Each stored weight's input offset: numpy for known columns, else one call of
    `offsets_func` that the build folds into a constant (FoldConstant: the columns are
    weights, constants once bound)."""
    if isinstance(columns, np.ndarray):
        return relax.const(slot_offsets_numpy(g, columns, np))
    dtype = _dtype(columns)
    gv = bb.add_func(offsets_func(dtype), offsets_name(dtype))
    return bb.emit(relax.call_tir(gv, [columns, relax.const(offsets_geometry(g, np))],
                                  relax.TensorType(_shape(columns), "int32")))


def _split_indptr(bb: relax.BlockBuilder, g: ConvGeometry, columns: relax.Expr | np.ndarray,
                  indptr: relax.Expr) -> relax.Expr:
    """A k-blocked conv's row pointers (`split_indptr_numpy`): numpy for known weights, else a
    call of `split_indptr_func` that `fold_weight_arithmetic` evaluates once they are constants."""
    cols = columns if isinstance(columns, np.ndarray) else constant_value(columns)
    ptr = constant_value(indptr)
    if cols is not None and ptr is not None:
        return relax.const(split_indptr_numpy(cols, ptr, g.kblocks, kblock_span(g), np))
    nb, kb = _shape(indptr)[0] - 1, g.kblocks
    dtype = "int32" if isinstance(columns, np.ndarray) else _dtype(columns)
    if isinstance(columns, np.ndarray):
        columns = relax.const(columns.astype(np.int32))
    gv = bb.add_func(split_indptr_func(nb, kb, dtype), split_indptr_name(nb, kb, dtype))
    geo = relax.const(np.array([kb, kblock_span(g)], np.int32))
    return bb.emit(relax.call_tir(gv, [columns, indptr, geo], relax.TensorType((nb * kb + 1,), "int32")))


def _numpy_split_indptr(columns: np.ndarray, indptr: np.ndarray, geometry: np.ndarray) -> np.ndarray:
    """`split_indptr_func` evaluated in numpy (from its [KB, span] array)."""
    kblocks, span = (int(v) for v in geometry)
    return split_indptr_numpy(columns, indptr, kblocks, span, np)


# folded batch-norm scales / biases and reshaped weights (the rest is `tvm_fold`'s, later)
_FOLDABLE = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.sqrt", "relax.reshape"}


def _numpy_offsets(columns: np.ndarray, geometry: np.ndarray) -> np.ndarray:
    """`offsets_func` evaluated in numpy (from its geometry array)."""
    layout, kk, kw, dh, dw, sh, sw, row, plane = (int(v) for v in geometry)
    c = columns.astype(np.int64)
    ci, tap = c // kk, c % kk
    dy, dx = tap // kw * dh, tap % kw * dw
    if layout == OFFSET_LAYOUTS["shift"]:
        off = (ci * sh * sw + dy % sh * sw + dx % sw) * plane + dy // sh * row + dx // sw
    else:
        off = (c if layout == OFFSET_LAYOUTS["im2col"] else ci) * plane
    return off.astype(np.int32)


def fold_weight_arithmetic(mod: tvm.IRModule) -> tvm.IRModule:
    """Evaluate in numpy what the converters derived from weights, once they are constants:
    each conv's input offsets (`offsets_func` calls) and k-block row pointers
    (`split_indptr_func` calls), folded batch-norm scales / biases
    (elementwise add, subtract, multiply, divide, sqrt of constants) and reshaped weights.

    TVM's FoldConstant does the same by building and running every call (~2 s each, a
    minute and more for a MobileNet); this takes milliseconds. Run it right after import.
    """
    @relax.expr_functor.mutator
    class Fold(relax.PyExprMutator):
        def _value(self, arg: relax.Expr) -> np.ndarray | None:
            if isinstance(arg, relax.Var):
                arg = self.lookup_binding(arg)
            return constant_value(arg)

        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op):
                return call
            if call.op.name == "relax.call_tir" and call.args[0].name_hint.startswith("rw_conv2d_offsets_"):
                columns, geometry = (self._value(a) for a in call.args[1].fields)
                return call if columns is None or geometry is None else relax.const(_numpy_offsets(columns, geometry))
            if call.op.name == "relax.call_tir" and call.args[0].name_hint.startswith("rw_conv2d_kptr_"):
                arrays = [self._value(a) for a in call.args[1].fields]
                return call if any(a is None for a in arrays) else relax.const(_numpy_split_indptr(*arrays))
            if call.op.name not in _FOLDABLE:
                return call
            values = [self._value(a) for a in call.args if not isinstance(a, relax.ShapeExpr)]
            out = None if any(v is None for v in values) else evaluate(call.op.name, call, values)
            return call if out is None else relax.const(out)

    out = rewrite_functions(Fold(mod), mod)
    # an offsets / k-pointer kernel whose every call was folded is dead; its global symbol keeps DCE from seeing it
    called = {gv.name_hint for f in out.functions.values() if isinstance(f, relax.Function)
              for gv in relax.analysis.all_global_vars(f)}
    for gvar in list(out.get_global_vars()):
        if gvar.name_hint.startswith(("rw_conv2d_offsets_", "rw_conv2d_kptr_")) and gvar.name_hint not in called:
            del out[gvar]
    return out


def _scale(call: ConvCall) -> relax.Expr:
    return call.scale if call.scale is not None else relax.const(np.ones(scale_shape(call.spec), np.float32))


def _describe_transform(g: ConvGeometry, C: int, H: int, W: int) -> str:
    return (f"{g.layout} input {C}x{H}x{W} -> {g.slots} slots of {g.plane} "
            f"(k{g.kernel[0]}x{g.kernel[1]} s{g.step[0]} p{g.padding[0]})")


def _emit_fused(bb: relax.BlockBuilder, call: ConvCall) -> relax.Var:
    """A 1x1 conv and the depthwise conv it feeds, in one kernel (see tvm_conv_kernels), after
    the 1x1 conv's input is rearranged in the depthwise conv's layout."""
    pw, s = call.producer, call.spec
    residual = call.residual if call.residual is not None else relax.const(np.zeros(residual_shape(s), np.float32))
    poff = _offsets(bb, fused_pointwise_geometry(pw.spec, s), pw.columns) if pw.spec.nnz_blocks else pw.offsets
    gi = fused_input_geometry(pw.spec, s)
    p = pw.spec
    layer = _describe_transform(gi, p.in_channels, p.height, p.width)
    transform = bb.add_func(_scheduled(fused_input_transform(p, s), layer), fused_transform_name(p, s))
    xt = bb.emit(relax.call_tir(transform, [pw.x, relax.const(slot_origins(gi, np))],
                                relax.TensorType((p.batch, gi.slots, gi.plane), "float32")))
    args = [xt, pw.values, poff, pw.indptr, _scale(pw), pw.bias,
            call.values, call.offsets, call.indptr, _scale(call), call.bias, residual]
    kernel = bb.add_func(_scheduled(fused_pointwise_depthwise_kernel(p, s),
                                    f"{describe(p)}, into {describe(s)}"), fused_name(p, s))
    outs = [relax.TensorType(sh, "float32") for sh in fused_scratch_shapes(p, s)]
    outs.append(relax.TensorType((s.batch, s.out_channels, *s.out_hw), "float32"))
    res = bb.emit(relax.call_tir(kernel, args, outs))
    return bb.emit(relax.TupleGetItem(res, len(outs) - 1))


def emit_conv(bb: relax.BlockBuilder, call: ConvCall) -> relax.Var:
    """Emit the layout transform (if any) and the conv kernel; returns y (B, O, OH, OW)."""
    if call.producer is not None:
        return _emit_fused(bb, call)
    s = call.spec
    g = conv_geometry(s)
    B, C, H, W = s.batch, s.in_channels, s.height, s.width
    out = relax.TensorType((B, s.out_channels, *s.out_hw), "float32")
    residual = call.residual if call.residual is not None else relax.const(np.zeros(residual_shape(s), np.float32))
    indptr = call.indptr
    if g.kblock:   # here, not in conv_call: a 1x1 conv fused into a depthwise kernel is not blocked
        indptr = (_split_indptr(bb, g, call.columns, indptr) if s.nnz_blocks
                  else relax.const(np.zeros(indptr_size(s), np.int32)))
    weights = [call.values, call.offsets, indptr, _scale(call), call.bias, residual]
    kernel = bb.add_func(_scheduled(conv_kernel(s), describe(s)), s.name())
    origins = relax.const(slot_origins(g, np))
    if s.groups > 1:
        outs = [relax.TensorType(scratch_shape(s), "float32"), out]
        res = bb.emit(relax.call_tir(kernel, [call.x, *weights, origins], outs))
        return bb.emit(relax.TupleGetItem(res, 1))
    if g.layout == "direct":
        xt = bb.emit(relax.op.reshape(call.x, (B, C, H * W)))
    else:
        # named (and described) by its geometry: convs with the same input layout share it
        layer = _describe_transform(g, C, H, W)
        transform = bb.add_func(_scheduled(transform_for(s), layer), s.transform_name())
        xt = bb.emit(relax.call_tir(transform, [call.x, origins], relax.TensorType((B, g.slots, g.plane), "float32")))
    return bb.emit(relax.call_tir(kernel, [xt, *weights], out))


def conv_call(bb: relax.BlockBuilder, x: relax.Expr, weight_shape: tuple[int, ...], values: relax.Expr,
              columns: relax.Expr | np.ndarray, indptr: relax.Expr, bias: relax.Expr | None,
              stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int], groups: int,
              block: tuple[int, int], fmt: str, scale: relax.Expr | None = None,
              in_shape: tuple[int, ...] | None = None) -> ConvCall:
    """The ConvCall of a conv whose weight is the CSR/BSR (values, columns, indptr)."""
    b, c, h, w = in_shape or _shape(x)
    o, _, kh, kw = weight_shape
    nnzb = _shape(values)[0]
    vdtype = _dtype(values)
    spec = ConvSpec(b, c, h, w, o, (kh, kw), tuple(stride), tuple(padding), tuple(dilation), int(groups),
                    fmt, nnzb, tuple(block), "int32", values="int8" if vdtype == "int8" else "float32")
    g = conv_geometry(spec)
    if nnzb == 0:   # an all-zero weight: one explicit zero, every row empty
        values = relax.const(np.zeros((1, block[0], 1), vdtype))
        offsets = relax.const(np.zeros(1, np.int32))
        indptr = relax.const(np.zeros(o // block[0] + 1, np.int32))
    else:
        offsets = _offsets(bb, g, columns)
    return ConvCall(spec, x, values, offsets, indptr, _bias(bias, o), scale, columns=columns)


# ----------------------------------------------------------------------------- fusion

# activations a packed build keeps undecomposed (`tvm_build.import_relax`), so that the conv
# kernel before them takes them whole as its epilogue; decomposed, each became a separate
# elementwise pass over the conv's output (MobileNetV3-Large at 90 %: 7.7 ms of such passes
# in an 11 ms inference)
KEPT_ACTIVATIONS = ("hardswish.default", "hardswish_.default", "silu.default", "silu_.default")
_ACTIVATIONS = ("relu.default", "relu_.default", "relu6.default", "relu6_.default", "hardtanh.default",
                "hardtanh_.default", "clamp.default", *KEPT_ACTIVATIONS)
_BATCH_NORMS = ("batch_norm.default", "_native_batch_norm_legit_no_training.default")


def _fusing(converter: Callable) -> Callable:
    """Mark a converter that takes a pending conv input (fuses it, or emits it first)."""
    converter._rwdeploy_fuses = True
    return converter


def _user_fuses(importer: Any, user: fx.Node) -> bool:
    if user.op != "call_function":
        return False
    converter = importer.convert_map.get(user.target.__name__)
    return bool(getattr(converter, "_rwdeploy_fuses", False))


def _pending(importer: Any) -> dict[fx.Node, ConvCall]:
    """Conv calls not emitted yet, waiting for their only user to fuse into them."""
    return importer.__dict__.setdefault("_rwdeploy_pending_convs", {})


def _defaults(importer: Any) -> dict[str, Callable]:
    """TVM's own converters, for whatever is not fused."""
    if "_rwdeploy_default_converters" not in importer.__dict__:
        importer.__dict__["_rwdeploy_default_converters"] = importer.create_convert_map()
    return importer.__dict__["_rwdeploy_default_converters"]


def _finish_conv(node: fx.Node, importer: Any, call: ConvCall) -> relax.Expr:
    """Emit the conv now, or keep it pending when its only user may fuse into it."""
    users = list(node.users)
    if len(users) == 1 and _user_fuses(importer, users[0]):
        _pending(importer)[node] = call
        return relax.op.null_value()   # read by nobody: the user's converter takes the pending call
    return emit_conv(importer.block_builder, call)


def _materialize(importer: Any, arg: Any) -> None:
    """Emit a pending conv that is about to be read as an ordinary value."""
    if isinstance(arg, fx.Node) and arg in _pending(importer):
        importer.env[arg] = emit_conv(importer.block_builder, _pending(importer).pop(arg))


def _fallback(node: fx.Node, importer: Any) -> relax.Expr:
    for arg in node.args:
        _materialize(importer, arg)
    return _defaults(importer)[node.target.__name__](node)


@_fusing
def _convert_activation(node: fx.Node, importer: Any) -> relax.Expr:
    src = node.args[0]
    call = _pending(importer).get(src) if isinstance(src, fx.Node) else None
    name = node.target.__name__
    if call is None or call.spec.act != "none":
        return _fallback(node, importer)
    if name.startswith(("hardswish", "silu")):
        spec = replace(call.spec, act=name.split(".")[0].rstrip("_"))
    elif name.startswith("relu6"):
        spec = replace(call.spec, act="clip", clip=(0.0, 6.0))
    elif name.startswith("relu"):
        spec = replace(call.spec, act="relu")
    else:
        args = list(node.args[1:]) + [None] * 2
        lo = node.kwargs.get("min_val" if name.startswith("hardtanh") else "min", args[0])
        hi = node.kwargs.get("max_val" if name.startswith("hardtanh") else "max", args[1])
        if name.startswith("hardtanh"):
            lo = -1.0 if lo is None else lo
            hi = 1.0 if hi is None else hi
        if not all(v is None or isinstance(v, (int, float)) for v in (lo, hi)):
            return _fallback(node, importer)
        lo = -math.inf if lo is None else float(lo)
        hi = math.inf if hi is None else float(hi)
        spec = replace(call.spec, act="relu") if (lo, hi) == (0.0, math.inf) else \
            replace(call.spec, act="clip", clip=(lo, hi))
    del _pending(importer)[src]
    return _finish_conv(node, importer, replace(call, spec=spec))


def _bn_eps(node: fx.Node) -> float | None:
    """eps of an inference batch norm node, None when it may be training."""
    name, args = node.target.__name__, list(node.args)
    if name.startswith("_native_batch_norm_legit_no_training"):
        return float(args[6] if len(args) > 6 else node.kwargs.get("eps", 1e-5))
    training = args[5] if len(args) > 5 else node.kwargs.get("training", False)
    return None if training else float(args[7] if len(args) > 7 else node.kwargs.get("eps", 1e-5))


def _bn_params(node: fx.Node, importer: Any, channels: int) -> list[relax.Expr]:
    """gamma, beta, running mean, running var of a batch norm node (defaults where None)."""
    return [importer.env[node.args[i]] if node.args[i] is not None
            else relax.const(np.full(channels, default, np.float32))
            for i, default in ((1, 1.0), (2, 0.0), (3, 0.0), (4, 1.0))]


def _inference_batch_norm(node: fx.Node, importer: Any, eps: float) -> relax.Expr:
    """An undecomposed inference aten.batch_norm that fuses into no conv, as per-channel
    arithmetic. TVM 0.27's own converter reads that op with the argument positions of
    `_native_batch_norm_legit` (its `training` flag as momentum, its momentum as eps) and
    builds a training-mode batch norm: a slim ResNet-20 through `import_exported_program`
    was 16 % off wherever a border map sat between a conv and its batch norm."""
    for arg in node.args:
        _materialize(importer, arg)
    x = importer.env[node.args[0]]
    shape = _shape(x)
    op, bb = relax.op, importer.block_builder
    gamma, beta, mean, var = _bn_params(node, importer, shape[1])
    k = bb.emit(op.divide(gamma, op.sqrt(op.add(var, relax.const(eps, "float32")))))
    shift = bb.emit(op.subtract(beta, op.multiply(mean, k)))
    per_channel = (1, shape[1]) + (1,) * (len(shape) - 2)
    return bb.emit(op.add(op.multiply(x, op.reshape(k, per_channel)), op.reshape(shift, per_channel)))


@_fusing
def _convert_batch_norm(node: fx.Node, importer: Any) -> relax.Expr:
    """An inference batch norm after a pending conv becomes its row scale and bias:
    (conv * s + b - mean) * k + beta with k = gamma / sqrt(var + eps)."""
    src = node.args[0]
    call = _pending(importer).get(src) if isinstance(src, fx.Node) else None
    eps = _bn_eps(node)
    if call is None or eps is None or call.spec.act != "none" or call.spec.residual:
        if eps is not None and node.target.__name__ == "batch_norm.default":
            return _inference_batch_norm(node, importer, eps)
        return _fallback(node, importer)
    op, o = relax.op, call.spec.out_channels
    gamma, beta, mean, var = _bn_params(node, importer, o)
    bb = importer.block_builder
    k = bb.emit(op.divide(gamma, op.sqrt(op.add(var, relax.const(eps, "float32")))))
    scale = k if call.scale is None else bb.emit(op.multiply(call.scale, k))
    bias = bb.emit(op.add(op.multiply(op.subtract(call.bias, mean), k), beta))
    del _pending(importer)[src]
    fused = replace(call, spec=replace(call.spec, row_scale=True), scale=scale, bias=bias)
    return _finish_conv(node, importer, fused)


@_fusing
def _convert_getitem(node: fx.Node, importer: Any) -> relax.Expr:
    """getitem(batch_norm, 0) of a decomposed export: a pending conv passes through."""
    src = node.args[0]
    if isinstance(src, fx.Node) and src in _pending(importer) and node.args[1] == 0:
        return _finish_conv(node, importer, _pending(importer).pop(src))
    return _fallback(node, importer)


@_fusing
def _convert_add(node: fx.Node, importer: Any) -> relax.Expr:
    a, b = node.args[:2]
    if node.kwargs.get("alpha", 1) == 1 and a is not b:
        for src, other in ((a, b), (b, a)):
            call = _pending(importer).get(src) if isinstance(src, fx.Node) else None
            if call is None or call.spec.act != "none" or call.spec.residual or not isinstance(other, fx.Node):
                continue
            _materialize(importer, other)
            residual = importer.env[other]
            out_shape = [call.spec.batch, call.spec.out_channels, *call.spec.out_hw]
            ty = getattr(residual, "ty", None)
            if not isinstance(ty, relax.TensorType) or str(ty.dtype) != "float32" or \
                    [int(v) for v in ty.shape] != out_shape:
                continue
            del _pending(importer)[src]
            fused = replace(call, spec=replace(call.spec, residual=True), residual=residual)
            return _finish_conv(node, importer, fused)
    return _fallback(node, importer)


# ----------------------------------------------------------------------------- converters

def sparse_linear_call(bb: relax.BlockBuilder, x2: relax.Expr, n_out: int, values: relax.Expr,
                       indices: relax.Expr, indptr: relax.Expr, bias: relax.Expr | None,
                       block: tuple[int, int], scale: relax.Expr | None = None) -> relax.Var:
    """y (batch, n_out) = x2 @ W.T + bias for W in CSR/BSR (int8 values with `scale`)."""
    batch, n_in = _shape(x2)
    nnzb = _shape(values)[0]
    if nnzb == 0:   # an all-zero weight: y = bias
        return bb.emit(relax.op.broadcast_to(_bias(bias, n_out), (batch, n_out)))
    spec = LinearSpec(batch, n_out, n_in, "sparse", nnzb, tuple(block), _dtype(indices),
                      values="int8" if _dtype(values) == "int8" else "float32")
    scale = scale if scale is not None else relax.const(np.ones(linear_scale_shape(spec), np.float32))
    return _call(bb, spec, [x2, values, indices, indptr, _bias(bias, n_out), scale], (batch, n_out))


def _convert_sparse_linear(node, importer) -> relax.Var:
    args = list(importer.retrieve_args(node)) + [None]
    x, vals, idx, ptr, bias, n_out, n_in, block, scale = args[:9]
    bb: relax.BlockBuilder = importer.block_builder
    lead = _shape(x)[:-1]
    batch = int(np.prod(lead)) if lead else 1
    x2 = x if len(lead) == 1 else bb.emit(relax.op.reshape(x, (batch, n_in)))
    y = sparse_linear_call(bb, x2, n_out, vals, idx, ptr, bias, tuple(block), scale)
    return y if len(lead) == 1 else bb.emit(relax.op.reshape(y, (*lead, n_out)))


def _with_input(node: fx.Node, importer: Any, make: Callable[[relax.Expr | None, tuple[int, ...] | None], ConvCall]) -> relax.Expr:
    """Finish a conv whose input may be a pending conv: a 1x1 conv feeding a depthwise conv is
    computed inside the depthwise kernel; any other pending input is emitted first."""
    src = node.args[0]
    producer = _pending(importer).get(src) if isinstance(src, fx.Node) else None
    if producer is not None:
        ps = producer.spec
        call = make(None, (ps.batch, ps.out_channels, *ps.out_hw))
        if can_fuse_pointwise(ps, call.spec):
            del _pending(importer)[src]
            return _finish_conv(node, importer, replace(call, x=producer.x, producer=producer))
        _materialize(importer, src)
    return _finish_conv(node, importer, make(importer.env[src], None))


@_fusing
def _convert_sparse_conv2d(node, importer) -> relax.Expr:
    args = list(importer.retrieve_args(node)) + [None]
    _, vals, idx, ptr, bias, wshape, block, stride, padding, dilation, groups, scale = args[:12]
    return _with_input(node, importer, lambda x, in_shape: conv_call(
        importer.block_builder, x, tuple(wshape), vals, idx, ptr, bias, stride, padding, dilation, groups,
        tuple(block), "sparse", scale, in_shape))


def _convert_dense_linear(node, importer) -> relax.Var:
    args = importer.retrieve_args(node)
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    bb: relax.BlockBuilder = importer.block_builder
    n_out, n_in = _shape(w)
    lead = _shape(x)[:-1]
    batch = int(np.prod(lead)) if lead else 1
    x2 = x if len(lead) == 1 else bb.emit(relax.op.reshape(x, (batch, n_in)))
    spec = LinearSpec(batch, n_out, n_in, "dense")
    y = _call(bb, spec, [x2, w, _bias(bias, n_out)], (batch, n_out))
    return y if len(lead) == 1 else bb.emit(relax.op.reshape(y, (*lead, n_out)))


def _pair(v: Any, default: int) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return tuple(v) * (2 // len(v))
    return (v or default,) * 2


def dense_in_packed_layout(weight_shape: tuple[int, ...], groups: int) -> bool:
    """Whether a dense conv beside packed layers runs rwdeploy's conv kernel, in the packed
    layers' NCHW, instead of TVM's NHWC conv: depthwise convs (one input channel per group).

    TVM's CPU pipeline computes dense convs in NHWC (`tvm_schedule.prepare_passes`), so one
    between NCHW kernels costs a transpose before and after it, which took more than the conv
    itself in MobileNetV2 (nine multiply-adds per output: a depthwise conv is memory-bound). A dense
    depthwise conv in rwdeploy's kernel also fuses the 1x1 conv feeding it (`_emit_fused`).
    """
    return groups > 1 and weight_shape[1] == 1


def dense_conv_call(bb: relax.BlockBuilder, x: relax.Expr | None, w: relax.Expr | np.ndarray,
                    bias: relax.Expr | None, stride: tuple[int, int], padding: tuple[int, int],
                    dilation: tuple[int, int], groups: int, in_shape: tuple[int, ...] | None = None) -> ConvCall:
    """The ConvCall of a dense conv: the sparse kernel walking a CSR that holds every weight
    (`w` (O, C/groups, KH, KW): a numpy array, or a Relax weight)."""
    value = w if isinstance(w, np.ndarray) else constant_value(w)
    o, cg, kh, kw = value.shape if value is not None else _shape(w)
    kcol = cg * kh * kw
    if value is not None:   # a constant: reshaped here, nothing for the build to fold
        vals = relax.const(np.ascontiguousarray(value.reshape(o * kcol, 1, 1), dtype=np.float32))
    else:
        vals = bb.emit(relax.op.reshape(w, (o * kcol, 1, 1)))
    columns = np.tile(np.arange(kcol), o)
    ptr = relax.const((np.arange(o + 1) * kcol).astype(np.int32))
    return conv_call(bb, x, (o, cg, kh, kw), vals, columns, ptr, bias, stride, padding, dilation, groups,
                     (1, 1), "dense", None, in_shape)


def _conv_args(node: fx.Node, importer: Any) -> tuple[Any, ...]:
    """(weight, bias, stride, padding, dilation, groups, transposed) of aten.conv2d /
    aten.convolution (whose groups come after transposed and output_padding)."""
    args = list(importer.retrieve_args(node)) + [None] * 9
    if node.target.__name__.startswith("convolution"):
        _, w, bias, stride, padding, dilation, transposed, _, groups = args[:9]
    else:
        (_, w, bias, stride, padding, dilation, groups), transposed = args[:7], False
    return (w, bias, _pair(stride, 1), _pair(padding, 0), _pair(dilation, 1), int(groups or 1),
            bool(transposed))


@_fusing
def _convert_dense_conv2d(node, importer) -> relax.Expr:
    w, bias, stride, padding, dilation, groups, _ = _conv_args(node, importer)
    return _with_input(node, importer, lambda x, in_shape: dense_conv_call(
        importer.block_builder, x, w, bias, stride, padding, dilation, groups, in_shape))


_PASS_THROUGH = (*_ACTIVATIONS, *_BATCH_NORMS, "getitem")


def _is_packed(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and "rwdeploy" in str(node.target)


def _through(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and \
        getattr(node.target, "__name__", "") in _PASS_THROUGH


def beside_packed(node: fx.Node) -> bool:
    """A packed layer computes the node's input or reads its output, through batch norms,
    activations and getitem (which the packed kernels fuse)."""
    src = node.args[0]
    while _through(src):
        src = src.args[0]
    if _is_packed(src):
        return True
    users = list(node.users)
    while users:
        user = users.pop()
        if _is_packed(user):
            return True
        if _through(user):
            users.extend(user.users)
    return False


@_fusing
def _convert_conv_beside_packed(node, importer) -> relax.Expr:
    """A dense conv of a packed model: a depthwise one beside packed layers runs rwdeploy's
    kernel in their layout (`dense_in_packed_layout`); any other converts as TVM does."""
    w, bias, stride, padding, dilation, groups, transposed = _conv_args(node, importer)
    if transposed or len(_shape(w)) != 4 or not dense_in_packed_layout(tuple(_shape(w)), groups) \
            or not beside_packed(node):
        return _fallback(node, importer)
    return _with_input(node, importer, lambda x, in_shape: dense_conv_call(
        importer.block_builder, x, w, bias, stride, padding, dilation, groups, in_shape))


def convert_map(dense_kernels: bool = True) -> dict[str, Callable]:
    """`custom_convert_map` entries for from_exported_program (keys are fx target names).

    With `dense_kernels`, dense conv2d / linear also run rwdeploy's scheduled TIR kernels
    instead of the default Relax lowering, which leaves them unscheduled on CPU (~100x
    slower); the program must then be imported without decomposition, so that conv2d and
    linear reach the converter as themselves. Without it (the artifact's build of a packed
    model), a dense depthwise conv beside a packed layer still runs rwdeploy's kernel, in the
    packed layers' layout (`dense_in_packed_layout`), and every other dense conv / linear is
    TVM's. The activation / add entries fuse into a preceding conv kernel where they can and
    otherwise convert as TVM does.
    """
    cmap: dict[str, Callable] = {"sparse_linear.default": _convert_sparse_linear,
                                 "sparse_conv2d.default": _convert_sparse_conv2d,
                                 "add.Tensor": _convert_add}
    cmap.update({name: _convert_activation for name in _ACTIVATIONS})
    cmap.update({name: _convert_batch_norm for name in _BATCH_NORMS})
    cmap["getitem"] = _convert_getitem
    if dense_kernels:
        cmap.update({"linear.default": _convert_dense_linear, "conv2d.default": _convert_dense_conv2d})
    else:
        cmap.update({"conv2d.default": _convert_conv_beside_packed,
                     "convolution.default": _convert_conv_beside_packed})
    return cmap


def import_exported_program(ep: torch.export.ExportedProgram, *, dense_kernels: bool = True,
                            **kw: Any) -> tvm.IRModule:
    """from_exported_program with rwdeploy's sparse ops (and, by default, dense conv2d/linear)
    converted to rwdeploy's TIR kernels."""
    from tvm.relax.frontend.torch import from_exported_program

    cmap = {**convert_map(dense_kernels), **kw.pop("custom_convert_map", {})}
    kw.setdefault("unwrap_unit_return_tuple", True)
    if dense_kernels:
        kw.setdefault("run_ep_decomposition", False)
    # the weights are constants now: fold what the converters derived from them
    return fold_weight_arithmetic(from_exported_program(ep, custom_convert_map=cmap, **kw))
