"""Few-channel 3x3 convs as Winograd minimal filters along the columns: F(4, 3) in y.

The pixel-vectorised convs (`tvm_pixel_conv`) run slim models' few-channel layers (ResNet-20 70 %:
5, 10 and 19 channels) near the FMA rate, 9 multiply-adds per output and input channel; the dense
models' convs of 64 or more inputs do 2-4x fewer through 2-D Winograd (`tvm_winograd`). The 2-D
transforms would want the tile's columns in vectors, a stride-m gather along a row; taken along
the columns only (y), every step of Winograd's Y = A^T [(G g) * (B^T d)] is a combination of
whole input or output rows, vectors along x as the pixel conv's:

* `ROW_WINO_INPUT`, V[n, c, e * T + t, x]: position e of row tile t, B^T's combination of the
  alpha = m + 2 input rows under the tile (zero padding through bounds checks, the padding
  columns split off so that the row's vectors carry none).
* the products, a `PIXEL_CONV` stage: M[n, o, e * T + t, x] = sum over c, and the kernel's 3
  columns, of V[n, c, e * T + t, x + column] U[o, c, e, column], U = G g per kernel column
  (numpy, at compile time). It is a 1x3 pixel conv over alpha x T rows, scheduled by the pixel
  conv's register tile: F4's 6 x 3 = 18 products per 4 output rows, against 36 direct.
* `ROW_WINO_OUTPUT`, the NCHW output: output row 4 t + i = A^T row i's combination of M's 6
  rows of tile t, the conv's epilogue (bias, residual add, activation) inlined into it.

The transforms cost about as much per input (output) channel as the products save per channel
pair, so the gain grows with the channels. One thread on the Xeon, conv + BN + ReLU then conv +
BN + residual + ReLU against the direct pixel convs, interleaved: 5 -> 5 at 32x32 batch 8 0.94x
the time, 10 -> 10 at 16x16 0.73x (batch 1 0.82x), 19 -> 19 at 28x28 batch 8 0.77x, at 56x56
batch 1 0.79x. F(2, 3) (12 products per 2 rows) ran 0.94-1.18x on the same layers: its
transforms cost what it saves; the compute takes either, `choose_row_winograd` picks F4.
Whole models: `benchmarks/pass_ablation.py --pass row-winograd --rate 0.7`.

Exactness as `tvm_winograd`'s (its matrices), in one dimension: errors 1-2e-7 relative to the
output's largest value on those layers.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from rwdeploy.runtime.tvm_loops import vector_pieces
from rwdeploy.runtime.tvm_pixel_conv import PIXEL_CONV, interior_columns, vectorize_padded_copy
from rwdeploy.runtime.tvm_winograd import F2, F4, MinimalFilter, _pick_row

ROW_WINO_INPUT = "rw_row_winograd_input"
ROW_WINO_ROWS = "rw_row_winograd_rows"   # folded: the transformed rows, before their taps' copies
ROW_WINO_OUTPUT = "rw_row_winograd_output"


def choose_row_winograd(kernel: tuple[int, int], strides: tuple[int, ...], dilation: tuple[int, ...],
                        out_height: int, out_width: int, lanes: int, flat: bool) -> MinimalFilter | None:
    """The filter a pixel-vectorised conv goes row-Winograd with, or None: 3x3, stride 1,
    undilated, an output height of whole tiles of 4 rows: F4 (F2, 12 products per 2 rows, ran
    0.94-1.18x the direct pixel conv's time where F4 ran 0.73-0.94x: its transforms cost as
    much as the products it saves). A conv on the flattened map (`uses_flat_map`: rows shorter
    than a vector) goes folded (`conv2d_nchw_row_winograd`), where its row tiles side by side
    fill whole vectors (an 8x8 map: 2 tiles x 8 columns). Also with AVX2 (8 lanes; slim ResNet-20
    70 % on Zen 3: 0.82-0.83x the time of its direct pixel convs at batch 1 and 8), not NEON
    (unmeasured)."""
    if (tuple(kernel) != (3, 3) or tuple(strides) != (1, 1) or tuple(dilation) != (1, 1)
            or lanes < 8 or not _vectorizable(out_width, lanes) or out_height % F4.m):
        return None
    if flat and (out_height // F4.m) * out_width % lanes:
        return None
    return F4


def _vectorizable(width: int, lanes: int) -> bool:
    """Whether the output stage's rows split into whole vectors and power-of-two pieces of at
    least 4 (28 = 16 + 8 + 4)."""
    rest = width % lanes
    return width >= 4 and (rest == 0 or rest % 4 == 0)


def transform_row_weight(weight_oihw: np.ndarray, f: MinimalFilter) -> np.ndarray:
    """(CO, CI, 3, 3) -> U (CO, CI, alpha, 3): each kernel column transformed by G."""
    g = np.array(f.filter_rows, np.float64)
    u = np.einsum("ek,ockw->ocew", g, weight_oihw.astype(np.float64))
    return np.ascontiguousarray(u.astype(np.float32))


def conv2d_nchw_row_winograd(data: Any, packed: Any, padding: tuple[int, int, int, int], row: int,
                             channels: int, m: int, folded: bool = False) -> Any:
    """NCHW 3x3 stride-1 conv of `data` with a `transform_row_weight`-packed weight whose first
    `channels` filters are the layer's; its rows computed `row` wide (whole vectors), the output
    cut to the layer's channels and width in the output stage.

    `folded` (maps whose rows are shorter than a vector): the products' vectors run over the
    row tiles side by side, M[n, o, e, t * W + x], W the output width, so that an 8x8 map's 2
    tiles x 8 columns fill one 16-lane vector. A column tap would then cross from one tile's row
    into the next, so the transformed rows (`ROW_WINO_ROWS`, [n, c, e, t, padded x]) are copied
    once per column tap, V[n, c, e, rw, t, x] (as the flat direct conv copies its input), and a
    product is V[.., rw, ..] x U[o, c, e, rw] with no shift: 6 x 3 products per 4 rows of 2
    tiles, against the flat direct conv's 9 x 4. (Transforming each tap's shifted input instead
    cost three transforms, of rows split into 4-, 2- and 1-wide pieces: a third of the kernel.)"""
    from tvm import te, tirx

    f = {2: F2, 4: F4}[m]
    alpha = f.alpha
    n, ci, h, w = (int(v) for v in data.shape)
    computed = int(packed.shape[0])
    top, left, bottom, right = padding
    out_h, out_w = h + top + bottom - 2, w + left + right - 2
    row_tiles = out_h // m
    columns = row + 2

    def read(i: Any, c: Any, y: Any, x: Any) -> Any:
        inside = tirx.all(y >= top, y < h + top, x >= left, x < w + left)
        return tirx.if_then_else(inside, data[i, c, y - top, x - left], tirx.const(0.0, data.dtype))

    rc, rw = te.reduce_axis((0, ci), "rc"), te.reduce_axis((0, 3), "rw")
    if folded:
        rows = te.compute((n, ci, alpha, row_tiles, out_w + 2),
                          lambda i, c, e, t, x: _pick_row(f.input_rows, e, lambda k: read(i, c, t * m + k, x)),
                          name=ROW_WINO_ROWS)
        v = te.compute((n, ci, alpha, 3, row_tiles, out_w), lambda i, c, e, tap, t, x: rows[i, c, e, t, x + tap],
                       name=ROW_WINO_INPUT)
        gemm = te.compute((n, computed, alpha, row_tiles * out_w),
                          lambda i, o, e, p: te.sum(v[i, rc, e, rw, p // out_w, p % out_w] * packed[o, rc, e, rw],
                                                    axis=[rc, rw]),
                          name=PIXEL_CONV)
        return te.compute((n, channels, out_h, out_w),
                          lambda i, o, y, x: _pick_row(f.output_rows, y % m,
                                                       lambda e: gemm[i, o, e, y // m * out_w + x]),
                          name=ROW_WINO_OUTPUT)
    v = te.compute((n, ci, alpha * row_tiles, columns),
                   lambda i, c, r, x: _pick_row(f.input_rows, r // row_tiles,
                                                lambda k: read(i, c, r % row_tiles * m + k, x)),
                   name=ROW_WINO_INPUT)
    gemm = te.compute((n, computed, alpha * row_tiles, row),
                      lambda i, o, r, x: te.sum(v[i, rc, r, x + rw] * packed[o, rc, r // row_tiles, rw],
                                                axis=[rc, rw]),
                      name=PIXEL_CONV)
    return te.compute((n, channels, out_h, out_w),
                      lambda i, o, y, x: _pick_row(f.output_rows, y % m,
                                                   lambda e: gemm[i, o, e * row_tiles + y // m, x]),
                      name=ROW_WINO_OUTPUT)


def schedule_row_winograd_input(sch: Any, block: Any, lanes: int) -> None:
    """A row tile's alpha positions per step, unrolled (their row selects fold), the padded
    row in vectors; images x channels parallel. Folded ([n, c, e, rw, t, x]): e unrolled, each
    column tap's interior in vectors (`vectorize_padded_copy`)."""
    loops = sch.get_loops(block)
    if len(loops) == 6:   # folded: the taps' copies, their transformed rows computed per image x channel
        images_channels = sch.fuse(loops[0], loops[1])
        sch.parallel(images_channels)
        for loop in loops[3:5]:   # the taps x row tiles: whole-row copies, unrolled
            sch.unroll(loop)
        _vectorize_row(sch, loops[-1], lanes)
        rows = sch.get_producers(block)[0]
        row_loops = sch.get_loops(rows)
        sch.unroll(row_loops[2])
        vectorize_padded_copy(sch, rows, lanes)
        sch.parallel(sch.fuse(row_loops[0], row_loops[1]))
        return
    columns = interior_columns(sch, block)
    i, c, r, x = loops
    e, t = sch.split(r, [None, _row_tiling(sch)[0]])
    sch.reorder(i, c, t, e, x)
    sch.parallel(sch.fuse(i, c))
    sch.unroll(e)
    # the padding columns apart, so that the row's vectors carry no bounds check (a vectorised
    # select of guarded loads is scalarised)
    extent = int(sch.get(x).extent)
    start, stop = columns or (0, extent)
    factors = [f for f in (start, stop - start) if f] + ([None] if stop < extent else [])
    parts = sch.loop_partition(x, factors) if len(factors) > 1 else [x]
    # one vector type for the whole row (a loop not starting at 0 cannot be split further):
    # LLVM splits a 32-lane vector in two registers
    sch.vectorize(parts[1] if start else parts[0])


def schedule_row_winograd_output(sch: Any, lanes: int) -> None:
    """The output stage (its epilogue already inlined): a row tile's m output rows per step,
    unrolled (they share M's rows), the row in vectors; images x channels parallel."""
    i, o, y, x = sch.get_loops(sch.get_sblock(ROW_WINO_OUTPUT))
    _, k = sch.split(y, [None, _row_tiling(sch)[1]])
    sch.parallel(sch.fuse(i, o))
    sch.unroll(k)
    _vectorize_row(sch, x, lanes)


def _row_tiling(sch: Any) -> tuple[int, int]:
    """(T, m) of the row-Winograd stages of `sch`: M has (m + 2) T rows, the output m T; folded,
    M has m + 2 rows (fewer than the output's m T + 2 where T > 1)."""
    out = sch.get(sch.get_sblock(ROW_WINO_OUTPUT))
    out_h = int(out.iter_vars[2].dom.extent)
    rows = next(int(r.source.ty.shape[2]) for r in out.reads if r.source.name == PIXEL_CONV)
    row_tiles = (rows - out_h) // 2 if rows >= out_h + 2 else out_h // (rows - 2)
    return row_tiles, out_h // row_tiles


def _vectorize_row(sch: Any, loop: Any, lanes: int) -> None:
    """Whole vectors of `lanes`, then power-of-two pieces of the rest (28 = 16 + 8 + 4): an
    odd-width LLVM vector would be split into masked pieces."""
    parts = vector_pieces(int(sch.get(loop).extent), lanes)
    pieces = sch.loop_partition(loop, parts[:-1] + [None]) if len(parts) > 1 else [loop]
    for piece, size in zip(pieces, parts):
        width = min(size, lanes)
        if width > 1:
            sch.vectorize(sch.split(piece, [None, width])[-1] if size > width else piece)


__all__ = ["ROW_WINO_INPUT", "ROW_WINO_OUTPUT", "choose_row_winograd", "conv2d_nchw_row_winograd",
           "schedule_row_winograd_input", "schedule_row_winograd_output", "transform_row_weight"]
