"""3x3 stride-1 convolutions as Winograd F(2x2, 3x3): 16 multiplies per 2x2 outputs, not 36.

A 3x3 conv with C_in inputs computes each 2x2 block of outputs from the 4x4 input tile under it.
Winograd's minimal filtering (Lavin & Gray, 2016) writes that as Y = A^T [(G g G^T) * (B^T d B)] A:
the filter g transformed once (at compile time here: the weights are constants) into a 4x4
`U`, each input tile d into a 4x4 `V` by additions only, their products summed over the input
channels, and the 4x4 result folded back into 2x2 outputs by additions only. The products are 16
batched matrix products, one per position of the 4x4 tile: M[e] = V[e] @ U[e], (tiles x C_in)
by (C_in x C_out): 16 / 36 of the direct conv's multiply-adds, in the GEMM shape the register
tiles of `tvm_schedule` already run at full rate.

Stages of the compute (`conv2d_nhwc_winograd`), all in one kernel:
* `WINO_INPUT`, V[e, tile, c]: each element four loads and three adds of the input (its zero
  padding read through bounds checks, no padded copy). Scheduled one tile at a time, the 16
  positions unrolled and the channels in vectors (`schedule_winograd_input`).
* `WINO_GEMM`, M[e, tile, o] = sum_c V[e, tile, c] U[e, o // T, c, o % T]: `schedule_reduction`'s
  register tile over the (e, tile) "pixels" and output channels, `U` packed in the tile's
  channel blocks as a conv's weights are (`tvm_legalize`).
* `WINO_OUTPUT`, the NHWC output from nine M values per element, the conv's fused epilogue
  (bias, residual add, activation) inlined into it, 2x2 outputs per step and channels in
  vectors (`schedule_winograd_output`).

Exactness: the transforms' coefficients are 0, +-1 and +-1/2, so the result differs from the
direct conv by float rounding only (relative 1e-6 on the tests' layers; the tests' tolerance
is 1e-4). Odd output sizes (7x7) compute the last tile's extra row and column and drop them.

Which convs (`uses_winograd`): 3x3, stride 1, no dilation, groups 1, at least `MIN_INPUTS`
input channels, on 512-bit vector cores (where it was measured). One thread on the Xeon, a
3x3 conv + ReLU against the direct register-tiled conv, interleaved: 64 -> 64 at 28x28 batch 8
0.87x the time, 128 -> 128 at 14x14 0.62-0.66x, 512 -> 512 at 4x4 batch 8 0.55x before the
transforms were scheduled; 32 -> 32 at 16x16 1.03x and 16 -> 16 at 32x32 2.2x (too few inputs
to pay for the transforms): hence the floor.
"""
from __future__ import annotations

from typing import Any

import numpy as np

WINO_INPUT = "rw_winograd_input"
WINO_GEMM = "rw_winograd_gemm"
WINO_OUTPUT = "rw_winograd_output"
POSITIONS = 16          # the 4x4 transformed tile
MIN_INPUTS = 64         # input channels below which the transforms cost more than they save
STREAMED_BYTES = 2 << 20    # a transformed weight over this (the L2) is read from memory per call
MIN_SHARED_TILES = 8        # tiles that amortise such a weight (512 -> 512 at 4x4, batch 2: 0.68x)

# F(2x2, 3x3): G (4x3) transforms a filter; B^T's row k is d[a(k)] + s(k) d[b(k)]; A^T's row r
# sums M[r], M[r+1], M[r+2] with signs (1, 1, 1) for r = 0 and (1, -1, -1) for r = 1.
_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
_B_FIRST = (0, 1, 2, 1)
_B_SECOND = (2, 2, 1, 3)
_B_SIGN = (-1.0, 1.0, -1.0, -1.0)


def uses_winograd(weight_shape: tuple[int, ...], strides: tuple[int, ...], dilation: tuple[int, ...],
                  groups: int, lanes: int, output_tiles: int) -> bool:
    """Whether a conv with this HWIO weight and `output_tiles` 2x2 tiles (`tiles`) goes
    Winograd (see the module docstring). Not where the transformed weight (16/9 of the
    weight's bytes) streams from memory and few tiles share it: 512 -> 512 at 4x4, batch 1
    (4 tiles, 16 MB of U) ran 1.08x the direct conv's time, at 2x2 1.74x."""
    kh, kw, ci, co = weight_shape
    streamed = POSITIONS * ci * co * 4 > STREAMED_BYTES
    return ((kh, kw) == (3, 3) and tuple(strides) == (1, 1) and tuple(dilation) == (1, 1)
            and groups == 1 and ci >= MIN_INPUTS and lanes >= 16
            and (output_tiles >= MIN_SHARED_TILES or not streamed))


def transform_weight(weight_hwio: np.ndarray, tile: int) -> np.ndarray:
    """(3, 3, CI, CO) -> U packed as (16, CO/tile, CI, tile): U[e = 4 eps + nu] = (G g G^T)[eps, nu]."""
    _, _, ci, co = weight_hwio.shape
    u = np.einsum("ai,ijco,bj->abco", _G, weight_hwio.astype(np.float64), _G)
    u = u.reshape(POSITIONS, ci, co // tile, tile).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(u.astype(np.float32))


def tiles(batch: int, out_h: int, out_w: int) -> int:
    """2x2 output tiles of all images: the GEMM's rows."""
    return batch * -(-out_h // 2) * -(-out_w // 2)


def conv2d_nhwc_winograd(data: Any, packed: Any, padding: tuple[int, int, int, int]) -> Any:
    """NHWC 3x3 stride-1 conv of `data` with a `transform_weight`-packed weight; NHWC output."""
    from tvm import te, tirx

    n, h, w, c = (int(v) for v in data.shape)
    _, co_tiles, ci, tile = (int(v) for v in packed.shape)
    top, left, bottom, right = padding
    out_h, out_w = h + top + bottom - 2, w + left + right - 2
    tiles_h, tiles_w = -(-out_h // 2), -(-out_w // 2)
    per_image = tiles_h * tiles_w

    def pick(table: tuple[Any, ...], k: Any) -> Any:
        value = table[-1]
        for i in range(len(table) - 2, -1, -1):
            value = tirx.Select(k == i, table[i], value)
        return value

    def sign(k: Any) -> Any:
        return pick(tuple(tirx.const(s, "float32") for s in _B_SIGN), k)

    def read(b: Any, y: Any, x: Any, ch: Any) -> Any:
        inside = tirx.all(y >= top, y < h + top, x >= left, x < w + left)
        return tirx.if_then_else(inside, data[b, y - top, x - left, ch], tirx.const(0.0, "float32"))

    def transformed_input(e: Any, p: Any, ch: Any) -> Any:
        eps, nu = e // 4, e % 4
        b, rest = p // per_image, p % per_image
        y0, x0 = rest // tiles_w * 2, rest % tiles_w * 2
        ya, yb, xa, xb = (y0 + pick(_B_FIRST, eps), y0 + pick(_B_SECOND, eps),
                          x0 + pick(_B_FIRST, nu), x0 + pick(_B_SECOND, nu))
        return (read(b, ya, xa, ch) + sign(nu) * read(b, ya, xb, ch)
                + sign(eps) * (read(b, yb, xa, ch) + sign(nu) * read(b, yb, xb, ch)))

    v = te.compute((POSITIONS, n * per_image, c), transformed_input, name=WINO_INPUT)
    rc = te.reduce_axis((0, ci), "rc")
    m = te.compute((POSITIONS, n * per_image, co_tiles * tile),
                   lambda e, p, o: te.sum(v[e, p, rc] * packed[e, o // tile, rc, o % tile], axis=rc),
                   name=WINO_GEMM)

    def output(b: Any, y: Any, x: Any, o: Any) -> Any:
        r, q = y % 2, x % 2
        p = b * per_image + y // 2 * tiles_w + x // 2
        minus_r = tirx.Select(r == 0, tirx.const(1.0, "float32"), tirx.const(-1.0, "float32"))
        minus_q = tirx.Select(q == 0, tirx.const(1.0, "float32"), tirx.const(-1.0, "float32"))

        def row(k: int) -> Any:
            terms = [m[(r + k) * 4 + q + l, p, o] for l in range(3)]
            return terms[0] + minus_q * (terms[1] + terms[2])

        return row(0) + minus_r * (row(1) + row(2))

    return te.compute((n, out_h, out_w, co_tiles * tile), output, name=WINO_OUTPUT)


def schedule_winograd_input(sch: Any, block: Any, lanes: int) -> None:
    """One 2x2 output tile's 16 transformed positions per step, unrolled (their index
    arithmetic folds to constants), the channels in vectors; tiles parallel."""
    e, p, c = sch.get_loops(block)
    sch.reorder(p, e, c)
    sch.parallel(p)
    sch.unroll(e)
    _vectorize_channels(sch, c, lanes)


def schedule_winograd_output(sch: Any, lanes: int) -> None:
    """The output stage (its epilogue inlined first): 2x2 outputs of one tile per step, unrolled
    over a vector of channels (the nine-term sums share their loads); rows of tiles parallel."""
    block = sch.get_sblock(WINO_OUTPUT)
    for _ in range(16):  # bias, residual add, activation: each an elementwise consumer
        consumers = sch.get_consumers(block)
        if len(consumers) != 1:
            break
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:  # not elementwise (a reshape): stays its own loop nest
            break
    n, y, x, c = sch.get_loops(block)
    ty, ry = sch.split(y, [None, 2])
    tx, rx = sch.split(x, [None, 2])
    channels = int(sch.get(c).extent)
    width = lanes if channels % lanes == 0 else channels
    co, ci = sch.split(c, [None, width])
    sch.reorder(n, ty, tx, co, ry, rx, ci)
    sch.parallel(sch.fuse(n, ty))
    sch.unroll(ry)
    sch.unroll(rx)
    if width > 1 and width & (width - 1) == 0:
        sch.vectorize(ci)


def _vectorize_channels(sch: Any, loop: Any, lanes: int) -> None:
    channels = int(sch.get(loop).extent)
    if channels % lanes == 0:
        sch.vectorize(sch.split(loop, [None, lanes])[-1] if channels > lanes else loop)
    elif channels & (channels - 1) == 0:
        sch.vectorize(loop)


def gemm_rows(batch: int, out_h: int, out_w: int) -> list[int]:
    """The GEMM stage's "pixel" extents as `tvm_schedule.register_tile` sees them."""
    return [POSITIONS, tiles(batch, out_h, out_w)]


__all__ = ["WINO_GEMM", "WINO_INPUT", "WINO_OUTPUT", "conv2d_nhwc_winograd", "gemm_rows",
           "schedule_winograd_input", "schedule_winograd_output", "transform_weight", "uses_winograd"]
