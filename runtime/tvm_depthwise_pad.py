"""Depthwise convolutions with an odd channel count run on the padded tensor their input was
sliced from: `widen_depthwise_pass(lanes)`.

A slim MobileNet's depthwise layers keep e.g. 29 or 58 channels. The depthwise schedule
vectorises along channels, and an odd count becomes one odd-width vector that LLVM legalises
element by element: slim MobileNetV2 70 %'s 29-channel depthwise at 56x56 took 0.24 ms, its
96-channel original 0.17 ms. Its input is almost always the output of a 1x1 conv that
`pad_channels_pass` already computes on 32 channels and slices back to 29, followed by the
bias and ReLU6. A depthwise output channel reads only its own input channel, so the depthwise
can run on the first 32 channels of the padded tensor (weights padded with zero filters, the
channel-local chain in between applied to all 32) and its output be sliced back to 29: the
same function, with whole vectors, and the slice moved from the expand conv's write-back to
the depthwise's. Whatever the padded channels hold never reaches a kept output.
"""
from __future__ import annotations

from typing import Any

import numpy as np

# Elementwise ops whose other operand, a constant along the channel axis, keeps them channel-local
CHANNEL_LOCAL_OPS = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide",
                     "relax.maximum", "relax.minimum")


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


def widen_depthwise_pass(lanes: int) -> Any:
    """The Relax module pass (after `pad_channels_pass`, on NHWC / HWIO convolutions)."""
    import tvm
    from tvm import relax

    from rwdeploy.runtime.tvm_fold import rewrite_functions
    from rwdeploy.runtime.tvm_schedule import padded_width

    def is_op(expr: Any, *names: str) -> bool:
        return isinstance(expr, tvm.ir.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in names

    def constant(expr: Any) -> np.ndarray | None:
        value = getattr(expr, "value", None) if isinstance(expr, tvm.ir.expr.GenericConst) else None
        return value.numpy() if hasattr(value, "numpy") else None

    def shape(expr: Any) -> list[int] | None:
        try:
            return [int(d) for d in expr.ty.shape]
        except (TypeError, ValueError, AttributeError):
            return None

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

        def _source(self, data: Any, channels: int) -> tuple[Any, list[tuple[Any, int, np.ndarray]]] | None:
            """(the wider tensor `data` was sliced from, the channel-local ops between them as
            (call, position of the chain operand, other operand)), each value read once."""
            chain, cur, rank = [], data, 4
            while True:
                if self.uses.get(cur, 0) != 1:
                    return None
                bound = self._binding(cur)
                if leading_channels(bound, rank) == channels:
                    return bound.args[0], chain
                if not is_op(bound, *CHANNEL_LOCAL_OPS):
                    return None
                for pos in (0, 1):
                    other = constant(bound.args[1 - pos])
                    if other is not None and isinstance(bound.args[pos], relax.Var) and \
                            other.ndim <= rank and (other.ndim == 0 or other.shape[-1] in (1, channels)) \
                            and all(d == 1 for d in other.shape[:-1]):
                        chain.append((bound, pos, other))
                        cur = bound.args[pos]
                        break
                else:
                    return None

        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not is_op(call, "relax.nn.conv2d"):
                return call
            attrs, weight, out = call.attrs, constant(call.args[1]), shape(call)
            if (weight is None or out is None or weight.dtype != np.float32 or attrs.data_layout != "NHWC"
                    or attrs.kernel_layout != "HWIO" or attrs.out_layout != "NHWC"):
                return call
            channels = out[-1]
            groups, padded = int(attrs.groups), padded_width(channels, lanes)
            if groups != channels or weight.shape[2] != 1 or padded == channels:
                return call
            found = self._source(call.args[0], channels)
            source_shape = shape(found[0]) if found else None
            if source_shape is None or source_shape[-1] < padded:
                return call
            wide, chain = found
            if source_shape[-1] > padded:
                wide = self.builder_.emit(relax.op.strided_slice(wide, axes=[3], begin=[0], end=[padded]))
            for op_call, pos, other in reversed(chain):
                fill = 1.0 if op_call.op.name == "relax.divide" else 0.0
                args = [None, None]
                args[pos], args[1 - pos] = wide, relax.const(widen(other, channels, padded, fill))
                wide = self.builder_.emit(tvm.ir.Call(op_call.op, args, op_call.attrs, op_call.ty_args))
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
