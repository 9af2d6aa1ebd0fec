"""Depthwise convolutions with an odd channel count run on the padded tensor their input was
sliced from: `widen_depthwise_pass(padded_width)`.

A slim MobileNet's depthwise layers keep e.g. 29 or 58 channels. The depthwise schedule
vectorises along channels, and an odd count becomes one odd-width vector that LLVM legalises
element by element: slim MobileNetV2 70 %'s 29-channel depthwise at 56x56 took 0.24 ms, its
96-channel original 0.17 ms. Its input is almost always the output of a 1x1 conv that
`pad_channels_pass` already computes on 32 channels and slices back to 29, followed by the
bias and ReLU6. A depthwise output channel reads only its own input channel, so the depthwise
can run on the first 32 channels of the padded tensor (weights padded with zero filters, the
channel-local ops in between, e.g. bias and activation, applied to all 32) and its output be
sliced back to 29: the same function, with whole vectors, and the slice moved from the expand
conv's write-back to the depthwise's. Whatever the padded channels hold never reaches a kept output.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

# Elementwise ops: with constant operands along the channel axis (or scalars) they keep every
# channel apart, so they may run on the padded tensor (activations such as SiLU or Hardswish
# arrive as small graphs of them)
CHANNEL_LOCAL_OPS = frozenset(f"relax.{op}" for op in (
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "power", "negative", "abs",
    "sqrt", "exp", "log", "tanh", "sigmoid", "erf", "clip", "where", "greater", "greater_equal",
    "less", "less_equal", "nn.relu", "nn.silu", "nn.gelu", "nn.gelu_tanh", "nn.leakyrelu"))


def use_counts(func: Any) -> dict[Any, int]:
    """How often each variable of `func` is read (by bindings or as the result)."""
    from tvm import relax

    counts: dict[Any, int] = {}

    def count(expr: Any) -> None:
        for var in relax.analysis.free_vars(expr):
            counts[var] = counts.get(var, 0) + 1

    for block in func.body.blocks:
        for binding in block.bindings:
            count(binding.value)
    count(func.body.body)
    return counts


def widen_depthwise_pass(padded_width: Callable[[int], int]) -> Any:
    """The Relax module pass (after `pad_channels_pass`, on NHWC / HWIO convolutions):
    `padded_width(C)` is the channel count a C-channel depthwise runs on (that of the padded
    convs, `tvm_schedule.padded_width`); a depthwise with C == padded_width(C) is left alone."""
    import tvm
    from tvm import relax

    from rwdeploy.runtime.tvm_fold import constant_value as constant
    from rwdeploy.runtime.tvm_fold import is_op, rewrite_functions
    from rwdeploy.runtime.tvm_fold import static_shape as shape

    def leading_channels(call: Any, rank: int) -> int | None:
        """`end` when `call` is x[..., 0:end] along the last axis of a rank-`rank` tensor."""
        if not is_op(call, "relax.strided_slice") or len(call.args) < 4:
            return None
        axes, begin, end = ([int(v.value) for v in arg.fields] for arg in call.args[1:4])
        if len(call.args) > 4 and call.args[4] is not None and \
                any(int(v.value) != 1 for v in getattr(call.args[4], "fields", [])):
            return None
        return end[0] if axes in ([rank - 1], [-1]) and begin == [0] else None

    def widen(value: np.ndarray, channels: int, padded: int, fill: float) -> np.ndarray:
        """A channel-axis constant (last dim `channels` or 1, or a scalar) for `padded` channels."""
        if value.ndim == 0 or value.shape[-1] == 1:
            return value
        extra = np.full((*value.shape[:-1], padded - channels), fill, value.dtype)
        return np.concatenate([value, extra], -1)

    @relax.expr_functor.mutator
    class WidenDepthwise(relax.PyExprMutator):
        def __init__(self, mod: Any, uses: dict[Any, int]):
            super().__init__(mod)
            self.uses = uses

        def _binding(self, var: Any) -> Any:
            try:
                return self.lookup_binding(var) if isinstance(var, relax.Var) else None
            except Exception:  # noqa: BLE001 - a parameter
                return None

        def _channel_local(self, data: Any, channels: int) -> tuple[dict[Any, Any], Any] | None:
            """The channel-local graph computing `data` from the first `channels` channels of
            one wider tensor: (its bindings by variable, slices included; the wider tensor),
            or None. Every value in it must be read only inside it (`data` only by the conv)."""
            nodes: dict[Any, Any] = {}
            sources: list[Any] = []
            pending = [data]
            while pending:
                var = pending.pop()
                if any(var.same_as(v) for v in nodes):
                    continue
                bound = self._binding(var)
                if leading_channels(bound, 4) == channels:
                    sources.append(bound.args[0])
                elif is_op(bound, *CHANNEL_LOCAL_OPS):
                    for arg in bound.args:
                        if isinstance(arg, relax.Var):
                            pending.append(arg)
                        elif isinstance(arg, tvm.ir.expr.GenericConst):
                            c = constant(arg)
                            if c is None or c.ndim > 4 or (c.ndim and (c.shape[-1] not in (1, channels)
                                                                       or any(d != 1 for d in c.shape[:-1]))):
                                return None
                        elif not isinstance(arg, relax.PrimValue):
                            return None
                else:
                    return None
                nodes[var] = bound
            if not sources or any(not src.same_as(sources[0]) for src in sources):
                return None
            # counted as `use_counts` counts: once per binding that reads the variable
            reads = {var: int(var.same_as(data)) for var in nodes}
            for bound in nodes.values():
                if not is_op(bound, "relax.strided_slice"):
                    for used in relax.analysis.free_vars(bound):
                        for var in reads:
                            reads[var] += int(used.same_as(var))
            if any(self.uses.get(var, 0) != n for var, n in reads.items()):
                return None
            return nodes, sources[0]

        def _rebuild(self, var: Any, nodes: dict[Any, Any], wide: Any, channels: int, padded: int,
                     done: dict[Any, Any]) -> Any:
            """`var` computed on the padded tensor `wide` (its constants widened)."""
            for old, new in done.items():
                if old.same_as(var):
                    return new
            bound = nodes[var]
            if is_op(bound, "relax.strided_slice"):
                done[var] = wide
                return wide
            fill = 1.0 if bound.op.name in ("relax.divide", "relax.log", "relax.sqrt", "relax.power") else 0.0
            args = []
            for arg in bound.args:
                if isinstance(arg, relax.Var):
                    args.append(self._rebuild(arg, nodes, wide, channels, padded, done))
                elif isinstance(arg, tvm.ir.expr.GenericConst):
                    args.append(relax.const(widen(constant(arg), channels, padded, fill)))
                else:
                    args.append(arg)
            done[var] = self.builder_.emit(tvm.ir.Call(bound.op, args, bound.attrs, bound.ty_args))
            return done[var]

        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not is_op(call, "relax.nn.conv2d"):
                return call
            attrs, weight, out = call.attrs, constant(call.args[1]), shape(call)
            if (weight is None or out is None or weight.dtype != np.float32 or attrs.data_layout != "NHWC"
                    or attrs.kernel_layout != "HWIO" or attrs.out_layout != "NHWC"):
                return call
            channels = out[-1]
            groups, padded = int(attrs.groups), padded_width(channels)
            if groups != channels or weight.shape[2] != 1 or padded == channels:
                return call
            found = self._channel_local(call.args[0], channels)
            source_shape = shape(found[1]) if found else None
            if source_shape is None or source_shape[-1] < padded:
                return call
            nodes, wide = found
            if source_shape[-1] > padded:
                wide = self.builder_.emit(relax.op.strided_slice(wide, axes=[3], begin=[0], end=[padded]))
            wide = self._rebuild(call.args[0], nodes, wide, channels, padded, {})
            filters = np.concatenate([weight, np.zeros((*weight.shape[:3], padded - channels), weight.dtype)], -1)
            conv = self.builder_.emit(relax.op.nn.conv2d(
                wide, relax.const(filters), strides=attrs.strides, padding=attrs.padding,
                dilation=attrs.dilation, groups=padded, data_layout="NHWC", kernel_layout="HWIO",
                out_layout="NHWC", out_dtype=attrs.out_dtype or "float32"))
            return relax.op.strided_slice(conv, axes=[3], begin=[0], end=[channels])

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.WidenDepthwise")
    def rewrite(mod: Any, _ctx: Any) -> Any:
        uses: dict[Any, int] = {}
        for _, func in mod.functions_items():
            if isinstance(func, relax.Function) and isinstance(func.body, relax.SeqExpr):
                uses.update(use_counts(func))
        return rewrite_functions(WidenDepthwise(mod, uses), mod)

    return rewrite
