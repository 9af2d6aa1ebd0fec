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
passes. Softmax: max, then exp (`fast_exp`) written and summed, then a multiply by the
reciprocal of the sum. Layer norm: mean, then the mean squared deviation (two passes, the
variance does not suffer cancellation as E[x^2] - mean^2 does), then the normalised output.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Callable

LOWEST = -3.4028234663852886e38   # float32's lowest value: the max of an empty row
OPAQUE = 8                        # relax op pattern kOpaque: Relax fuses nothing into it


def _finish(func: Any, layer: str) -> Any:
    return func.with_attr("op_pattern", OPAQUE).with_attr("tirx.is_scheduled", True) \
        .with_attr("rwdeploy.layer", layer)


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
def softmax_rows(shape: tuple[int, ...], lanes: int) -> Any:
    """softmax(x, axis=-1) of a float32 tensor of `shape`, rows in parallel."""
    from tvm.script import tirx as T

    from rwdeploy.runtime.tvm_fast_math import fast_exp

    R, N, L = math.prod(shape[:-1]), shape[-1], lanes
    reduce_row, map_row = _row_macros(L, N)

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
                reduce_row(acc, red, T.float32(LOWEST), T.max, lambda k: xf[row + k])
                peak = T.bind(red[0])
                map_row(yf, row, lambda k: fast_exp(xf[row + k] - peak))
                reduce_row(acc, red, T.float32(0), _add, lambda k: yf[row + k])
                inv = T.bind(T.float32(1) / red[0])
                map_row(yf, row, lambda k: yf[row + k] * inv)

    return _finish(f, f"softmax rows {R}x{N}")


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

    return _finish(f, f"layer norm rows {R}x{N}")


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
    gv = bb.add_func(softmax_rows(shape, lanes), f"rw_softmax_rows_{math.prod(shape[:-1])}x{shape[-1]}")
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
    gv = bb.add_func(kernel, f"rw_layer_norm_rows_{math.prod(shape[:-1])}x{shape[-1]}")
    return relax.call_tir(gv, [data, gamma, beta], relax.TensorType(shape, "float32"))
