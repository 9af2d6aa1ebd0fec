"""TIR kernels (TVMScript) for sparse and dense Linear / Conv2d, specialised per layer shape.

Every kernel is target-agnostic TIR: the same function compiles for the host CPU, for
aarch64 (NEON) and anywhere LLVM goes. Work is split over *chunks* of output rows with
`T.parallel`.

Scratch memory (accumulators, the padded input of a conv) is passed in as extra *output*
buffers that the caller allocates (`scratch_shapes`), never allocated inside the kernel:
a buffer allocated inside a parallel body becomes a runtime workspace allocation, which
LLVM must assume aliases the weight arrays, so it reloads indices and row pointers on
every step. (TVM's exception: a "global"-scope buffer under 1 KB goes on the stack; the conv
kernels keep their accumulators there, `tvm_conv_kernels.STACK`.) For the same reason scalars are bound with `T.bind` (a let): in TVMScript a
plain `v = expr` declares a 1-element buffer, i.e. another workspace allocation.
Parameters are `tir.noalias`.

Layouts (W is the weight as a matrix, rows = output features/channels):
- linear: x (B, K), y (B, N) = x @ W.T + bias
- conv2d: x (B, C, H, W), W (O, C/g*kh*kw) with columns ordered (ci, ky, kx)
- sparse: values (nnzb, br, bc) float32, indices (nnzb,) any int dtype, indptr int32
Kernel signatures: (x, values, indices, indptr, bias, *scratch, y) for sparse kernels and
dense conv (a dense weight is passed as a CSR holding every entry); (x, weight, bias, *scratch, y)
for dense linear.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache
from dataclasses import astuple, dataclass

from tvm.script import tirx as T

from rwdeploy.runtime.tvm_conv_kernels import ConvSpec, conv_kernel  # noqa: F401  (re-exported)
from rwdeploy.runtime.tvm_conv_kernels import scratch_shape as conv_scratch_shape

ROWS_PER_TASK = 16   # output rows per parallel task (linear)
GATHER_LANES = 8     # CSR row dot product: lanes of the gathered accumulator (8 measured best)
DENSE_LANES = 16     # dense row dot product accumulator lanes


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class LinearSpec:
    batch: int
    out_features: int
    in_features: int
    fmt: str                 # "dense" or "sparse"
    nnz_blocks: int = 0
    block: tuple[int, int] = (1, 1)
    index_dtype: str = "int32"
    values: str = "float32"       # "int8": values times a per-row float32 scale
    act: str = "none"             # fused activation: "none" | "relu"

    def name(self) -> str:
        return f"rw_linear_{self.fmt}_{_digest(self)}"


def linear_scale_shape(s: LinearSpec) -> tuple[int]:
    """The sparse linear kernels' `scale` input: per row for int8 values, else a 1-element dummy."""
    return (s.out_features,) if s.values == "int8" else (1,)


def _w(s: LinearSpec, vals, *idx):
    return T.Cast("float32", vals[idx]) if s.values == "int8" else vals[idx]


def _finish(s: LinearSpec, v, row, scale, bias):
    """scale (int8), bias, activation of one output."""
    if s.values == "int8":
        v = v * scale[row]
    v = v + bias[row]
    return T.max(v, T.float32(0)) if s.act == "relu" else v


def _digest(spec) -> str:
    return hashlib.sha1(repr(astuple(spec)).encode()).hexdigest()[:12]


@lru_cache(maxsize=None)   # parsing TVMScript costs ~0.3 s a kernel; identical layers share it
def kernel_for(spec: LinearSpec | ConvSpec):
    """The TIR PrimFunc for a spec, with `global_symbol` = spec.name()."""
    if isinstance(spec, LinearSpec):
        if spec.fmt == "dense":
            f = _dense_linear(spec)
        elif spec.batch > 1:
            f = _sparse_linear_batched(spec)
        elif spec.block == (1, 1):
            f = _csr_linear_b1(spec)
        elif spec.block[0] == 1:
            f = _bsr_linear_cols(spec)
        elif spec.block[1] == 1:
            f = _bsr_linear_rows(spec)
        else:
            raise ValueError(f"no linear kernel for block {spec.block}")
    else:
        if spec.block[1] != 1:
            raise ValueError(f"no conv kernel for block {spec.block}")
        f = conv_kernel(spec)
    return f.with_attr("global_symbol", spec.name())


def scratch_shapes(spec: LinearSpec | ConvSpec) -> list[tuple[int, ...]]:
    """Shapes of the float32 scratch outputs that come before y in the kernel's signature."""
    if isinstance(spec, LinearSpec):
        br, bc = spec.block
        if spec.fmt == "dense":
            return [(_linear_tasks(spec.out_features, 1), DENSE_LANES)]
        if spec.batch > 1:
            return [(spec.in_features, spec.batch),
                    (_linear_tasks(spec.out_features // br, br), 2, br, spec.batch)]
        lanes = GATHER_LANES if (br, bc) == (1, 1) else max(br, bc)
        return [(_linear_tasks(spec.out_features // br, br), lanes)]
    shape = conv_scratch_shape(spec)
    return [] if shape is None else [shape]


# ----------------------------------------------------------------------------- linear

def _linear_tasks(block_rows: int, br: int) -> int:
    return _ceil_div(block_rows, max(1, ROWS_PER_TASK // br))


def _dense_linear(s: LinearSpec):
    B, N, K, L, RB = s.batch, s.out_features, s.in_features, DENSE_LANES, ROWS_PER_TASK
    KV = K // L * L
    tasks = _linear_tasks(N, 1)

    @T.prim_func
    def f(x: T.Buffer((B, K), "float32"), w: T.Buffer((N, K), "float32"),
          bias: T.Buffer((N,), "float32"), acc: T.Buffer((tasks, L), "float32"),
          y: T.Buffer((B, N), "float32")):
        T.func_attr({"tir.noalias": True})
        for t in T.parallel(tasks):
            for i in range(RB):
                if t * RB + i < N:
                    for b in range(B):
                        for j in T.vectorized(L):
                            acc[t, j] = T.float32(0)
                        for ko in range(KV // L):
                            for j in T.vectorized(L):
                                acc[t, j] = acc[t, j] + w[t * RB + i, ko * L + j] * x[b, ko * L + j]
                        for k in range(KV, K):
                            acc[t, 0] = acc[t, 0] + w[t * RB + i, k] * x[b, k]
                        y[b, t * RB + i] = bias[t * RB + i]
                        for j in range(L):
                            y[b, t * RB + i] = y[b, t * RB + i] + acc[t, j]
    return f


def _csr_linear_b1(s: LinearSpec):
    """Batch 1: per row, a GATHER_LANES-wide gathered dot product plus a scalar tail."""
    N, K, NNZ, L, RB, IDX = s.out_features, s.in_features, s.nnz_blocks, GATHER_LANES, ROWS_PER_TASK, s.index_dtype
    tasks = _linear_tasks(N, 1)

    SC, VT = linear_scale_shape(s), s.values

    @T.prim_func
    def f(x: T.Buffer((1, K), "float32"), vals: T.Buffer((NNZ, 1, 1), VT),
          col: T.Buffer((NNZ,), IDX), rp: T.Buffer((N + 1,), "int32"),
          bias: T.Buffer((N,), "float32"), scale: T.Buffer(SC, "float32"), acc: T.Buffer((tasks, L), "float32"),
          y: T.Buffer((1, N), "float32")):
        T.func_attr({"tir.noalias": True})
        for t in T.parallel(tasks):
            for i in range(RB):
                if t * RB + i < N:
                    lo = T.bind(rp[t * RB + i])
                    hi = T.bind(rp[t * RB + i + 1])
                    for j in T.vectorized(L):
                        acc[t, j] = T.float32(0)
                    for c in range((hi - lo) // L):
                        for j in T.vectorized(L):
                            acc[t, j] = acc[t, j] + _w(s, vals, lo + c * L + j, 0, 0) * x[
                                0, T.Cast("int32", col[lo + c * L + j])]
                    for k in range(lo + (hi - lo) // L * L, hi):
                        acc[t, 0] = acc[t, 0] + _w(s, vals, k, 0, 0) * x[0, T.Cast("int32", col[k])]
                    for j in range(1, L):
                        acc[t, 0] = acc[t, 0] + acc[t, j]
                    y[0, t * RB + i] = _finish(s, acc[t, 0], t * RB + i, scale, bias)
    return f


def _sparse_linear_batched(s: LinearSpec):
    """Batch > 1, any block: transpose x once to (K, B) so each stored weight updates B lanes.

    Stored blocks are taken two at a time into two accumulator sets: one chain of dependent
    FMAs per row would wait out the FMA latency on every non-zero."""
    B, N, K, NNZ, IDX = s.batch, s.out_features, s.in_features, s.nnz_blocks, s.index_dtype
    BR, BC = s.block
    NB = N // BR
    RB = max(1, ROWS_PER_TASK // BR)
    tasks = _linear_tasks(NB, BR)
    kt = _ceil_div(K, 64)

    SC, VT = linear_scale_shape(s), s.values

    @T.prim_func
    def f(x: T.Buffer((B, K), "float32"), vals: T.Buffer((NNZ, BR, BC), VT),
          col: T.Buffer((NNZ,), IDX), rp: T.Buffer((NB + 1,), "int32"),
          bias: T.Buffer((N,), "float32"), scale: T.Buffer(SC, "float32"), xt: T.Buffer((K, B), "float32"),
          acc: T.Buffer((tasks, 2, BR, B), "float32"), y: T.Buffer((B, N), "float32")):
        T.func_attr({"tir.noalias": True})
        for kc in T.parallel(kt):
            for kk in range(64):
                if kc * 64 + kk < K:
                    for b in range(B):
                        xt[kc * 64 + kk, b] = x[b, kc * 64 + kk]
        for t in T.parallel(tasks):
            for i in range(RB):
                if t * RB + i < NB:
                    lo = T.bind(rp[t * RB + i])
                    hi = T.bind(rp[t * RB + i + 1])
                    for u, r in T.grid(2, BR):
                        for b in T.vectorized(B):
                            acc[t, u, r, b] = T.float32(0)
                    for c in range((hi - lo) // 2):
                        for u, r, j in T.grid(2, BR, BC):
                            for b in T.vectorized(B):
                                acc[t, u, r, b] = acc[t, u, r, b] + _w(s, vals, lo + 2 * c + u, r, j) * xt[
                                    T.Cast("int32", col[lo + 2 * c + u]) * BC + j, b]
                    for k in range(lo + (hi - lo) // 2 * 2, hi):
                        for r, j in T.grid(BR, BC):
                            for b in T.vectorized(B):
                                acc[t, 0, r, b] = acc[t, 0, r, b] + _w(s, vals, k, r, j) * xt[
                                    T.Cast("int32", col[k]) * BC + j, b]
                    for r in range(BR):
                        for b in range(B):
                            y[b, (t * RB + i) * BR + r] = _finish(
                                s, acc[t, 0, r, b] + acc[t, 1, r, b], (t * RB + i) * BR + r, scale, bias)
    return f


def _bsr_linear_cols(s: LinearSpec):
    """Batch 1, blocks of 1 row x BC columns: vector over the block's columns, then a row sum."""
    N, K, NNZ, IDX = s.out_features, s.in_features, s.nnz_blocks, s.index_dtype
    BC, RB = s.block[1], ROWS_PER_TASK
    tasks = _linear_tasks(N, 1)

    SC, VT = linear_scale_shape(s), s.values

    @T.prim_func
    def f(x: T.Buffer((1, K), "float32"), vals: T.Buffer((NNZ, 1, BC), VT),
          col: T.Buffer((NNZ,), IDX), rp: T.Buffer((N + 1,), "int32"),
          bias: T.Buffer((N,), "float32"), scale: T.Buffer(SC, "float32"), acc: T.Buffer((tasks, BC), "float32"),
          y: T.Buffer((1, N), "float32")):
        T.func_attr({"tir.noalias": True})
        for t in T.parallel(tasks):
            for i in range(RB):
                if t * RB + i < N:
                    for j in T.vectorized(BC):
                        acc[t, j] = T.float32(0)
                    for k in range(rp[t * RB + i], rp[t * RB + i + 1]):
                        for j in T.vectorized(BC):
                            acc[t, j] = acc[t, j] + _w(s, vals, k, 0, j) * x[0, T.Cast("int32", col[k]) * BC + j]
                    for j in range(1, BC):
                        acc[t, 0] = acc[t, 0] + acc[t, j]
                    y[0, t * RB + i] = _finish(s, acc[t, 0], t * RB + i, scale, bias)
    return f


def _bsr_linear_rows(s: LinearSpec):
    """Batch 1, blocks of BR rows x 1 column: one x element broadcast into BR row sums."""
    N, K, NNZ, IDX = s.out_features, s.in_features, s.nnz_blocks, s.index_dtype
    BR = s.block[0]
    NB = N // BR
    RB = max(1, ROWS_PER_TASK // BR)
    tasks = _linear_tasks(NB, BR)

    SC, VT = linear_scale_shape(s), s.values

    @T.prim_func
    def f(x: T.Buffer((1, K), "float32"), vals: T.Buffer((NNZ, BR, 1), VT),
          col: T.Buffer((NNZ,), IDX), rp: T.Buffer((NB + 1,), "int32"),
          bias: T.Buffer((N,), "float32"), scale: T.Buffer(SC, "float32"), acc: T.Buffer((tasks, BR), "float32"),
          y: T.Buffer((1, N), "float32")):
        T.func_attr({"tir.noalias": True})
        for t in T.parallel(tasks):
            for i in range(RB):
                if t * RB + i < NB:
                    for r in T.vectorized(BR):
                        acc[t, r] = T.float32(0)
                    for k in range(rp[t * RB + i], rp[t * RB + i + 1]):
                        for r in T.vectorized(BR):
                            acc[t, r] = acc[t, r] + _w(s, vals, k, r, 0) * x[0, T.Cast("int32", col[k])]
                    for r in T.vectorized(BR):
                        y[0, (t * RB + i) * BR + r] = _finish(s, acc[t, r], (t * RB + i) * BR + r, scale, bias)
    return f
