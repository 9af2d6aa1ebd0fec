"""Reshapes moved below the elementwise ops that read them, so that those ops fuse into the
kernel that produced the tensor.

`torch.export` writes a Linear on a (batch, tokens, features) tensor as a 2-D matmul between
two reshapes: reshape(x) -> matmul -> add(bias) -> reshape back. The activation, the residual
add and the next reshape follow on the 3-D view. TVM's operator fusion takes elementwise ops
into a matmul's epilogue, but not across a reshape (an injective op): the GELU and the
residual add of every transformer block ran as kernels of their own, each one more pass over
the tensor (ViT-Tiny: GELU 0.24 ms and the residual adds 0.02 ms a block, scratch profile).

An elementwise op commutes with a reshape: op(reshape(y, S)) = reshape(op(y), S), and a
binary op whose other operand has the shape S (or one element) reads it reshaped to y's shape.
Once the reshape is below, reshape(reshape(z, S1), S2) is reshape(z, S2), and a reshape to a
tensor's own shape is that tensor: the MLP's two reshapes around the GELU cancel. The
function is the same; a reshape left over is a view in the Relax VM, not a kernel.
"""
from __future__ import annotations

import math
from typing import Any

# Relax ops computed element by element whose only tensor operand is the first (the rest are
# scalar attributes, e.g. clip's bounds), and binary elementwise ops.
UNARY = frozenset({
    "relax.nn.relu", "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.nn.silu", "relax.sigmoid",
    "relax.tanh", "relax.erf", "relax.exp", "relax.clip", "relax.nn.leakyrelu", "relax.negative",
})
BINARY = frozenset({
    "relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
})


def reshape_sink_pass() -> Any:
    """A Relax module pass: elementwise ops of a reshaped tensor computed before the reshape
    (static shapes only), and reshape chains collapsed."""
    import tvm
    from tvm import relax

    from rwdeploy.runtime.tvm_fold import bound_value, is_op, rewrite_functions, static_shape

    def reshaped(mutator: Any, expr: Any) -> Any | None:
        """y where `expr` is bound to reshape(y, S) with both shapes static, else None."""
        value = bound_value(mutator, expr)
        if is_op(value, "relax.reshape") and static_shape(value.args[0]) is not None \
                and static_shape(value) is not None:
            return value.args[0]
        return None

    @relax.expr_functor.mutator
    class SinkReshapes(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if is_op(call, "relax.reshape"):
                return self._collapse(call)
            if is_op(call, *UNARY):
                source = reshaped(self, call.args[0])
                if source is None:
                    return call
                inner = self.builder_.emit(relax.Call(call.op, [source, *call.args[1:]], call.attrs))
                return relax.op.reshape(inner, static_shape(call))
            if is_op(call, *BINARY) and len(call.args) == 2:
                return self._binary(call)
            return call

        def _collapse(self, call: relax.Call) -> relax.Expr:
            source = reshaped(self, call.args[0])
            source = call.args[0] if source is None else source
            shape = static_shape(call)
            if shape is not None and static_shape(source) == shape:
                return source
            return call if source.same_as(call.args[0]) else relax.op.reshape(source, shape)

        def _binary(self, call: relax.Call) -> relax.Expr:
            out = static_shape(call)
            # only a reshape to the output's shape moves (not a bias reshaped to broadcast)
            sources = [reshaped(self, a) if static_shape(a) == out else None for a in call.args]
            pivot = next((s for s in sources if s is not None), None)
            if out is None or pivot is None:
                return call
            inner_shape = static_shape(pivot)
            args = []
            for arg, source in zip(call.args, sources):
                shape = static_shape(arg)
                if source is not None and static_shape(source) == inner_shape and shape == out:
                    args.append(source)
                elif shape == out:  # the same elements, read in the pivot's shape (a view)
                    args.append(self.builder_.emit(relax.op.reshape(arg, inner_shape)))
                elif shape is not None and math.prod(shape) == 1 and len(shape) <= len(inner_shape):
                    args.append(arg)  # one value broadcast: the same in any shape
                else:
                    return call
            inner = self.builder_.emit(relax.Call(call.op, args, call.attrs))
            return relax.op.reshape(inner, out)

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.SinkReshapes")
    def rewrite(mod: Any, _ctx: Any) -> Any:
        return rewrite_functions(SinkReshapes(mod), mod)

    return rewrite
