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
The row pass's loop over x is vectorised explicitly: left to LLVM, its clamped row indices got
it 4-lane code at best, and a slim model's small maps spent more in the pool than in the conv
before it (slim LeNet-5 70 % at batch 8, 6 x 24 x 24 per image: 5.6 us against the conv's
10.2). Vectorised, on the Xeon at 1 thread: that pool 1.1 us, 1 x 19 x 32 x 32 (slim
VGG-16-BN) 3.4 -> 0.7 us, a 3x3 stride-2 stem pool on 64 x 56 x 56 24 -> 10 us; the column
pass's stride-2 reads stay with LLVM's vectoriser (vectorising them too was no faster).

Channel-last (NHWC) pooling, what a dense build runs after its NHWC convolutions, needs no
separable form: channels are innermost, so every tap is a whole-vector load. TVM's default
lowering copied the input into a -inf-padded buffer first, one scalar select per element
(dense ResNet-18's stem pool at 224x224: 0.52 ms against ONNX Runtime's 0.17). `max_pool2d_nhwc`
reads the input directly: windows inside the input take their taps as they are, the few at a
border clamp their row and column indices into the input (exact, as above).
"""
from __future__ import annotations

from typing import Any, Callable

from rwdeploy.runtime.tvm_loops import largest_divisor


ROWS, COLS = "rw_pool_rows", "rw_pool_cols"
CHANNEL_LAST = "rw_pool_nhwc"


def schedule_max_pool(func: Any, lanes: int = 16) -> Any | None:
    """`func` with the row pass computed per output row of the column pass (the channel loop
    parallel, the row pass in vectors), or `max_pool2d_nhwc` with its rows parallel and
    channels in vectors of `lanes`; None when `func` is neither (with an elementwise epilogue
    inlined, where there is one)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    stages = [CHANNEL_LAST] if names[:1] == [CHANNEL_LAST] else [ROWS, COLS]
    if names[:len(stages)] != stages or not _inline_epilogue(sch, names[len(stages):]):
        return None
    if stages == [CHANNEL_LAST]:
        return _schedule_channel_last(sch, lanes)
    n, c, y, _ = sch.get_loops(sch.get_sblock(COLS))
    sch.compute_at(sch.get_sblock(ROWS), y)
    sch.parallel(sch.fuse(n, c))
    vectorize_row_pass(sch, lanes)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def vectorize_row_pass(sch: Any, lanes: int) -> bool:
    """The row pass's loop over x in vectors of a few registers' worth, split without a
    remainder (a 24-wide row one vector, a 130-wide one 5 of 26); True when done."""
    row = sch.get_loops(sch.get_sblock(ROWS))[-1]
    sch.vectorize(sch.split(row, [None, largest_divisor(int(sch.get(row).extent), 4 * lanes)])[1])
    return True


def _inline_epilogue(sch: Any, names: list[str]) -> bool:
    """Inline the stages after the pool (e.g. a fused ReLU); False where one is not elementwise."""
    for name in names:
        try:
            sch.reverse_compute_inline(sch.get_sblock(name))
        except Exception:  # noqa: BLE001 - not elementwise: leave the function to the default
            return False
    return True


def _schedule_channel_last(sch: Any, lanes: int) -> Any:
    n, y, _, c = sch.get_loops(sch.get_sblock(CHANNEL_LAST))
    sch.parallel(sch.fuse(n, y))
    channels = int(sch.get(c).extent)
    width = next((w for w in (lanes, lanes // 2, lanes // 4) if w > 1 and channels % w == 0), channels)
    sch.vectorize(sch.split(c, [None, width])[-1] if channels > width else c)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def max_pool2d_nhwc(data: Any, kernel: tuple[int, int], stride: tuple[int, int],
                    padding: tuple[int, int, int, int]) -> Any:
    """Max pooling of an NHWC tensor (dilation 1, floor mode), the input read in place."""
    from tvm import te, tirx

    n, h, w, c = (int(v) for v in data.shape)
    (kh, kw), (sh, sw), (top, left, _, _) = kernel, stride, padding
    oh, ow = _out_hw(h, w, kernel, stride, padding)
    (y_lo, y_hi), (x_lo, x_hi) = _inside(oh, h, kh, sh, top), _inside(ow, w, kw, sw, left)
    clamp = _clamp

    def window_max(i: Any, y: Any, x: Any, ch: Any) -> Any:
        row, col = y * sh - top, x * sw - left
        inside = clamped = None
        for r in range(kh):
            for s in range(kw):
                a = data[i, row + r, col + s, ch]
                b = data[i, clamp(row + r, h), clamp(col + s, w), ch]
                inside = a if inside is None else tirx.max(inside, a)
                clamped = b if clamped is None else tirx.max(clamped, b)
        if y_lo == 0 and x_lo == 0 and y_hi == oh and x_hi == ow:
            return inside
        return tirx.if_then_else(tirx.all(y >= y_lo, y < y_hi, x >= x_lo, x < x_hi), inside, clamped)

    return te.compute((n, oh, ow, c), window_max, name=CHANNEL_LAST)


def _out_hw(h: int, w: int, kernel: tuple[int, int], stride: tuple[int, int],
            padding: tuple[int, int, int, int]) -> tuple[int, int]:
    (kh, kw), (sh, sw), (top, left, bottom, right) = kernel, stride, padding
    return (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1


def _inside(out: int, size: int, kernel: int, stride: int, before: int) -> tuple[int, int]:
    """The outputs [lo, hi) along an axis whose window lies inside the input."""
    lo = min(out, -(-before // stride))
    return lo, max(lo, min(out, (size - kernel + before) // stride + 1))


def _clamp(index: Any, size: int) -> Any:
    from tvm import tirx

    return tirx.max(tirx.min(index, size - 1), 0)


def max_pool2d_nchw(data: Any, kernel: tuple[int, int], stride: tuple[int, int],
                    padding: tuple[int, int, int, int]) -> Any:
    """Max pooling of an NCHW tensor (dilation 1, floor mode) as a row pass and a column pass."""
    from tvm import te, tirx

    n, c, h, w = (int(v) for v in data.shape)
    (kh, kw), (sh, sw), (top, left, _, _) = kernel, stride, padding
    oh, ow = _out_hw(h, w, kernel, stride, padding)
    clamp = _clamp

    def row_max(i: Any, ch: Any, y: Any, x: Any) -> Any:
        first = y * sh - top
        value = data[i, ch, clamp(first, h), x]
        for r in range(1, kh):
            value = tirx.max(value, data[i, ch, clamp(first + r, h), x])
        return value

    rows = te.compute((n, c, oh, w), row_max, name=ROWS)

    lo, hi = _inside(ow, w, kw, sw, left)  # outputs whose window lies inside the input's columns

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
    """`relax.nn.max_pool2d` on NCHW / NHWC float32 (dilation 1, floor mode) ->
    `max_pool2d_nchw` / `max_pool2d_nhwc`, anything else -> TVM's default."""
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
        layout = str(attrs.layout)
        if (shape is None or len(shape) != 4 or layout not in ("NCHW", "NHWC") or str(attrs.out_layout) != layout
                or getattr(data.ty, "dtype", None) != "float32" or bool(attrs.ceil_mode)
                or any(int(d) != 1 for d in attrs.dilation)
                or padding[0] >= kernel[0] or padding[2] >= kernel[0]
                or padding[1] >= kernel[1] or padding[3] >= kernel[1]):
            return default_nn._nn_max_pool2d(bb, call)
        stride = tuple(int(v) for v in attrs.strides)
        lower = max_pool2d_nchw if layout == "NCHW" else max_pool2d_nhwc
        return bb.call_te(lower, data, kernel, stride, padding, primfunc_name_hint="max_pool2d")

    return legalize
