"""conv -> add(constant) -> batch_norm becomes conv -> batch_norm (-> add), so that TVM's
FoldBatchnormToConv2D folds the batch norm into the conv.

A slim model has that add wherever `remove_zero_channels` folded a removed channel's constant
output into the next layer: a per-channel bias, or, where the next layer pads its input with
zeros, a (1, C, H, W) map whose border differs from its interior (the conv of a ones map with
the border kernel). FoldBatchnormToConv2D matches conv2d -> batch_norm only, so those batch
norms were decomposed instead (subtract, divide, multiply, add after every conv of the slim
model, computed on every output, and the ReLU after them no longer fused). With scale
k = gamma / sqrt(var + eps), BN(y + b) = BN(y) + k * b: a per-channel b goes into the batch
norm's mean (BN with mean m - b), a map is added after the batch norm as k * b, which the conv
then takes into its epilogue.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def bias_into_batch_norm_pass() -> Any:
    """The Relax module pass (run before FoldBatchnormToConv2D; the added maps must already be
    constants, so FoldConstant runs first)."""
    import tvm
    from tvm import relax

    from rwdeploy.runtime.tvm_fold import constant_value as constant
    from rwdeploy.runtime.tvm_fold import bound_value, is_op, rewrite_functions
    from rwdeploy.runtime.tvm_fold import static_shape as dims

    @relax.expr_functor.mutator
    class BiasIntoBatchNorm(relax.PyExprMutator):
        def _binding(self, expr: Any) -> Any:
            return bound_value(self, expr)

        def _constant(self, expr: Any) -> np.ndarray | None:
            value = constant(expr)
            binding = self._binding(expr)
            if value is None and (is_op(binding, "relax.reshape") or is_op(binding, "relax.expand_dims")):
                value = constant(binding.args[0])
                return None if value is None else value.reshape(dims(expr) or value.shape)
            return value

        def _conv_plus_constant(self, bn: Any) -> tuple[Any, np.ndarray] | None:
            """(the conv's output, the added constant) when `bn`'s input is conv2d + constant of
            the conv's shape (or broadcast to it) with float32 values."""
            add = self._binding(bn.args[0])
            if not is_op(add, "relax.add"):
                return None
            out = dims(bn.args[0])
            for conv_out, other in (add.args, add.args[::-1]):
                b = self._constant(other)
                if is_op(self._binding(conv_out), "relax.nn.conv2d") and b is not None \
                        and b.dtype == np.float32 and dims(conv_out) == out \
                        and np.broadcast_shapes(b.shape, tuple(out)) == tuple(out):
                    return conv_out, b
            return None

        def _per_channel_shape(self, bn: Any) -> list[int]:
            rank, axis = len(dims(bn.args[0])), int(bn.attrs.axis)
            shape = [1] * rank
            shape[axis % rank] = -1
            return shape

        def visit_call_(self, call: relax.Call) -> relax.Expr:
            """Per-channel constant: into the batch norm's mean."""
            call = super().visit_call_(call)
            if not is_op(call, "relax.nn.batch_norm") or dims(call.args[0]) is None:
                return call
            found, mean = self._conv_plus_constant(call), constant(call.args[3])
            if found is None or mean is None:
                return call
            conv_out, b = found
            rank, axis = len(dims(call.args[0])), int(call.attrs.axis) % len(dims(call.args[0]))
            if b.ndim != rank or any(d != 1 for i, d in enumerate(b.shape) if i != axis) \
                    or b.shape[axis] != mean.shape[0]:
                return call   # a map: the getitem below adds it after the batch norm
            new_mean = relax.const((mean - b.reshape(-1)).astype(mean.dtype))
            return tvm.ir.Call(call.op, [conv_out, call.args[1], call.args[2], new_mean, *call.args[4:]],
                               call.attrs, call.ty_args)

        def visit_tuple_getitem_(self, item: relax.TupleGetItem) -> relax.Expr:
            """A map: BN(y + b)[0] = BN(y)[0] + k * b."""
            item = super().visit_tuple_getitem_(item)
            bn = self._binding(item.tuple_value)
            if item.index != 0 or not is_op(bn, "relax.nn.batch_norm") or dims(bn.args[0]) is None:
                return item
            found = self._conv_plus_constant(bn)
            gamma, var = constant(bn.args[1]), constant(bn.args[4])
            if found is None or gamma is None or var is None:
                return item
            conv_out, b = found
            k = (gamma if bn.attrs.scale else np.ones_like(var)) / np.sqrt(var + np.float32(bn.attrs.epsilon))
            scaled = (b * k.astype(np.float32).reshape(self._per_channel_shape(bn))).astype(np.float32)
            folded = self.builder_.emit(tvm.ir.Call(bn.op, [conv_out, *bn.args[1:]], bn.attrs, bn.ty_args))
            normalised = self.builder_.emit(relax.TupleGetItem(folded, 0))
            return relax.op.add(normalised, relax.const(scaled))

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.BiasIntoBatchNorm")
    def rewrite(mod: Any, _ctx: Any) -> Any:
        return rewrite_functions(BiasIntoBatchNorm(mod), mod)

    return rewrite
