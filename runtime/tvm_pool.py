"""Max pooling on channel-major (NCHW) tensors, lowered as two passes LLVM vectorises.

Packed (sparse) builds keep activations channel-major between their kernels, so a ResNet's
stem max pool (3x3, stride 2, pad 1, 64 x 112 x 112) runs on NCHW. TVM's default lowering
copies the input into a padded buffer (-inf borders, one scalar select per element) and then
takes each output as a reduction over its window: `ScheduleCPU` sees the output width as the
innermost axis and vectorises it, and every vector load is then a stride-2 gather. ResNet-18's
stem pool took 0.68 ms there, more than the sparse conv before it.

Max pooling is separable: the max over a KH x KW window is the max over KW columns of the
max over KH rows. Here

1. `rows[n, c, oh, x]` is the max over the window's rows, for every input column x. Rows
   outside the input are skipped by clamping the row index into it: a clamped row repeats a
   row that is in the window anyway, and max is idempotent, so the result is exact as long as
   every window holds at least one real row (padding < kernel, which the op requires). The
   inner loop over x is contiguous.
2. `out[n, c, oh, ow]` is the max over the window's columns of `rows`, read at a constant
   stride, which LLVM's loop vectoriser turns into whole-vector loads and shuffles. Columns
   outside the input are, again, clamped into it, but only in the few leftmost and rightmost
   outputs whose window reaches the border: the interior is a separate loop without them.

Neither stage is a reduction block; `schedule_max_pool` computes the row pass per output row,
inside the column pass's loop over rows, so the intermediate is one row (in L1) rather than a
second tensor half the input's size streamed through memory (0.24 ms -> see the benchmark).
"""
from __future__ import annotations

from typing import Any, Callable


ROWS, COLS = "rw_pool_rows", "rw_pool_cols"


def schedule_max_pool(func: Any) -> Any | None:
    """`func` with the row pass computed per output row of the column pass (the channel loop
    parallel), or None when `func` is not `max_pool2d_nchw` (with an elementwise epilogue
    inlined, where there is one)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    if names[:2] != [ROWS, COLS]:
        return None
    cols = sch.get_sblock(COLS)
    for name in names[2:]:  # e.g. a ReLU fused after the pool
        try:
            sch.reverse_compute_inline(sch.get_sblock(name))
        except Exception:  # noqa: BLE001 - not elementwise: it stays its own loop nest
            return None
    n, c, y, _ = sch.get_loops(cols)
    sch.compute_at(sch.get_sblock(ROWS), y)
    sch.parallel(sch.fuse(n, c))
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _out_size(size: int, kernel: int, stride: int, before: int, after: int) -> int:
    return (size + before + after - kernel) // stride + 1


def max_pool2d_nchw(data: Any, kernel: tuple[int, int], stride: tuple[int, int],
                    padding: tuple[int, int, int, int]) -> Any:
    """Max pooling of an NCHW tensor (dilation 1, floor mode) as a row pass and a column pass."""
    from tvm import te, tirx

    n, c, h, w = (int(v) for v in data.shape)
    (kh, kw), (sh, sw), (top, left, bottom, right) = kernel, stride, padding
    oh = _out_size(h, kh, sh, top, bottom)
    ow = _out_size(w, kw, sw, left, right)

    def clamp(index: Any, size: int) -> Any:
        return tirx.max(tirx.min(index, size - 1), 0)

    def row_max(i: Any, ch: Any, y: Any, x: Any) -> Any:
        first = y * sh - top
        value = data[i, ch, clamp(first, h), x]
        for r in range(1, kh):
            value = tirx.max(value, data[i, ch, clamp(first + r, h), x])
        return value

    rows = te.compute((n, c, oh, w), row_max, name=ROWS)

    # Outputs whose window lies inside the input's columns: [lo, hi).
    lo = min(ow, -(-left // sw))
    hi = max(lo, min(ow, (w - kw + left) // sw + 1))

    def col_max(i: Any, ch: Any, y: Any, x: Any) -> Any:
        first = x * sw - left
        inside = rows[i, ch, y, first]
        clamped = rows[i, ch, y, clamp(first, w)]
        for s in range(1, kw):
            inside = tirx.max(inside, rows[i, ch, y, first + s])
            clamped = tirx.max(clamped, rows[i, ch, y, clamp(first + s, w)])
        if lo == 0 and hi == ow:
            return inside
        return tirx.if_then_else(tirx.all(x >= lo, x < hi), inside, clamped)

    return te.compute((n, c, oh, ow), col_max, name=COLS)


def max_pool2d_legalizer() -> Callable[[Any, Any], Any]:
    """`relax.nn.max_pool2d` on NCHW float32 (dilation 1, floor mode) -> `max_pool2d_nchw`,
    anything else -> TVM's default."""
    from tvm.relax.transform.legalize_ops import nn as default_nn

    from rwdeploy.runtime.tvm_fold import static_shape

    def legalize(bb: Any, call: Any) -> Any:
        attrs = call.attrs
        data = call.args[0]
        shape = static_shape(data)
        padding = tuple(int(v) for v in attrs.padding)
        if len(padding) == 2:
            padding = (*padding, *padding)
        kernel = tuple(int(v) for v in attrs.pool_size)
        if (shape is None or len(shape) != 4 or attrs.layout != "NCHW" or attrs.out_layout != "NCHW"
                or getattr(data.ty, "dtype", None) != "float32" or bool(attrs.ceil_mode)
                or any(int(d) != 1 for d in attrs.dilation)
                or padding[0] >= kernel[0] or padding[2] >= kernel[0]
                or padding[1] >= kernel[1] or padding[3] >= kernel[1]):
            return default_nn._nn_max_pool2d(bb, call)
        stride = tuple(int(v) for v in attrs.strides)
        return bb.call_te(max_pool2d_nchw, data, kernel, stride, padding, primfunc_name_hint="max_pool2d")

    return legalize
