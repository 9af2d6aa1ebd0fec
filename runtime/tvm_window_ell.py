"""Batch-1 CSR Linear layers as sliced ELL over column windows: the kernel for AVX-512 CPUs.

The CSR kernel (`tvm_kernels._csr_linear_b1`) loads x[col] once per stored weight: a
per-element gather that LLVM scalarises, about 1.1 cycles a non-zero on Zen 4, so a 95 %
sparse 4096->1024 Linear ran only 3x faster than the dense one, which streams its 16.8 MB
weight at full bandwidth. Here nothing is gathered from memory:

- 16 output rows are the 16 lanes of one vector (a *row block*), and the input is read in
  *windows* of 64 columns held in four vector registers.
- Step s of a (row block, window) pair takes, in each lane, that row's s-th stored weight
  in the window; its input is picked out of the four registers by two two-table permutes
  (`vpermi2ps`) and a blend on the index's bit 5.
- A pair runs as many steps as its fullest row has weights in the window; the other lanes
  hold zeros. At 95 % random sparsity that is ~2.1 slots per stored weight, 5 bytes each
  (the value and a one-byte column within the window).

`pack` lays a CSR matrix out so; `kernel` is the TIR (one PrimFunc per shape);
`window_ell_pass` rewrites, in a Relax module, every batch-1 float32/int8 CSR Linear call of
`tvm_sparse` whose weights are constants into this kernel. It runs only for x86 targets with
512-bit vectors (`supports`): the permutes are AVX-512 instructions; elsewhere (aarch64,
AVX2) the CSR kernel stays. The format the user chose (and `pack_sparse` measured) is still
CSR: this is how CSR runs on such a CPU, and the layer's description in reports says so.
"""
from __future__ import annotations

import hashlib
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np
from tvm.script import tirx as T

LANES = 16      # rows per block: float32 lanes of a 512-bit vector
WINDOW = 64     # columns per window: four registers, two permutes of 32 entries each
_PERMUTE = "llvm.x86.avx512.vpermi2var.ps.512"
_CSR_LINEAR = "rw_linear_sparse_"   # `tvm_kernels.LinearSpec.name()` of the sparse kernels


@dataclass(frozen=True)
class WindowEll:
    """A matrix in sliced ELL over column windows. Slot (step s, lane l) is at s * LANES + l."""

    values: np.ndarray      # (steps * LANES,) float32 or int8; zero in padding slots
    index: np.ndarray       # (steps * LANES,) uint8: the column within its window
    step_ptr: np.ndarray    # (blocks * windows + 1,) int32: steps of (block b, window w) start
                            # at step_ptr[b * windows + w]
    rows: int
    cols: int

    @property
    def steps(self) -> int:
        return int(self.step_ptr[-1])

    @property
    def blocks(self) -> int:
        return -(-self.rows // LANES)

    @property
    def windows(self) -> int:
        return -(-self.cols // WINDOW)

    def to_dense(self) -> np.ndarray:
        """The matrix (float values as stored, int8 ones as integers), to check a packing."""
        dense = np.zeros((self.blocks * LANES, self.windows * WINDOW), np.float64)
        for b in range(self.blocks):
            for w in range(self.windows):
                for s in range(self.step_ptr[b * self.windows + w], self.step_ptr[b * self.windows + w + 1]):
                    for lane in range(LANES):
                        v = self.values[s * LANES + lane]
                        if v != 0:
                            dense[b * LANES + lane, w * WINDOW + int(self.index[s * LANES + lane])] += v
        return dense[:self.rows, :self.cols]


def pack(values: np.ndarray, columns: np.ndarray, indptr: np.ndarray, rows: int, cols: int) -> WindowEll:
    """The window-ELL layout of the CSR matrix (values, columns, indptr) of shape (rows, cols).

    Columns need not be sorted within a row; stored zeros are kept (as the CSR kernel would
    multiply them)."""
    values = np.asarray(values).reshape(-1)
    columns = np.asarray(columns).reshape(-1).astype(np.int64)
    counts = np.diff(np.asarray(indptr, np.int64))
    row = np.repeat(np.arange(rows, dtype=np.int64), counts)
    order = np.lexsort((columns, row))
    row, columns, values = row[order], columns[order], values[order]
    blocks, windows = -(-rows // LANES), -(-cols // WINDOW)
    window = columns // WINDOW
    group = row * windows + window          # non-decreasing: sorted by row, then column
    rank = np.arange(len(group)) - np.searchsorted(group, group, side="left")
    per_lane = np.zeros((blocks, LANES, windows), np.int64)
    np.add.at(per_lane, (row // LANES, row % LANES, window), 1)
    steps = per_lane.max(axis=1).reshape(-1)
    step_ptr = np.zeros(blocks * windows + 1, np.int64)
    np.cumsum(steps, out=step_ptr[1:])
    if step_ptr[-1] * LANES >= 2 ** 31:
        raise ValueError(f"window-ELL of a {rows}x{cols} matrix needs {step_ptr[-1] * LANES} slots (int32 limit)")
    slot = (step_ptr[(row // LANES) * windows + window] + rank) * LANES + row % LANES
    packed = np.zeros(int(step_ptr[-1]) * LANES, values.dtype)
    packed[slot] = values
    index = np.zeros(len(packed), np.uint8)
    index[slot] = columns % WINDOW
    return WindowEll(packed, index, step_ptr.astype(np.int32), rows, cols)


@dataclass(frozen=True)
class WindowEllSpec:
    rows: int               # out_features
    cols: int               # in_features
    steps: int
    values: str = "float32"     # "int8": values times a per-row float32 scale

    def name(self) -> str:
        return "rw_linear_window_ell_" + hashlib.sha1(repr(astuple(self)).encode()).hexdigest()[:12]

    @property
    def scratch_shape(self) -> tuple[int]:
        """x copied into whole windows, then two accumulator vectors per row block."""
        blocks, windows = -(-self.rows // LANES), -(-self.cols // WINDOW)
        return (windows * WINDOW + blocks * 2 * LANES,)

    def describe(self, nnz: int) -> str:
        return (f"linear {self.cols}->{self.rows} batch 1 csr{' int8' if self.values == 'int8' else ''} "
                f"nnz={nnz}, run as window-ELL ({LANES} rows x {WINDOW} columns, "
                f"{self.steps * LANES / max(nnz, 1):.2f} slots per stored weight)")


def kernel(s: WindowEllSpec) -> Any:
    """y (1, rows) = x (1, cols) @ W.T (* scale) + bias for W packed by `pack`.

    Signature: (x, values, index, step_ptr, bias, scale, scratch, y); `scale` is a 1-element
    dummy for float32 values. Row blocks run in parallel. Consecutive windows accumulate into
    alternating vectors, so one window's FMA chain does not wait for the previous one's."""
    N, K, S, L, WIN = s.rows, s.cols, s.steps, LANES, WINDOW
    NB, NW = -(-N // L), -(-K // WIN)
    XP, VT = NW * WIN, s.values
    SC = (N,) if VT == "int8" else (1,)
    int8 = VT == "int8"

    padded = K % WIN != 0      # the last window reads past x: windows come from a zero-padded copy

    def weights(vals, st):
        v = vals[T.ramp(st * L, 1, L)]
        return T.Cast("float32x16", v) if int8 else v

    def finish(v, row, scale, bias):
        return (v * scale[row] if int8 else v) + bias[row]

    @T.macro
    def store(y, scratch, scale, bias, b):
        if N % L == 0:   # whole blocks: one vector store
            for j in T.vectorized(L):
                y[0, b * L + j] = finish(scratch[XP + b * 2 * L + j] + scratch[XP + b * 2 * L + L + j],
                                         b * L + j, scale, bias)
        else:
            for j in range(L):
                if b * L + j < N:
                    y[0, b * L + j] = finish(scratch[XP + b * 2 * L + j] + scratch[XP + b * 2 * L + L + j],
                                             b * L + j, scale, bias)

    @T.prim_func
    def f(x: T.Buffer((1, K), "float32"), vals: T.Buffer((S * L,), VT), idx: T.Buffer((S * L,), "uint8"),
          step_ptr: T.Buffer((NB * NW + 1,), "int32"), bias: T.Buffer((N,), "float32"),
          scale: T.Buffer(SC, "float32"), scratch: T.Buffer((XP + NB * 2 * L,), "float32"),
          y: T.Buffer((1, N), "float32")):
        T.func_attr({"tir.noalias": True})
        src = T.decl_buffer((XP,), "float32", data=scratch.data if padded else x.data)
        if padded:
            for k in T.vectorized(K):
                scratch[k] = x[0, k]
            for k in range(K, XP):
                scratch[k] = T.float32(0)
        for b in T.parallel(NB):
            for j in T.vectorized(2 * L):
                scratch[XP + b * 2 * L + j] = T.float32(0)
            for w in range(NW):
                x0 = T.bind(src[T.ramp(w * WIN, 1, L)])
                x1 = T.bind(src[T.ramp(w * WIN + 16, 1, L)])
                x2 = T.bind(src[T.ramp(w * WIN + 32, 1, L)])
                x3 = T.bind(src[T.ramp(w * WIN + 48, 1, L)])
                acc = T.bind(XP + b * 2 * L + w % 2 * L)
                for st in range(step_ptr[b * NW + w], step_ptr[b * NW + w + 1]):
                    i = T.bind(T.Cast("int32x16", idx[T.ramp(st * L, 1, L)]))
                    g = T.bind(T.Select(T.bitwise_and(i, T.Broadcast(32, L)) != T.Broadcast(0, L),
                                        T.call_llvm_pure_intrin("float32x16", _PERMUTE, x2, i, x3),
                                        T.call_llvm_pure_intrin("float32x16", _PERMUTE, x0, i, x1)))
                    scratch[T.ramp(acc, 1, L)] = scratch[T.ramp(acc, 1, L)] + weights(vals, st) * g
            store(y, scratch, scale, bias, b)

    return f.with_attr("global_symbol", s.name())


def supports(target: Any) -> bool:
    """Whether `target` runs this kernel: an x86 LLVM target with 512-bit vectors (AVX-512)."""
    from rwdeploy.runtime.tvm_schedule import vector_lanes

    if str(target.kind.name) != "llvm":
        return False
    triple = str(target.attrs.get("mtriple", "")) or "x86_64"
    return triple.startswith(("x86_64", "i686")) and vector_lanes(target) >= LANES


def window_ell_pass() -> Any:
    """A Relax module pass: every call of a batch-1, 1x1-block CSR Linear kernel whose weights
    are constants becomes a call of the window-ELL kernel (include it for `supports` targets)."""
    import tvm
    from tvm import relax

    from rwdeploy.runtime.tvm_fold import rewrite_functions
    from rwdeploy.runtime.tvm_sparse import _scheduled

    replaced: set[str] = set()   # names of the CSR kernels a call of which was rewritten

    @relax.expr_functor.mutator
    class ToWindowEll(relax.PyExprMutator):
        def _value(self, arg: relax.Expr) -> np.ndarray | None:
            if isinstance(arg, relax.Var):
                try:
                    arg = self.lookup_binding(arg)
                except Exception:  # noqa: BLE001 - a function parameter: not a constant
                    return None
            value = getattr(arg, "value", None) if isinstance(arg, tvm.ir.expr.GenericConst) else None
            return value.numpy() if hasattr(value, "numpy") else None

        def visit_call_(self, call: relax.Call) -> relax.Expr:
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.call_tir"):
                return call
            gvar, args = call.args[0], call.args[1]
            if not gvar.name_hint.startswith(_CSR_LINEAR) or not isinstance(args, relax.Tuple) \
                    or len(args.fields) != 6:
                return call
            x, *weights = args.fields
            values, columns, indptr, bias, scale = (self._value(a) for a in weights)
            x_shape = [int(d) for d in x.ty.shape]
            if any(a is None for a in (values, columns, indptr, bias, scale)) or len(x_shape) != 2 \
                    or x_shape[0] != 1 or values.ndim != 3 or values.shape[1:] != (1, 1) \
                    or values.dtype not in (np.float32, np.int8):
                return call
            rows, cols = len(indptr) - 1, x_shape[1]
            ell = pack(values, columns, indptr, rows, cols)
            spec = WindowEllSpec(rows, cols, ell.steps, "int8" if values.dtype == np.int8 else "float32")
            func = _scheduled(kernel(spec), spec.describe(len(values)))
            new = self.builder_.add_func(func, spec.name())
            replaced.add(gvar.name_hint)
            scale_arg = weights[4] if spec.values == "int8" else relax.const(np.ones(1, np.float32))
            return relax.call_tir(new, [x, relax.const(ell.values), relax.const(ell.index),
                                        relax.const(ell.step_ptr), weights[3], scale_arg],
                                  [relax.TensorType(spec.scratch_shape, "float32"),
                                   relax.TensorType((1, rows), "float32")])

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.WindowEllLinear")
    def rewrite(mod: Any, _ctx: Any) -> Any:
        replaced.clear()
        out = rewrite_functions(ToWindowEll(mod), mod)
        used = {g.name_hint for f in out.functions.values() if isinstance(f, relax.Function)
                for g in relax.analysis.all_global_vars(f)}
        for gvar in list(out.functions.keys()):
            if gvar.name_hint in replaced and gvar.name_hint not in used:
                out = _without(out, gvar)
        return out

    return rewrite


def _without(mod: Any, gvar: Any) -> Any:
    import tvm

    funcs = {g: f for g, f in mod.functions.items() if not g.same_as(gvar)}
    return tvm.IRModule(funcs, attrs=mod.attrs)


__all__ = ["LANES", "WINDOW", "WindowEll", "WindowEllSpec", "kernel", "pack", "supports", "window_ell_pass"]
