"""Weight arithmetic folded in numpy: `fold_weight_arithmetic_pass()`.

TVM's FoldConstant evaluates every call whose arguments are constants by building it with
LLVM and running it, about 0.1 s a call. For a CPU build that is most of the time: on
VoVNet-19-dw, 13 of 28 s went to folding batch-norm scales into 68 convs and moving 68
weights to HWIO. The same IEEE float32 operations in numpy take milliseconds. This pass
evaluates the calls it knows (elementwise arithmetic, reshape, permute_dims, expand_dims,
squeeze, astype) bottom-up, so chains fold whole; FoldConstant still runs after it for
anything else.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

_ELEMENTWISE: dict[str, Callable[..., np.ndarray]] = {
    "relax.add": np.add, "relax.subtract": np.subtract, "relax.multiply": np.multiply,
    "relax.divide": np.divide, "relax.sqrt": np.sqrt, "relax.negative": np.negative,
}


def constant_value(expr: Any) -> np.ndarray | None:
    """The numpy value of a Relax constant tensor, else None."""
    import tvm

    value = getattr(expr, "value", None) if isinstance(expr, tvm.ir.expr.GenericConst) else None
    return value.numpy() if hasattr(value, "numpy") else None


def static_shape(expr: Any) -> list[int] | None:
    """The shape of a Relax expression's tensor type, or None (no shape, a symbolic dimension)."""
    try:
        return [int(d) for d in expr.ty.shape]
    except (TypeError, ValueError, AttributeError):
        return None


def is_op(expr: Any, *names: str) -> bool:
    """True when `expr` is a call of one of the Relax ops `names` ("relax.add", ...)."""
    import tvm

    return isinstance(expr, tvm.ir.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in names


def bound_value(mutator: Any, expr: Any) -> Any:
    """What the Relax var `expr` is bound to in the function `mutator` (a PyExprMutator) is
    visiting; None for a parameter or anything that is not a var."""
    from tvm import relax

    if isinstance(expr, relax.Var):
        try:
            return mutator.lookup_binding(expr)
        except Exception:  # noqa: BLE001 - a parameter: no binding
            return None
    return None


def rewrite_functions(mutator: Any, mod: Any) -> Any:
    """`mod` with every Relax function visited by `mutator` (a PyExprMutator built on `mod`),
    dead bindings removed."""
    from tvm import relax

    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return relax.transform.DeadCodeElimination()(mutator.builder_.finalize())


def _ints(values: Any) -> list[int]:
    return [int(v) for v in values]


def evaluate(op: str, call: Any, args: list[np.ndarray]) -> np.ndarray | None:
    """`call` (a Relax call of `op` on constant tensors `args`) evaluated in numpy, or None when
    this function does not know the op or its attributes."""
    from tvm import relax

    if op in _ELEMENTWISE:
        if any(a.dtype != np.float32 for a in args):
            return None  # integer division and promotion rules differ; leave them to TVM
        return _ELEMENTWISE[op](*args).astype(np.float32)
    (x, *_), attrs = args, call.attrs
    if op == "relax.reshape" and isinstance(call.args[1], relax.ShapeExpr):
        values = call.args[1].values
        return x.reshape(_ints(values)) if all(hasattr(v, "value") for v in values) else None
    if op == "relax.permute_dims":
        return np.ascontiguousarray(np.transpose(x, None if attrs.axes is None else _ints(attrs.axes)))
    if op == "relax.expand_dims":
        out = x
        for axis in sorted(a if a >= 0 else a + x.ndim + len(attrs.axis) for a in _ints(attrs.axis)):
            out = np.expand_dims(out, axis)
        return out
    if op == "relax.squeeze":
        return np.squeeze(x, None if attrs.axis is None else tuple(_ints(attrs.axis)))
    if op == "relax.astype":
        return x.astype(str(attrs.dtype))
    return None


def fold_weight_arithmetic_pass() -> Any:
    """A module pass: every known call on constants becomes the constant it computes."""
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class Fold(relax.PyExprMutator):
        def _value(self, arg: Any) -> np.ndarray | None:
            if isinstance(arg, relax.Var):
                arg = self.lookup_binding(arg)
            if not isinstance(arg, tvm.ir.expr.GenericConst):
                value = getattr(arg, "value", None)  # a scalar immediate, e.g. batch norm's epsilon
                return np.array(value, dtype=str(arg.ty)) if isinstance(value, (int, float)) else None
            value = arg.value
            return value.numpy() if hasattr(value, "numpy") else None

        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or not call.args:
                return call
            tensors = [a for a in call.args if not isinstance(a, relax.ShapeExpr)]
            values = [self._value(a) for a in tensors]
            if not values or any(v is None for v in values):
                return call
            out = evaluate(call.op.name, call, values)
            return call if out is None else relax.const(out)

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.FoldWeightArithmetic")
    def fold(mod: Any, _ctx: Any) -> Any:
        return rewrite_functions(Fold(mod), mod)

    return fold
