"""exp, sigmoid, SiLU, tanh, erf (GELU) and softmax lowered with vectorisable arithmetic, each
one compute stage, so that a conv's schedule takes them into its epilogue.

TVM legalises these ops to `tir.exp` / `tir.sigmoid` / `tir.tanh` / `tir.erf`, which LLVM
turns into one libm call per element: a `<16 x float>` exp becomes sixteen scalar `expf`
calls (x * sigmoid(x) over a 96 x 96 x 96 map: 2.4 ms on the Xeon). And SiLU arrives from
`torch.export` as sigmoid and multiply, a diamond (x read by both) that the conv schedule's
epilogue inlining stops at (`tvm_schedule`: one consumer at a time), so the conv wrote its
output and four more passes over it followed. A dense EfficientNet-B0 (timm, 192 x 192)
built 2.3x slower than ONNX Runtime, its 1x1 convs with SiLU at 5 GMAC/s.

Here: `fast_exp(v)` (a PrimExpr: range reduction and a polynomial, plain arithmetic that
vectorises), SiLU as one stage x / (1 + fast_exp(-x)) (`silu_pass` folds multiply(x,
sigmoid(x)) into `relax.nn.silu` first), sigmoid and exp likewise, tanh and erf as TOPI's
fast versions, softmax as max, fast_exp, sum and divide. Only float32; other dtypes keep TVM's.
"""
from __future__ import annotations

from typing import Any, Callable


def fast_exp(v: Any) -> Any:
    """exp(v) for a float32 PrimExpr, as arithmetic that vectorises: v = n ln2 + r with
    |r| <= ln2 / 2 (ln2 in two parts, so r is exact), exp(r) by its degree-7 Taylor polynomial
    (error < 1e-8 relative), 2^n from the exponent bits; v is clamped to [-87, 88], where 2^n
    stays a normal float (exp(-87) = 1.6e-38, below which the result is that value, not 0)."""
    from tvm import tirx

    f32 = lambda c: tirx.const(c, "float32")  # noqa: E731
    x = tirx.min(tirx.max(v, f32(-87.0)), f32(88.0))
    n = tirx.floor(x * f32(1.4426950408889634) + f32(0.5))
    r = x - n * f32(0.693145751953125) - n * f32(1.428606765330187e-06)
    p = f32(1.0 / 5040)
    for c in (1.0 / 720, 1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        p = p * r + f32(c)
    bits = tirx.shift_left(tirx.Cast("int32", n) + tirx.const(127, "int32"), tirx.const(23, "int32"))
    return p * tirx.reinterpret("float32", bits)


def _elementwise(fn: Callable[[Any], Any], name: str) -> Callable[[Any], Any]:
    def compute(x: Any) -> Any:
        from tvm import te

        return te.compute(x.shape, lambda *i: fn(x(*i)), name=name, tag="elemwise")
    return compute


def _one() -> Any:
    from tvm import tirx

    return tirx.const(1.0, "float32")


_exp = _elementwise(fast_exp, "fast_exp")
_sigmoid = _elementwise(lambda v: _one() / (_one() + fast_exp(-v)), "fast_sigmoid")
_silu = _elementwise(lambda v: v / (_one() + fast_exp(-v)), "fast_silu")


def _erf_of(x: Any, scale: float) -> Any:
    from tvm import te, topi

    return topi.fast_erf(te.compute(x.shape, lambda *i: x(*i) * scale, name="erf_input"))


def _gelu(x: Any) -> Any:
    """0.5 x (1 + erf(x / sqrt 2)), as relax.nn.gelu."""
    from tvm import te

    erf = _erf_of(x, 0.7071067811865476)
    return te.compute(x.shape, lambda *i: 0.5 * x(*i) * (1.0 + erf(*i)), name="fast_gelu", tag="elemwise")


def _softmax(x: Any, axis: int) -> Any:
    from tvm import te, topi

    axis = axis % len(x.shape)
    reduced = lambda i: [0 if d == axis else v for d, v in enumerate(i)]  # noqa: E731
    peak = topi.max(x, axis=axis, keepdims=True)
    e = te.compute(x.shape, lambda *i: fast_exp(x(*i) - peak(*reduced(i))), name="softmax_exp")
    total = topi.sum(e, axis=axis, keepdims=True)
    return te.compute(x.shape, lambda *i: e(*i) / total(*reduced(i)), name="fast_softmax")


def _float32(call: Any) -> bool:
    return getattr(getattr(call.args[0], "ty", None), "dtype", None) == "float32"


def _default(call: Any) -> Callable[[Any, Any], Any]:
    """TVM's own legalisation of the op of `call`."""
    import tvm

    return tvm.ir.Op.get(call.op.name).get_attr("FLegalize")


def fast_math_legalizers() -> dict[str, Callable[[Any, Any], Any]]:
    """`LegalizeOps` entries for float32 exp, sigmoid, silu, tanh, erf, gelu and softmax."""
    from tvm import topi

    def unary(compute: Callable[[Any], Any], name: str) -> Callable[[Any, Any], Any]:
        def legalize(bb: Any, call: Any) -> Any:
            if not _float32(call):
                return _default(call)(bb, call)
            return bb.call_te(compute, call.args[0], primfunc_name_hint=name)
        return legalize

    def softmax(bb: Any, call: Any) -> Any:
        if not _float32(call):
            return _default(call)(bb, call)
        return bb.call_te(_softmax, call.args[0], int(call.attrs.axis), primfunc_name_hint="softmax")

    return {"relax.exp": unary(_exp, "exp"), "relax.sigmoid": unary(_sigmoid, "sigmoid"),
            "relax.nn.silu": unary(_silu, "silu"), "relax.tanh": unary(topi.fast_tanh, "tanh"),
            "relax.erf": unary(topi.fast_erf, "erf"), "relax.nn.gelu": unary(_gelu, "gelu"),
            "relax.nn.softmax": softmax}


def silu_pass() -> Any:
    """A Relax module pass: multiply(x, sigmoid(x)) (either order) -> nn.silu(x)."""
    import tvm
    from tvm import relax

    from rwdeploy.runtime.tvm_fold import bound_value, is_op, rewrite_functions

    @relax.expr_functor.mutator
    class FoldSilu(relax.PyExprMutator):
        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not is_op(call, "relax.multiply"):
                return call
            for x, other in (call.args, call.args[::-1]):
                gate = bound_value(self, other)
                if is_op(gate, "relax.sigmoid") and gate.args[0].same_as(x):
                    return relax.op.nn.silu(x)
            return call

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.FoldSilu")
    def rewrite(mod: Any, _ctx: Any) -> Any:
        return rewrite_functions(FoldSilu(mod), mod)

    return rewrite
