"""conv -> add(per-channel constant) -> batch_norm becomes conv -> batch_norm, the constant
taken into the batch norm's mean, so that TVM's FoldBatchnormToConv2D folds it into the conv.

A slim model has that add wherever `remove_zero_channels` folded a removed channel's constant
output into the next layer's bias. FoldBatchnormToConv2D matches conv2d -> batch_norm only, so
those batch norms were decomposed instead (subtract, divide, multiply, add after every conv of
the slim model, fused into its epilogue but computed on every output). BN(y + b) with mean m
is BN(y) with mean m - b: the same function.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def bias_into_batch_norm_pass() -> Any:
    """The Relax module pass (run before FoldBatchnormToConv2D)."""
    import tvm
    from tvm import relax

    from rwdeploy.runtime.tvm_fold import rewrite_functions

    def constant(expr: Any) -> np.ndarray | None:
        value = getattr(expr, "value", None) if isinstance(expr, tvm.ir.expr.GenericConst) else None
        return value.numpy() if hasattr(value, "numpy") else None

    @relax.expr_functor.mutator
    class BiasIntoBatchNorm(relax.PyExprMutator):
        def _binding(self, expr: Any) -> Any:
            if isinstance(expr, relax.Var):
                try:
                    return self.lookup_binding(expr)
                except Exception:  # noqa: BLE001 - a parameter: no binding
                    return None
            return None

        def _per_channel(self, bias: Any, shape: list[int]) -> np.ndarray | None:
            """The (C,) values of a constant broadcast along the channel axis only: a constant
            of `shape` (or its trailing dims), or a reshape of a constant to it."""
            dims = [int(d) for d in getattr(getattr(bias, "ty", None), "shape", None) or []]
            if not dims or dims != shape[len(shape) - len(dims):]:
                return None
            value = constant(bias)
            if value is None:
                binding = self._binding(bias)
                if isinstance(binding, tvm.ir.Call) and isinstance(binding.op, tvm.ir.Op) \
                        and binding.op.name in ("relax.reshape", "relax.expand_dims"):
                    value = constant(binding.args[0])
            return None if value is None or value.size != max(shape) else value.reshape(-1)

        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.batch_norm"):
                return call
            data, gamma, beta, mean, var = call.args[:5]
            add = self._binding(data)
            if not (isinstance(add, tvm.ir.Call) and isinstance(add.op, tvm.ir.Op)
                    and add.op.name == "relax.add"):
                return call
            axis, rank = int(call.attrs.axis), len(data.ty.shape)
            m = constant(mean)
            if m is None:
                return call
            per_channel = [1] * rank
            per_channel[axis] = m.shape[0]
            for conv_out, bias in (add.args, add.args[::-1]):
                conv = self._binding(conv_out)
                b = self._per_channel(bias, per_channel)
                if isinstance(conv, tvm.ir.Call) and isinstance(conv.op, tvm.ir.Op) \
                        and conv.op.name == "relax.nn.conv2d" and b is not None:
                    break
            else:
                return call
            new_mean = relax.const((m - b).astype(m.dtype))
            return tvm.ir.Call(call.op, [conv_out, gamma, beta, new_mean, var, *call.args[5:]],
                               call.attrs, call.ty_args)

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.BiasIntoBatchNorm")
    def rewrite(mod: Any, _ctx: Any) -> Any:
        return rewrite_functions(BiasIntoBatchNorm(mod), mod)

    return rewrite
