"""Softmax and layer norm over the last axis as row kernels: each row read from L1, its
reductions in vector-wide partial sums.

TVM's lowering of both (`topi`, and our `tvm_fast_math._softmax`) is a chain of stages over
the whole tensor that no CPU schedule touches: each stage is a pass through memory with an
intermediate the size of the input, and each reduction along the row runs as one scalar chain
(LLVM may not reorder float additions), one dependent add or max per element. ViT-Tiny's
attention softmax (3 x 197 x 197 per block) took 2.5 ms of 28 and its layer norms 1.4 ms on
the Xeon, against ONNX Runtime's 0.6 and 0.6.

Here one parallel task per row (the rows are independent): a pass to reduce the row into
`lanes` partial results (a vector accumulator, so a dependent chain of only N / lanes steps),
a horizontal step over the lanes, then the elementwise pass; the tail of a row that no whole
vector covers (197 = 12 x 16 + 5) goes into the first lanes. The row stays in L1 between the
passes. Softmax: max, exp (`fast_exp`) written, its sum, then a multiply by the reciprocal of
the sum. Layer norm: mean, then the mean squared deviation (two passes, the
variance does not suffer cancellation as E[x^2] - mean^2 does), then the normalised output.
"""
from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from typing import Any, Callable

LOWEST = -3.4028234663852886e38   # float32's lowest value: the max of an empty row


def _finish(func: Any, layer: str, symbol: str) -> Any:
    """Marked as the sparse kernels are (never fused, never rescheduled, described), with its
    own symbol."""
    from rwdeploy.runtime.tvm_sparse import _scheduled

    return _scheduled(func, layer).with_attr("global_symbol", symbol)


def _symbol(kind: str, shape: tuple[int, ...], *settings: Any) -> str:
    """A kernel's symbol, distinct for every shape and setting it is specialised to."""
    digest = hashlib.sha1(repr((shape, settings)).encode()).hexdigest()[:8]
    return f"rw_{kind}_{math.prod(shape[:-1])}x{shape[-1]}_{digest}"


def _row_macros(L: int, N: int) -> tuple[Any, Any]:
    """TVMScript macros over a row of `N`, in vectors of `L` and a scalar tail:
    `reduce_row`: `red[0]` = `combine` over `value(k)`, through the lanes of `acc` (the
    tail goes into the first lanes); `map_row`: dst[row + k] = value(k); k is the column, `row` the
    offset of the row in `dst`."""
    from tvm.script import tirx as T

    NV, NT = N // L, N % L

    @T.macro
    def reduce_row(acc, red, init, combine, value):
        for l in T.vectorized(L):
            acc[l] = init
        for j in range(NV):
            for l in T.vectorized(L):
                acc[l] = combine(acc[l], value(j * L + l))
        for t in range(NT):
            acc[t] = combine(acc[t], value(NV * L + t))
        red[0] = acc[0]
        for l in range(1, L):
            red[0] = combine(red[0], acc[l])

    @T.macro
    def map_row(dst, row, value):
        for j in range(NV):
            for l in T.vectorized(L):
                dst[row + j * L + l] = value(j * L + l)
        for t in range(NT):
            dst[row + NV * L + t] = value(NV * L + t)

    return reduce_row, map_row


def _add(a: Any, b: Any) -> Any:
    return a + b


@lru_cache(maxsize=None)
def softmax_rows(shape: tuple[int, ...], lanes: int, safe: bool = False) -> Any:
    """softmax(x, axis=-1) of a float32 tensor of `shape`, rows in parallel; `safe`: a row that
    is all -inf gives zeros (torch's `_safe_softmax`, what `torch.export` writes for
    scaled_dot_product_attention), not NaN."""
    from tvm.script import tirx as T

    from rwdeploy.runtime.tvm_fast_math import fast_exp

    R, N, L = math.prod(shape[:-1]), shape[-1], lanes
    reduce_row, map_row = _row_macros(L, N)
    start = float("-inf") if safe else LOWEST   # the max of a row of -inf stays -inf when safe

    @T.prim_func(s_tir=True)
    def f(x: T.Buffer(shape, "float32"), y: T.Buffer(shape, "float32")):
        T.func_attr({"tir.noalias": True})
        with T.sblock("root"):
            for r in T.parallel(R):
                xf = T.decl_buffer((R * N,), "float32", data=x.data)
                yf = T.decl_buffer((R * N,), "float32", data=y.data)
                acc = T.decl_buffer((L,), "float32", scope="global")
                red = T.decl_buffer((1,), "float32", scope="global")
                row = T.bind(r * N)
                reduce_row(acc, red, T.float32(start), T.max, lambda k: xf[row + k])
                peak = T.bind(red[0])
                if safe and peak == T.float32(start):
                    map_row(yf, row, lambda k: T.float32(0))
                else:
                    map_row(yf, row, lambda k: fast_exp(xf[row + k] - peak))
                    reduce_row(acc, red, T.float32(0), _add, lambda k: yf[row + k])
                    inv = T.bind(T.float32(1) / red[0])
                    map_row(yf, row, lambda k: yf[row + k] * inv)

    kind = "safe_softmax_rows" if safe else "softmax_rows"
    return _finish(f, f"{'safe ' if safe else ''}softmax rows {R}x{N}", _symbol(kind, shape, lanes))


@lru_cache(maxsize=None)
def layer_norm_rows(shape: tuple[int, ...], epsilon: float, center: bool, scale: bool,
                    lanes: int) -> Any:
    """layer_norm(x, gamma, beta) over the last axis of a float32 tensor of `shape`; `center`
    / `scale` as `relax.nn.layer_norm` (without them beta / gamma are not applied)."""
    from tvm.script import tirx as T

    R, N, L = math.prod(shape[:-1]), shape[-1], lanes
    reduce_row, map_row = _row_macros(L, N)

    def affine(v: Any, gamma: Any, beta: Any, k: Any) -> Any:
        if scale:
            v = v * gamma[k]
        return v + beta[k] if center else v

    @T.prim_func(s_tir=True)
    def f(x: T.Buffer(shape, "float32"), gamma: T.Buffer((N,), "float32"),
          beta: T.Buffer((N,), "float32"), y: T.Buffer(shape, "float32")):
        T.func_attr({"tir.noalias": True})
        with T.sblock("root"):
            for r in T.parallel(R):
                xf = T.decl_buffer((R * N,), "float32", data=x.data)
                yf = T.decl_buffer((R * N,), "float32", data=y.data)
                acc = T.decl_buffer((L,), "float32", scope="global")
                red = T.decl_buffer((1,), "float32", scope="global")
                row = T.bind(r * N)
                reduce_row(acc, red, T.float32(0), _add, lambda k: xf[row + k])
                mean = T.bind(red[0] * T.float32(1.0 / N))
                reduce_row(acc, red, T.float32(0), _add, lambda k: (xf[row + k] - mean) * (xf[row + k] - mean))
                rstd = T.bind(T.float32(1) / T.sqrt(red[0] * T.float32(1.0 / N) + T.float32(epsilon)))
                map_row(yf, row, lambda k: affine((xf[row + k] - mean) * rstd, gamma, beta, k))

    return _finish(f, f"layer norm rows {R}x{N}",
                   _symbol("layer_norm_rows", shape, epsilon, center, scale, lanes))


def row_legalizers(lanes: int, fallback: dict[str, Callable[[Any, Any], Any]]
                   ) -> dict[str, Callable[[Any, Any], Any]]:
    """`LegalizeOps` entries for softmax and layer norm: over the last axis as the row kernels
    here, else `fallback`'s entry for the op (TVM's own where it has none)."""
    import tvm

    def entry(op: str, rows: Callable[[Any, Any, int], Any]) -> Callable[[Any, Any], Any]:
        def legalize(bb: Any, call: Any) -> Any:
            lowered = rows(bb, call, lanes)
            if lowered is not None:
                return lowered
            other = fallback.get(op) or tvm.ir.Op.get(op).get_attr("FLegalize")
            return other(bb, call)
        return legalize

    return {"relax.nn.softmax": entry("relax.nn.softmax", row_softmax),
            "relax.nn.layer_norm": entry("relax.nn.layer_norm", row_layer_norm)}


def _safe_softmax_input(mutator: Any, call: Any) -> Any | None:
    """For where(all(s == -inf, -1), 0, softmax(s, -1)) as `torch.export` decomposes
    `_safe_softmax` (equal, logical_not, astype int8, max keepdims, astype bool, logical_not;
    full_like 0, or its folded constant), the scores s; else None."""
    from rwdeploy.runtime.tvm_fold import bound_value, constant_value, is_op

    import numpy as np

    if not is_op(call, "relax.where"):
        return None
    mask, zeros, probs = (a if bound_value(mutator, a) is None else bound_value(mutator, a)
                          for a in call.args)
    if not is_op(probs, "relax.nn.softmax"):
        return None
    scores = probs.args[0]
    shape = _static_shape(scores)
    if shape is None or int(probs.attrs.axis) % len(shape) != len(shape) - 1:
        return None
    # the zeros: full_like(probs, 0), or that already folded into a constant
    fill = constant_value(zeros.args[1] if is_op(zeros, "relax.full_like") else zeros)
    if fill is None or np.any(fill != 0):
        return None
    chain = [("relax.logical_not", None), ("relax.astype", "bool"), ("relax.max", None),
             ("relax.astype", "int8"), ("relax.logical_not", None), ("relax.equal", None)]
    expr = mask
    for i, (op, dtype) in enumerate(chain):
        if not is_op(expr, op) or (dtype and str(expr.attrs.dtype) != dtype):
            return None
        if op == "relax.max" and ([int(a) % len(shape) for a in expr.attrs.axis] != [len(shape) - 1]
                                  or not expr.attrs.keepdims):
            return None
        if op == "relax.equal":
            other = constant_value(expr.args[1])
            if not (expr.args[0].same_as(scores) and other is not None and other.size == 1
                    and float(other.reshape(-1)[0]) == float("-inf")):
                return None
            return scores
        expr = bound_value(mutator, expr.args[0])
    return None


def safe_softmax_pass(lanes: int) -> Any:
    """A Relax module pass: torch's `_safe_softmax` over the last axis of a static float32
    tensor (a softmax, a zero tensor and a where over an all(-inf) row mask: three passes over
    the scores and a reduction besides the softmax; 0.66 of ViT-Tiny's 24 ms) -> one
    `softmax_rows(..., safe=True)` call."""
    import tvm
    from tvm import relax

    from rwdeploy.runtime.tvm_fold import rewrite_functions

    @relax.expr_functor.mutator
    class SafeSoftmax(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            scores = _safe_softmax_input(self, call)
            if scores is None or str(scores.ty.dtype) != "float32":
                return call
            shape = _static_shape(scores)
            kernel = softmax_rows(shape, lanes, safe=True)
            gv = self.builder_.add_func(kernel, str(kernel.attrs["global_symbol"]))
            return relax.call_tir(gv, [scores], relax.TensorType(shape, "float32"))

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.SafeSoftmax")
    def rewrite(mod: Any, _ctx: Any) -> Any:
        return rewrite_functions(SafeSoftmax(mod), mod)

    return rewrite


def _static_shape(expr: Any) -> tuple[int, ...] | None:
    try:
        return tuple(int(d) for d in expr.ty.shape)
    except (TypeError, ValueError, AttributeError):   # a symbolic or unknown dimension
        return None


def row_softmax(bb: Any, call: Any, lanes: int) -> Any | None:
    """`relax.nn.softmax` over the last axis of a static float32 tensor as `softmax_rows`;
    None for anything else (the caller lowers it as before)."""
    from tvm import relax

    shape = _static_shape(call.args[0])
    if shape is None or str(call.args[0].ty.dtype) != "float32" or not shape or \
            int(call.attrs.axis) % len(shape) != len(shape) - 1:
        return None
    kernel = softmax_rows(shape, lanes)
    gv = bb.add_func(kernel, str(kernel.attrs["global_symbol"]))
    return relax.call_tir(gv, [call.args[0]], relax.TensorType(shape, "float32"))


def row_layer_norm(bb: Any, call: Any, lanes: int) -> Any | None:
    """`relax.nn.layer_norm` over the last axis alone of a static float32 tensor as
    `layer_norm_rows`; None for anything else."""
    from tvm import relax

    data, gamma, beta = call.args
    shape = _static_shape(data)
    axes = [int(a) for a in call.attrs.axes]
    if (shape is None or not shape or str(data.ty.dtype) != "float32"
            or [a % len(shape) for a in axes] != [len(shape) - 1]
            or any(_static_shape(p) != (shape[-1],) or str(p.ty.dtype) != "float32" for p in (gamma, beta))):
        return None
    kernel = layer_norm_rows(shape, float(call.attrs.epsilon), bool(call.attrs.center),
                             bool(call.attrs.scale), lanes)
    gv = bb.add_func(kernel, str(kernel.attrs["global_symbol"]))
    return relax.call_tir(gv, [data, gamma, beta], relax.TensorType(shape, "float32"))
