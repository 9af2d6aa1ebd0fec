"""3x3 stride-1 convolutions as Winograd minimal filters: F(2x2, 3x3) and F(4x4, 3x3).

A 3x3 conv with C_in inputs computes each m x m block of outputs from the (m + 2)^2 input tile
under it. Winograd's minimal filtering (Lavin & Gray, 2016) writes that as
Y = A^T [(G g G^T) * (B^T d B)] A: the filter g transformed once (at compile time here: the
weights are constants) into an alpha x alpha `U` (alpha = m + 2), each input tile d into `V` by
a few additions, their products summed over the input channels, and the result folded back into
m x m outputs. The products are alpha^2 batched matrix products, one per position of the tile:
M[e] = V[e] @ U[e], (tiles x C_in) by (C_in x C_out), in the GEMM shape the register tiles of
`tvm_schedule` already run at full rate: 16 products per 4 outputs (F2) or 36 per 16 (F4)
against the direct conv's 9 per output.

Stages of the compute (`conv2d_nhwc_winograd`), all in one kernel:
* `WINO_INPUT`, V[e, tile, c]: the input tile's rows then columns combined by B^T's nonzero
  coefficients (the zero padding read through bounds checks, no padded copy). Scheduled one
  tile at a time, its positions unrolled (each row of B^T is picked by a chain of selects on
  the position, which folds once it is a constant) and the channels in vectors.
* `WINO_GEMM`, M[e, tile, o] = sum_c V[e, tile, c] U[e, o // T, c, o % T]: `schedule_reduction`'s
  register tile over the (e, tile) "pixels" and output channels, `U` packed in the tile's
  channel blocks as a conv's weights are (`tvm_legalize`).
* `WINO_OUTPUT`, the NHWC output from A^T's combinations of M, the conv's fused epilogue (bias,
  residual add, activation) inlined into it, a tile's m x m outputs per step unrolled and the
  channels in vectors.

Exactness: the result differs from the direct conv's by float rounding only: F2's coefficients
are 0, +-1 and +-1/2; F4's (interpolation points 0, +-1, +-2) reach 8 and 1/24, and its layers
were 2-9e-6 off relative to the output's largest value (F2: 2-7e-7; the tests' tolerance is
1e-4). Odd output sizes compute the last tiles' extra rows and columns and drop them.

Which convs (`choose_winograd`): 3x3, stride 1, no dilation, groups 1, at least `MIN_INPUTS`
input channels, on cores with 256-bit vectors or wider (`MIN_LANES`); then the cheapest of direct,
F2 and F4 by `layer_cost` (products per tile row, and the transformed weight's bytes, 16/9 or 4x
the direct conv's). One thread on the Xeon, a 3x3 conv + BN + ReLU against the direct
register-tiled conv, interleaved: 64 -> 64 at 28x28 batch 8 F2 0.73x the time, F4 0.52x;
256 -> 256 at 7x7 batch 8 F2 0.74x, F4 0.51x; at batch 1 F2 0.93x, F4 0.96x; 512 -> 512 at 4x4
batch 1 F2 1.08x (direct kept); 32 -> 32 at 16x16 batch 8 F2 0.82x, F4 0.62x; 48 at 16x16 batch
8 F4 0.57x. The floor of `MIN_INPUTS` = 16 inputs is from whole models, each pair interleaved
(floor 16 against 64): dense ResNet-20 0.78x the time at batch 1, 0.84x at batch 8; slim
ResNet-56 50 % 0.83x at batch 1; slim VGG-16-BN 70 % 0.98x at batch 8 (32: 0.96x); with 32
instead of 64, slim ResNet-18 70 % (38 inputs) 0.95x at batch 1 and 8. Fewer inputs run
pixel-vectorised where they are few enough to matter (`tvm_row_winograd` then). The transforms'
channels go in vectors of 16 and one of the rest (38 = 32 + 6): scalar before for counts no
vector divides, which slim models have (slim ResNet-18 70 %: 0.97-0.98x the time vectorised).
Whole models: `benchmarks/pass_ablation.py --pass winograd`. On a Zen 3 core (AVX2, 8 lanes, 16
registers), where it was first enabled, dense ResNet-20 ran 0.81x the time at batch 1 and 0.79x at
batch 8, dense VGG-16-BN 0.78x / 0.70x (whole models interleaved); NEON (4 lanes) stays direct,
unmeasured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

WINO_INPUT = "rw_winograd_input"
WINO_GEMM = "rw_winograd_gemm"
WINO_OUTPUT = "rw_winograd_output"
MIN_INPUTS = 16         # input channels a conv needs to go Winograd (see the docstring)
MIN_LANES = 8           # float32 lanes of the widest vector: AVX2 and AVX-512 (see the docstring)
# multiply-adds one weight float read from beyond L2 costs, fitted to whole models on the Xeon
# (F4 vs F2 vs direct per layer, interleaved): dense ResNet-56 at batch 1 (64 -> 64 at 8x8)
# ran 0.88x the direct build's time with F2 and 0.94x with F4, whose 590 KB per layer of U
# costs more than its fewer products save; 512 -> 512 at 4x4, batch 1, F2 1.08x alone
WEIGHT_FLOAT_MACS = 12


@dataclass(frozen=True)
class MinimalFilter:
    """Winograd's F(m x m, 3x3): an (m + 2)^2 input tile, `alpha`^2 products per m x m outputs."""
    m: int
    input_rows: tuple[tuple[float, ...], ...]      # B^T, alpha x alpha
    filter_rows: tuple[tuple[float, ...], ...]     # G, alpha x 3
    output_rows: tuple[tuple[float, ...], ...]     # A^T, m x alpha

    @property
    def alpha(self) -> int:
        return self.m + 2

    @property
    def positions(self) -> int:
        return self.alpha * self.alpha


F2 = MinimalFilter(2, ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
                   ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
                   ((1, 1, 1, 0), (0, 1, -1, -1)))
# interpolation points 0, +-1, +-2 (Lavin & Gray): 36 products per 16 outputs
F4 = MinimalFilter(4, ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
                       (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
                   ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
                    (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)),
                   ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)))


def choose_winograd(weight_shape: tuple[int, ...], strides: tuple[int, ...], dilation: tuple[int, ...],
                    groups: int, lanes: int, out_shape: tuple[int, ...]) -> MinimalFilter | None:
    """The minimal filter a conv with this HWIO weight and NHWC output goes Winograd with, or
    None for the direct conv (see the module docstring): the cheapest by `layer_cost`."""
    kh, kw, ci, _ = weight_shape
    if not ((kh, kw) == (3, 3) and tuple(strides) == (1, 1) and tuple(dilation) == (1, 1)
            and groups == 1 and ci >= MIN_INPUTS and lanes >= MIN_LANES):
        return None
    batch, out_h, out_w = out_shape[:3]
    best: tuple[float, MinimalFilter | None] = (layer_cost(9, batch * out_h * out_w), None)
    for f in (F2, F4):
        cost = layer_cost(f.positions, tiles(f, batch, out_h, out_w))
        if cost < best[0]:
            best = (cost, f)
    return best[1]


def layer_cost(products: int, rows: int) -> float:
    """Time of a conv per input x output channel, in multiply-adds: `products` per output
    (tile) row (9 direct, alpha^2 Winograd) for each of `rows` rows, plus reading each of the
    `products` weights from beyond L2 (`WEIGHT_FLOAT_MACS`): in a whole model a layer's weights
    are not in L2 when it runs, and the transformed ones are 16/9 (F2) or 4x (F4) the bytes."""
    return products * (rows + WEIGHT_FLOAT_MACS)


def transform_weight(weight_hwio: np.ndarray, tile: int, f: MinimalFilter = F2) -> np.ndarray:
    """(3, 3, CI, CO) -> U packed as (alpha^2, CO/tile, CI, tile): U[alpha eps + nu] = (G g G^T)[eps, nu]."""
    _, _, ci, co = weight_hwio.shape
    g = np.array(f.filter_rows, np.float64)
    u = np.einsum("ai,ijco,bj->abco", g, weight_hwio.astype(np.float64), g)
    u = u.reshape(f.positions, ci, co // tile, tile).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(u.astype(np.float32))


def tiles(f: MinimalFilter, batch: int, out_h: int, out_w: int) -> int:
    """m x m output tiles of all images: the GEMM's rows."""
    return batch * -(-out_h // f.m) * -(-out_w // f.m)


def _combine(row: tuple[float, ...], load: Any) -> Any:
    """sum_i row[i] * load(i) over the nonzero coefficients, +-1 as additions."""
    total = None
    for i, coef in enumerate(row):
        if coef == 0:
            continue
        term = load(i)
        if total is None:
            total = term if coef == 1 else term * float(coef)
        elif coef in (1, -1):
            total = total + term if coef == 1 else total - term
        else:
            total = total + term * float(coef)
    return total


def _pick_row(rows: tuple[tuple[float, ...], ...], k: Any, load: Any) -> Any:
    """`_combine` of row k of `rows`, k an expression: a chain of selects, which folds to the
    one row where the schedule unrolls k."""
    from tvm import tirx

    value = _combine(rows[-1], load)
    for i in range(len(rows) - 2, -1, -1):
        value = tirx.Select(k == i, _combine(rows[i], load), value)
    return value


def conv2d_nhwc_winograd(data: Any, packed: Any, padding: tuple[int, int, int, int], m: int = 2) -> Any:
    """NHWC 3x3 stride-1 conv of `data` with a `transform_weight`-packed weight (F(m x m, 3x3),
    `m` 2 or 4); NHWC output."""
    from tvm import te, tirx

    f = {2: F2, 4: F4}[m]
    alpha = f.alpha
    n, h, w, c = (int(v) for v in data.shape)
    _, co_tiles, ci, tile = (int(v) for v in packed.shape)
    top, left, bottom, right = padding
    out_h, out_w = h + top + bottom - 2, w + left + right - 2
    tiles_h, tiles_w = -(-out_h // m), -(-out_w // m)
    per_image = tiles_h * tiles_w

    def read(b: Any, y: Any, x: Any, ch: Any) -> Any:
        inside = tirx.all(y >= top, y < h + top, x >= left, x < w + left)
        return tirx.if_then_else(inside, data[b, y - top, x - left, ch], tirx.const(0.0, "float32"))

    def transformed_input(e: Any, p: Any, ch: Any) -> Any:
        eps, nu = e // alpha, e % alpha
        b, rest = p // per_image, p % per_image
        y0, x0 = rest // tiles_w * m, rest % tiles_w * m
        return _pick_row(f.input_rows, eps, lambda i: _pick_row(
            f.input_rows, nu, lambda j: read(b, y0 + i, x0 + j, ch)))

    v = te.compute((f.positions, n * per_image, c), transformed_input, name=WINO_INPUT)
    rc = te.reduce_axis((0, ci), "rc")
    gemm = te.compute((f.positions, n * per_image, co_tiles * tile),
                      lambda e, p, o: te.sum(v[e, p, rc] * packed[e, o // tile, rc, o % tile], axis=rc),
                      name=WINO_GEMM)

    def output(b: Any, y: Any, x: Any, o: Any) -> Any:
        p = b * per_image + y // m * tiles_w + x // m
        return _pick_row(f.output_rows, y % m, lambda k: _pick_row(
            f.output_rows, x % m, lambda l: gemm[k * alpha + l, p, o]))

    return te.compute((n, out_h, out_w, co_tiles * tile), output, name=WINO_OUTPUT)


def schedule_winograd_input(sch: Any, block: Any, lanes: int) -> None:
    """One tile's alpha^2 transformed positions per step, unrolled (their index arithmetic and
    row selects fold to constants), the channels in vectors; tiles parallel."""
    e, p, c = sch.get_loops(block)
    sch.reorder(p, c, e)
    sch.parallel(p)
    _channel_vectors(sch, c, lanes)


def schedule_winograd_output(sch: Any, lanes: int, m: int) -> None:
    """The output stage (its epilogue already inlined, `tvm_schedule`): the m x m outputs of one
    tile per step, unrolled over a vector of channels (their sums share the loads of M); rows of
    tiles parallel."""
    n, y, x, c = sch.get_loops(sch.get_sblock(WINO_OUTPUT))
    ty, ry = sch.split(y, [None, m])
    tx, rx = sch.split(x, [None, m])
    sch.reorder(n, ty, tx, c, ry, rx)
    sch.parallel(sch.fuse(n, ty))
    _channel_vectors(sch, c, lanes)


def _channel_vectors(sch: Any, channel: Any, lanes: int) -> None:
    """The `channel` loop in vectors of `lanes` (whole ones, then one of the rest), each vector
    carried through the loops below `channel`, which are unrolled: the positions of a tile (an
    input tile's loads, or M's, are shared by all of them). Partitioned where no vector divides
    the channels (77 = 64 + 13): one loop with a `channel < 77` predicate is scalarised, and
    these stages had run scalar for such counts (a lone 77-channel layer then 1.12x the time)."""
    channels = int(sch.get(channel).extent)
    whole = channels // lanes * lanes
    if whole in (0, channels):
        pieces = [channel]
    else:
        pieces = [sch.get_loops(sch.get_child_blocks(part)[-1])[0]
                  for part in sch.loop_partition(channel, [whole, None])]
    for piece in pieces:
        loops = sch.get_loops(sch.get_child_blocks(piece)[-1])
        inner = loops[[sch.get(loop).same_as(sch.get(piece)) for loop in loops].index(True) + 1:]
        start = int(sch.get(piece).min)
        if start == 0 and int(sch.get(piece).extent) > lanes:
            outer, vector = sch.split(piece, [None, lanes])
            sch.reorder(outer, *inner, vector)
        else:   # a loop that does not start at 0 cannot be split: the rest as one vector
            sch.reorder(*inner, piece)
            vector = piece
        for loop in inner:
            sch.unroll(loop)
        sch.vectorize(vector)


def gemm_rows(f: MinimalFilter, batch: int, out_h: int, out_w: int) -> list[int]:
    """The GEMM stage's "pixel" extents as `tvm_schedule.register_tile` sees them."""
    return [f.positions, tiles(f, batch, out_h, out_w)]


def output_tile(gemm: Any) -> int:
    """m of the Winograd stages whose GEMM block this is: its first axis, the positions, is (m + 2)^2."""
    return round(int(gemm.iter_vars[0].dom.extent) ** 0.5) - 2


__all__ = ["F2", "F4", "WINO_GEMM", "WINO_INPUT", "WINO_OUTPUT", "MinimalFilter", "choose_winograd",
           "conv2d_nhwc_winograd", "gemm_rows", "output_tile", "schedule_winograd_input",
           "schedule_winograd_output", "tiles", "transform_weight"]
