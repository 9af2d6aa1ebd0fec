"""TIR kernels for sparse (and dense) Conv2d: direct convolution over register tiles.

A conv with its weight as CSR/BSR rows (row = output channel, column = (ci, ky, kx)) is
computed as: for every stored weight w of output channel o, o's output gets w times the
input plane of ci shifted by (ky, kx). The input is first rearranged so that this shifted
plane is one contiguous run of floats for every weight ("slots"), and every stored weight
carries the precomputed start of its run (`offsets`, int32). The kernel then walks a
*tile* of TQ output positions at a time (a multiple of 16 floats: full vectors, kept in
registers), and for each output channel sums `w * xt[offset + q0 : offset + q0 + TQ]` over
its stored weights, four weights per step (one store of the accumulator per four weights,
four independent products). The epilogue applies the per-row scale (int8 values), bias,
an optional residual input and activation (ReLU / clip) and writes the tile: no separate
bias, activation or add pass over the output, no im2col of the whole layer.

Input layouts ("slots" of PLANE floats each, `ConvGeometry.layout`):
- "direct": 1x1, stride 1, no padding: x itself, one slot per channel (no copy).
- "shift": zero-padded planes; for stride s each channel is split into its s*s phases
  (rows py::s, columns px::s), so a strided conv also reads contiguous runs. Output
  position (oh, ow) is q = oh * ROW + ow: ROW - OW "junk" columns per row are computed
  and never written. Tiles are R output rows (narrow layers) or 64-column chunks.
- "im2col": one slot per (ci, ky, kx) holding exactly the OH*OW inputs that tap reads;
  no junk, chosen for small planes (7x7, 4x4, 2x2) where the padded rows would waste lanes.
The layout is chosen per layer by `conv_geometry` (a cost model: vector work + copy).

Grouped convs (depthwise) copy each group's padded input inside the kernel, into a per-group
scratch region, and skip the copy for groups without any stored weight.

Why scratch comes from the caller and the accumulator is a stack buffer: see `STACK` and
`runtime.tvm_kernels`. Convs whose tiles read more input than L1 holds cut the reduction
into k-blocks of input channels (`_kblock`); their row pointers are then per (row, k-block).

Kernel signatures (all float32 unless said):
  transform(x (B,C,H,W), origins (U, 3) i32, xt (B, U, PLANE))
  conv(xt (B,U,PLANE), values (NNZ,BR,1) f32|int8, offsets (NNZ,) i32, indptr (NB*KB+1,) i32,
       scale (O|1,), bias (O,), residual (B,O,OH,OW) | (1,), y (B,O,OH,OW))
  grouped(x, values, offsets, indptr, scale, bias, residual, origins, xs (chunks, UG*PLANE), y)
`scale` and `residual` are 1-element dummies when the layer has no int8 scale / residual.
"""
from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from dataclasses import astuple, dataclass, replace

from tvm.script import tirx as T

LANES = 16          # tile widths are multiples of this (one AVX-512 / four NEON registers)
TILE = 64           # accumulator floats per block row (4 AVX-512 / 16 NEON registers)
ACC_FLOATS = 128    # cap on accumulator floats of a BSR block row (BR x TQ)
# cost model of `conv_geometry`, in units of one 16-lane multiply-add (measured on x86, ~2 cycles):
STEP_COST = 1.5     # per stored weight and tile: index and value loads, address arithmetic
COPY_COST = 0.15    # per float copied into the rearranged input by row copies (vectorised)
COPY_COST_SMALL = 0.8   # per float when rows are <= 8 floats (one select per element)
ACTIVATIONS = ("none", "relu", "clip", "hardswish", "silu")
WORKERS = 16        # parallel chunks of a grouped conv; each reuses one scratch region (see _workers)
L1_BYTES = 24 * 1024     # input bytes one k-block of a conv's tile reads (half a 48 KB L1D; see _kblock)
MIN_KBLOCKS = 2          # (64 -> 64 at 56x56, two blocks: 0.95x / 0.97x of the time at 90 % / 95 %)
KBLOCK_ROWS = 64         # output channels per task of a k-blocked conv (their partial sums: 16 KB)
# Storage scope of a task's accumulator (< 1 KB): TVM puts "global" allocations under 1 KB on
# the stack, but every "local" one (any size) in a TVMBackendAllocWorkspace buffer, which LLVM
# must assume aliases the weights: the inner loop then stored the accumulator and reloaded the
# row pointer on every step. On the stack it stays in registers: 512 ch 7x7 0.89x of the time,
# 64 ch 56x56 0.86x, ResNet-18's 7x7 stem 0.82x (single layers, 90 %, 1 thread, Xeon).
STACK = "global"


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _vector_piece(n: int) -> int:
    """The width of the vector loops a run of n accumulator floats is written in: the largest
    power of two dividing n. A loop vectorised over 48 floats becomes one <48 x float> LLVM
    vector, which x86 legalisation widens and splits with masked and scalar pieces: a depthwise
    conv over 40-wide rows (48-float tiles) ran at a quarter of the speed of one over 56-wide
    rows (64-float tiles) per multiply-add; in three 16-float loops it runs as fast."""
    return n & -n


def _pad_lanes(n: int) -> int:
    """Vector width for n floats: a multiple of 16, or 4 / 8 for tiny tiles."""
    if n <= 4:
        return 4
    if n <= 8:
        return 8
    return _ceil_div(n, LANES) * LANES


@dataclass(frozen=True)
class ConvSpec:
    batch: int
    in_channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    fmt: str                          # "dense" (a CSR holding every weight) or "sparse"
    nnz_blocks: int = 0
    block: tuple[int, int] = (1, 1)   # (BR output channels, 1)
    index_dtype: str = "int32"
    act: str = "none"                 # fused activation: "none" | "relu" | "clip"
    clip: tuple[float, float] = (0.0, 0.0)
    residual: bool = False            # y = act(conv * scale + bias + residual)
    values: str = "float32"           # "int8": int8 values (always with a row scale)
    row_scale: bool = False           # the conv is multiplied by a per-row scale (int8, folded BN)

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple(
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, k, st, p, d in zip((self.height, self.width), self.kernel, self.stride,
                                      self.padding, self.dilation))

    def name(self) -> str:
        return f"rw_conv2d_{self.fmt}_{_digest(self)}"

    def transform_name(self) -> str:
        return layout_name(conv_geometry(self), self.batch)


def describe(s: ConvSpec) -> str:
    """What a conv kernel computes, for reports (e.g. "conv 64->64 56x56 k3x3 s1 g1 csr nnz=1843
    shift+relu+res")."""
    g = conv_geometry(s)
    fmt = "dense" if s.fmt == "dense" else ("csr" if s.block == (1, 1) else f"bsr{s.block[0]}x1")
    epi = "".join(f"+{e}" for e, on in (("scale", has_row_scale(s)), ("res", s.residual),
                                          (s.act if s.act != "clip" else f"clip{s.clip[1]:g}", s.act != "none")) if on)
    return (f"conv {s.in_channels}->{s.out_channels} {s.height}x{s.width} k{s.kernel[0]}x{s.kernel[1]} "
            f"s{s.stride[0]} g{s.groups} {fmt}{' int8' if s.values == 'int8' else ''} nnz={s.nnz_blocks} "
            f"{g.layout}{f'/kb{g.kblock}' if g.kblock else ''}{epi}")


def _digest(obj) -> str:
    return hashlib.sha1(repr(astuple(obj)).encode()).hexdigest()[:12]


def layout_name(g: "ConvGeometry", batch: int) -> str:
    """The input rearrangement's symbol: convs whose inputs share a geometry share it, but only
    at the same batch (the geometry has no batch; one symbol for two batches is a build error)."""
    return f"rw_conv2d_layout_{_digest(g)}" + ("" if batch == 1 else f"_b{batch}")


@dataclass(frozen=True)
class ConvGeometry:
    """Where every stored weight reads its input, and how output positions are tiled."""

    layout: str        # "direct" | "shift" | "im2col"
    slots: int         # U: planes of the rearranged input (per group for grouped convs)
    plane: int         # floats per slot
    row: int           # stride between output rows in the position space
    src_rows: int      # rows of data in a slot (the rest of the plane is zeros)
    step: tuple[int, int]   # input rows / columns per slot row / column
    tq: int            # accumulator width (floats) per block row
    rows_per_tile: int       # R (shift layout)
    chunk: int         # output columns per tile (shift) / output positions written (flat)
    chunks: int        # column chunks per row group (shift)
    tiles: int         # tiles per image
    # the copied rows of a slot and the input geometry, so the transform is self-contained
    channels: int
    height: int
    width: int
    padding: tuple[int, int]
    kernel: tuple[int, int]
    dilation: tuple[int, int]
    kblock: int = 0    # input channels per k-block (0: the reduction is not blocked; see _kblock)

    @property
    def kblocks(self) -> int:
        """K-blocks per weight row (1 when not blocked)."""
        return _ceil_div(self.channels, self.kblock) if self.kblock else 1


def _shift_geometry(s: ConvSpec, slots: int) -> ConvGeometry:
    (H, W), (KH, KW), (SH, SW), (PH, PW), (DH, DW) = (s.height, s.width), s.kernel, s.stride, s.padding, s.dilation
    OH, OW = s.out_hw
    rows, row = _ceil_div(H + 2 * PH, SH), _ceil_div(W + 2 * PW, SW)
    br = s.block[0]
    cap = TILE if br == 1 else max(LANES, ACC_FLOATS // br)
    if OW >= cap:
        chunk, chunks, R, tq = cap, _ceil_div(OW, cap), 1, cap
    else:   # R output rows per tile: the fewest vector steps (lanes and per-weight overhead)
        best = None
        for r in range(1, OH + 1):
            tq_r = _pad_lanes((r - 1) * row + OW)
            if tq_r > cap and r > 1:
                break
            steps = _ceil_div(OH, r) * (tq_r * br / LANES + STEP_COST)
            if best is None or steps <= best[0]:
                best = (steps, r, tq_r)
        _, R, tq = best
        chunk, chunks = OW, 1
    nr = _ceil_div(OH, R)
    max_q0 = (nr - 1) * R * row + (OW - chunk)
    max_off = ((KH - 1) * DH // SH) * row + (KW - 1) * DW // SW
    plane = _ceil_div(max(rows * row, max_q0 + tq + max_off), LANES) * LANES
    return ConvGeometry("shift", slots, plane, row, rows, (SH, SW), tq, R, chunk, chunks, nr * chunks,
                        s.in_channels // s.groups, H, W, s.padding, s.kernel, s.dilation)


def _flat_geometry(s: ConvSpec, layout: str, slots: int) -> ConvGeometry:
    OH, OW = s.out_hw
    P = OH * OW
    tq = TILE if P >= TILE else _pad_lanes(P)
    if s.block[0] > 1:
        tq = min(tq, max(LANES, ACC_FLOATS // s.block[0])) if P >= LANES else tq
    # tiny planes are packed densely (4-float alignment): the slots of a layer stay in L1/L2
    plane = P if layout == "direct" else _ceil_div(max(P, tq), 4 if tq < LANES else LANES) * (4 if tq < LANES else LANES)
    return ConvGeometry(layout, slots, plane, OW, OH, s.stride, tq, 1, min(tq, P), 1, _ceil_div(P, tq),
                        s.in_channels // s.groups, s.height, s.width, s.padding, s.kernel, s.dilation)


def _cost(s: ConvSpec, g: ConvGeometry) -> float:
    nnz = s.nnz_blocks if s.fmt == "sparse" else s.out_channels * s.in_channels // s.groups * s.kernel[0] * s.kernel[1]
    work = nnz * g.tiles * (g.tq * s.block[0] / LANES + STEP_COST)
    copy = 0 if g.layout == "direct" else g.slots * g.plane * (COPY_COST_SMALL if g.row <= 8 else COPY_COST)
    return work + copy


@lru_cache(maxsize=None)
def conv_geometry(s: ConvSpec) -> ConvGeometry:
    """The layout and tiling of a conv (a pure function of its spec)."""
    SH, SW = s.stride
    KK = s.kernel[0] * s.kernel[1]
    CG = s.in_channels // s.groups
    shift = _shift_geometry(s, CG * SH * SW)
    if s.groups > 1:
        return shift
    OH, OW = s.out_hw
    options = [shift, _flat_geometry(s, "im2col", CG * KK)]
    if s.kernel == (1, 1) and s.stride == (1, 1) and s.padding == (0, 0) and OH * OW >= TILE:
        options.append(_flat_geometry(s, "direct", CG))
    g = min(options, key=lambda g: _cost(s, g))
    return replace(g, kblock=_kblock(g))


def _kblock(g: ConvGeometry) -> int:
    """Input channels per k-block of a shift-layout conv whose tile reads more input than L1
    holds, else 0.

    A tile sums, for each of its output channels, shifted input runs over the row's stored
    weights; those runs come from every input channel, so where the tile's input (TQ plus the
    kernel's reach, per slot) exceeds L1 every run is read from L2 again for every output
    channel. ResNet-18's 512-channel 7x7 layer reads 172 KB per tile. Cut the reduction into
    blocks of input channels whose runs fit in `L1_BYTES` and sum block by block, keeping
    `KBLOCK_ROWS` output channels' partial sums: single 90 %-sparse layers, batch 1, 1 thread,
    interleaved (Xeon, AVX-512, accumulators on the stack in both): 512 ch 7x7 0.73x of the
    time, 256 ch 14x14 0.75x, 128 ch 28x28 0.78x, 128 -> 256 s2 0.71x; im2col layouts (VGG's
    small maps, one aligned run per tap) measured 0.93-1.18x and are not blocked."""
    if g.layout != "shift":
        return 0
    (KH, KW), (DH, DW), (SH, SW) = g.kernel, g.dilation, g.step
    reach_rows, reach_cols = (KH - 1) * DH // SH, (KW - 1) * DW // SW
    run = min(g.tq + reach_rows * g.row + reach_cols, (reach_rows + 1) * (g.tq + reach_cols))
    per_channel = SH * SW * run * 4
    channels = max(1, L1_BYTES // per_channel)
    return channels if _ceil_div(g.channels, channels) >= MIN_KBLOCKS else 0


def kblock_span(g: ConvGeometry) -> int:
    """Weight columns (ci, ky, kx) per k-block."""
    return g.kernel[0] * g.kernel[1] * g.kblock


def split_indptr_numpy(columns, indptr, kblocks: int, span: int, np):
    """The row pointers of a k-blocked conv: every weight row cut where its k-blocks (`span`
    columns each) start, so entry ob * KB + kb is the first stored weight of row ob in k-block
    kb (a CSR indptr of NB * KB rows). Stored weights must be in column order within a row
    (as `pack` stores them)."""
    nb = len(indptr) - 1
    rows = np.repeat(np.arange(nb), np.diff(indptr.astype(np.int64)))
    key = rows * kblocks + columns.astype(np.int64) // span
    if np.any(np.diff(key) < 0):
        raise ValueError("a sparse conv's stored weights are not in column order within each row")
    out = np.zeros(nb * kblocks + 1, np.int64)
    out[1:] = np.cumsum(np.bincount(key, minlength=nb * kblocks))
    return out.astype(np.int32)


def indptr_size(s: ConvSpec) -> int:
    """Entries of the kernel's row-pointer input: NB + 1, or NB * KB + 1 when k-blocked."""
    return s.out_channels // s.block[0] * conv_geometry(s).kblocks + 1


def split_indptr_name(nb: int, kb: int, index_dtype: str) -> str:
    return f"rw_conv2d_kptr_{nb}x{kb}_{index_dtype}"


@lru_cache(maxsize=None)
def split_indptr_func(nb: int, kb: int, index_dtype: str):
    """`split_indptr_numpy` as a TIR function of (columns, indptr, [KB, span]), for weights that
    are not constants at import; the build folds its calls (`fold_weight_arithmetic`)."""
    from tvm import tirx

    nnz = tirx.Var("nnz", "int64")

    @T.prim_func
    def f(col_h: T.handle, rp: T.Buffer((nb + 1,), "int32"), geo: T.Buffer((2,), "int32"),
          out: T.Buffer((nb * kb + 1,), "int32")):
        col = T.match_buffer(col_h, (nnz,), index_dtype)
        for ob, k in T.grid(nb, kb):
            out[ob * kb + k] = rp[ob]
            for j in range(rp[ob + 1] - rp[ob]):
                if T.Cast("int32", col[rp[ob] + j]) // geo[1] < k:
                    out[ob * kb + k] = out[ob * kb + k] + 1
        out[nb * kb] = rp[nb]
    return f.with_attr("global_symbol", split_indptr_name(nb, kb, index_dtype))


def slot_origins(g: ConvGeometry, np) -> "np.ndarray":
    """(input channel within the group, first input row, first input column) of every slot,
    int32 (U, 3): slot u, row r, column c holds input (row0 + r * step_h, col0 + c * step_w)."""
    SH, SW = g.step
    PH, PW = g.padding
    u = np.arange(g.slots)
    if g.layout == "shift":
        table = [u // (SH * SW), u // SW % SH - PH, u % SW - PW]
    elif g.layout == "im2col":
        KH, KW = g.kernel
        DH, DW = g.dilation
        tap = u % (KH * KW)
        table = [u // (KH * KW), tap // KW * DH - PH, tap % KW * DW - PW]
    else:
        table = [u, 0 * u, 0 * u]
    return np.stack(table, axis=1).astype(np.int32)


def slot_offsets_numpy(g: ConvGeometry, columns, np):
    """Start of every stored weight's run in the rearranged input, from its column
    (ci, ky, kx) of the weight matrix (numpy; weights are constants at import)."""
    KH, KW = g.kernel
    DH, DW = g.dilation
    SH, SW = g.step
    col = columns.astype(np.int64)
    ci, ky, kx = col // (KH * KW), col % (KH * KW) // KW, col % KW
    if g.layout == "shift":
        dy, dx = ky * DH, kx * DW
        slot = ci * SH * SW + (dy % SH) * SW + dx % SW
        off = slot * g.plane + (dy // SH) * g.row + dx // SW
    elif g.layout == "im2col":
        off = col * g.plane
    else:
        off = ci * g.plane
    return off.astype(np.int32)


OFFSET_LAYOUTS = {"shift": 0, "im2col": 1, "direct": 2}


def offsets_name(index_dtype: str) -> str:
    return f"rw_conv2d_offsets_{index_dtype}"


def offsets_geometry(g: ConvGeometry, np) -> "np.ndarray":
    """The int32 parameters `offsets_func` reads (one function serves every conv)."""
    KH, KW = g.kernel
    return np.array([OFFSET_LAYOUTS[g.layout], KH * KW, KW, g.dilation[0], g.dilation[1], g.step[0], g.step[1],
                     g.row, g.plane], np.int32)


@lru_cache(maxsize=None)
def offsets_func(index_dtype: str):
    """`slot_offsets_numpy` as a TIR function of the column indices (any number of them) and
    `offsets_geometry`: the same function for every conv, so a build folds it once."""
    from tvm import te, tirx

    n = tirx.Var("nnz", "int64")
    col = te.placeholder((n,), index_dtype, "columns")
    geo = te.placeholder((9,), "int32", "geometry")

    def offset(i):
        layout, kk, kw, dh, dw, sh, sw, row, plane = (geo[j] for j in range(9))
        c = col[i].astype("int32")
        ci, tap = tirx.floordiv(c, kk), tirx.floormod(c, kk)
        dy, dx = tirx.floordiv(tap, kw) * dh, tirx.floordiv(tirx.floormod(tap, kw) * dw, 1)
        shift = ((ci * (sh * sw) + tirx.floormod(dy, sh) * sw + tirx.floormod(dx, sw)) * plane
                 + tirx.floordiv(dy, sh) * row + tirx.floordiv(dx, sw))
        return tirx.Select(layout == 0, shift, tirx.Select(layout == 1, c, ci) * plane)

    off = te.compute((n,), offset, "offsets")
    return te.create_prim_func([col, geo, off]).with_attr("global_symbol", offsets_name(index_dtype))


def _epilogue(s: ConvSpec, v, o, residual, scale, bias):
    """row scale (int8 / folded BN), bias, residual, activation of one value of output channel o."""
    if has_row_scale(s):
        v = v * scale[o]
    v = v + bias[o]
    if s.residual:
        v = v + residual
    if s.act == "relu":
        v = T.max(v, T.float32(0))
    elif s.act == "clip":
        v = T.min(T.max(v, T.float32(s.clip[0])), T.float32(s.clip[1]))
    elif s.act == "hardswish":   # torch: x * relu6(x + 3) / 6
        v = v * T.min(T.max(v + T.float32(3), T.float32(0)), T.float32(6)) / T.float32(6)
    elif s.act == "silu":
        v = v / (T.float32(1) + _exp(-v))
    return v


def _exp(v):
    """exp(v) for float32 v as arithmetic that vectorises (`tvm_fast_math.fast_exp`): SiLU
    through TVM's sigmoid measured 3.1 ns per element on this host against 0.5 with it, and was
    the largest cost of EfficientNet's packed kernels."""
    from rwdeploy.runtime.tvm_fast_math import fast_exp

    return fast_exp(v)


def _weight(s: ConvSpec, vals, k, r):
    return T.Cast("float32", vals[k, r, 0]) if s.values == "int8" else vals[k, r, 0]


def _copy_macro(g: ConvGeometry):
    """A TIR macro copying one slot: copy(x, org, dst, b, c0, u, base) writes slot u (origins
    in `org`, see `slot_origins`) of the input channels that start at c0 to
    dst[base : base + PLANE] (zeros where padding is read)."""
    SH, SW = g.step
    H, W, ROW, NROWS, PLANE = g.height, g.width, g.row, g.src_rows, g.plane

    @T.macro
    def copy_rows(x, org, dst, b, c0, u, base):
        c = T.bind(org[u, 0])
        dy0 = T.bind(org[u, 1])
        dx0 = T.bind(org[u, 2])
        cl = T.bind(T.min(T.max(T.floordiv(SW - 1 - dx0, SW), 0), ROW))
        cr = T.bind(T.max(T.min(T.floordiv(W - 1 - dx0, SW) + 1, ROW), cl))
        for r in range(NROWS):
            ih = T.bind(r * SH + dy0)
            if ih >= 0 and ih < H:
                for col in range(cl):
                    dst[base + r * ROW + col] = T.float32(0)
                for col in range(cr - cl):
                    dst[base + r * ROW + cl + col] = x[b, c0 + c, ih, (cl + col) * SW + dx0]
                for col in range(ROW - cr):
                    dst[base + r * ROW + cr + col] = T.float32(0)
            else:
                for col in T.vectorized(ROW):
                    dst[base + r * ROW + col] = T.float32(0)
        for i in range(PLANE - NROWS * ROW):
            dst[base + NROWS * ROW + i] = T.float32(0)

    @T.macro
    def copy_small(x, org, dst, b, c0, u, base):
        # short rows: one select per element beats three loops with run-time bounds per row
        c = T.bind(org[u, 0])
        dy0 = T.bind(org[u, 1])
        dx0 = T.bind(org[u, 2])
        for r, col in T.grid(NROWS, ROW):
            dst[base + r * ROW + col] = T.if_then_else(
                r * SH + dy0 >= 0 and r * SH + dy0 < H and col * SW + dx0 >= 0 and col * SW + dx0 < W,
                x[b, c0 + c, T.min(T.max(r * SH + dy0, 0), H - 1), T.min(T.max(col * SW + dx0, 0), W - 1)],
                T.float32(0))
        for i in range(PLANE - NROWS * ROW):
            dst[base + NROWS * ROW + i] = T.float32(0)

    copy = copy_small if ROW <= 8 else copy_rows
    return copy


def _transform(g: ConvGeometry, B: int, C: int, H: int, W: int, name: str):
    U, PLANE = g.slots, g.plane
    copy = _copy_macro(g)

    @T.prim_func
    def f(x: T.Buffer((B, C, H, W), "float32"), org: T.Buffer((U, 3), "int32"),
          xt: T.Buffer((B, U, PLANE), "float32")):
        T.func_attr({"tir.noalias": True})
        for bu in T.parallel(B * U):
            # flat views are declared inside the loop: Relax's reshape detection
            # (RewriteDataflowReshape) rejects functions whose body does not start with a loop
            xf = T.decl_buffer((B * U * PLANE,), "float32", data=xt.data)
            copy(x, org, xf, bu // U, 0, bu % U, bu * PLANE)
    return f.with_attr("global_symbol", name)


@lru_cache(maxsize=None)
def transform_for(s: ConvSpec):
    """The input rearrangement of a groups=1 conv, or None for the "direct" layout."""
    g = conv_geometry(s)
    if g.layout == "direct" or s.groups > 1:
        return None
    return _transform(g, s.batch, s.in_channels, s.height, s.width, s.transform_name())


def _run_macro(s: ConvSpec, n: int):
    """write(acc, r, a, dst, d, resf, scale, bias, o): dst[d + j] = epilogue(acc[r, a + j]) for
    j < n, as 16-float vectors plus one shorter tail (one n-wide vector of an odd width compiles
    to shuffles and measured ~2x slower)."""
    full, tail = n // LANES, n % LANES
    epi = lambda v, o, rv, sc, bi: _epilogue(s, v, o, rv, sc, bi)  # noqa: E731
    has_tail = tail > 0

    @T.macro
    def write(acc, r, a, dst, d, resf, scale, bias, o):
        for j0 in range(full):
            for j in T.vectorized(LANES):
                dst[d + j0 * LANES + j] = epi(acc[r, a + j0 * LANES + j], o, resf[d + j0 * LANES + j], scale, bias)
        if has_tail:
            for j in T.vectorized(tail):
                dst[d + full * LANES + j] = epi(acc[r, a + full * LANES + j], o, resf[d + full * LANES + j],
                                                scale, bias)
    return write


def _tile_macros(s: ConvSpec, g: ConvGeometry):
    """accumulate(acc, src, vals, off, lo, hi, base): acc[r, :TQ] = sum over stored weights
    k in [lo, hi) of vals[k, r] * src[off[k] + base : + TQ]; add(...): the same sum added to
    acc; store(...): the epilogue."""
    BR, TQ = s.block[0], g.tq
    OH, OW = s.out_hw
    P = OH * OW
    O = s.out_channels
    R, ROW, CW = g.rows_per_tile, g.row, g.chunk
    w = lambda vals, k, r: _weight(s, vals, k, r)  # noqa: E731
    epi = lambda v, o, rv, sc, bi: _epilogue(s, v, o, rv, sc, bi)  # noqa: E731

    VW = _vector_piece(TQ)
    NV = TQ // VW

    @T.macro
    def add(acc, src, vals, off, lo, hi, base):
        for k4 in range((hi - lo) // 4):
            k = T.bind(lo + k4 * 4)
            a0 = T.bind(off[k] + base)
            a1 = T.bind(off[k + 1] + base)
            a2 = T.bind(off[k + 2] + base)
            a3 = T.bind(off[k + 3] + base)
            for r, j0 in T.grid(BR, NV):
                for j1 in T.vectorized(VW):
                    j = T.meta_var(j0 * VW + j1)
                    acc[r, j] = acc[r, j] + ((w(vals, k, r) * src[a0 + j] + w(vals, k + 1, r) * src[a1 + j])
                                             + (w(vals, k + 2, r) * src[a2 + j] + w(vals, k + 3, r) * src[a3 + j]))
        for k in range(lo + (hi - lo) // 4 * 4, hi):
            a0 = T.bind(off[k] + base)
            for r, j0 in T.grid(BR, NV):
                for j1 in T.vectorized(VW):
                    j = T.meta_var(j0 * VW + j1)
                    acc[r, j] = acc[r, j] + w(vals, k, r) * src[a0 + j]

    @T.macro
    def accumulate(acc, src, vals, off, lo, hi, base):
        for r, j0 in T.grid(BR, NV):
            for j1 in T.vectorized(VW):
                acc[r, j0 * VW + j1] = T.float32(0)
        add(acc, src, vals, off, lo, hi, base)

    if g.layout == "shift":
        write = _run_macro(s, CW)

        @T.macro
        def store(acc, yf, resf, scale, bias, b, ob, oh0, cs):
            for r in range(BR):
                for rr in range(R):
                    if oh0 + rr < OH:
                        write(acc, r, rr * ROW, yf, ((b * O + ob * BR + r) * OH + oh0 + rr) * OW + cs,
                              resf, scale, bias, ob * BR + r)
    else:
        write = _run_macro(s, min(TQ, P))

        @T.macro
        def store(acc, yf, resf, scale, bias, b, ob, q0, unused):
            for r in range(BR):
                write(acc, r, 0, yf, (b * O + ob * BR + r) * P + q0, resf, scale, bias, ob * BR + r)
    return accumulate, add, store


def _tile_origin(s: ConvSpec, g: ConvGeometry, t):
    """(q0, first output row or q0, first column) of tile t: the arguments of `store`."""
    OH, OW = s.out_hw
    if g.layout == "shift":
        oh0 = t // g.chunks * g.rows_per_tile
        cs = T.min(T.truncmod(t, g.chunks) * g.chunk, OW - g.chunk)
        return oh0 * g.row + cs, oh0, cs
    P = OH * OW
    q0 = T.min(t * g.tq, P - g.tq) if P >= g.tq else 0
    return q0, q0, 0


def _workers(tasks: int) -> tuple[int, int]:
    """(chunks, tasks per chunk) of a grouped conv's parallel loop. Each chunk pads its groups'
    inputs into one scratch region, reused group after group, rather than a region per group:
    MobileNetV2's 144 padded 56x56 channels were 1.9 MB of scratch, more than this machine's
    L2, and evicted the block's residual input on the way."""
    chunks = min(tasks, WORKERS)
    return chunks, _ceil_div(tasks, chunks)


def _value_type(s: ConvSpec) -> str:
    return "int8" if s.values == "int8" else "float32"


def has_row_scale(s: ConvSpec) -> bool:
    return s.row_scale or s.values == "int8"


def scale_shape(s: ConvSpec) -> tuple[int]:
    return (s.out_channels,) if has_row_scale(s) else (1,)


def residual_shape(s: ConvSpec) -> tuple[int, ...]:
    OH, OW = s.out_hw
    return (s.batch, s.out_channels, OH, OW) if s.residual else (1,)


def nnz_stored(s: ConvSpec) -> int:
    if s.fmt == "dense":
        return s.out_channels * (s.in_channels // s.groups) * s.kernel[0] * s.kernel[1]
    return max(1, s.nnz_blocks)   # an all-zero weight is passed as one explicit zero


@lru_cache(maxsize=None)   # parsing TVMScript costs ~0.3 s a kernel; identical layers share it
def conv_kernel(s: ConvSpec):
    """The conv PrimFunc (groups == 1: reads the transform's output, or x for "direct").

    A k-blocked conv (`_kblock`) holds the partial sums of KBLOCK_ROWS output channels' tiles
    and adds one k-block of input channels to each before the next, so the block's input runs
    stay in L1; `rp` is then `split_indptr_numpy`'s (NB * KB + 1 entries)."""
    g = conv_geometry(s)
    if s.groups > 1:
        return _grouped_kernel(s, g)
    B, O = s.batch, s.out_channels
    OH, OW = s.out_hw
    U, PLANE, TQ, KB = g.slots, g.plane, g.tq, g.kblocks
    BR = s.block[0]
    NB = O // BR
    NNZ, VT = nnz_stored(s), _value_type(s)
    SC, RS = scale_shape(s), residual_shape(s)
    RSN = math.prod(RS)
    NT = g.tiles
    # block rows per task; a k-blocked task keeps each row's partial sums between k-blocks
    OCH = min(NB, max(1, (KBLOCK_ROWS if KB > 1 else 16) // BR))
    NOC = _ceil_div(NB, OCH)
    PART, PART_SCOPE = (OCH, "local") if KB > 1 else (1, STACK)
    VW = _vector_piece(TQ)
    NV = TQ // VW
    _, add, store = _tile_macros(s, g)
    origin = lambda t: _tile_origin(s, g, t)  # noqa: E731

    @T.prim_func
    def f(xt: T.Buffer((B, U, PLANE), "float32"), vals: T.Buffer((NNZ, BR, 1), VT),
          off: T.Buffer((NNZ,), "int32"), rp: T.Buffer((NB * KB + 1,), "int32"),
          scale: T.Buffer(SC, "float32"), bias: T.Buffer((O,), "float32"),
          res: T.Buffer(RS, "float32"), y: T.Buffer((B, O, OH, OW), "float32")):
        T.func_attr({"tir.noalias": True})
        for task in T.parallel(B * NT * NOC):
            xf = T.decl_buffer((B * U * PLANE,), "float32", data=xt.data)
            yf = T.decl_buffer((B * O * OH * OW,), "float32", data=y.data)
            resf = T.decl_buffer((RSN,), "float32", data=res.data)
            acc = T.decl_buffer((BR, TQ), "float32", scope=STACK)
            part = T.decl_buffer((PART, BR, TQ), "float32", scope=PART_SCOPE)
            b = T.bind(task // (NT * NOC))
            q0, a0, a1 = T.meta_var(origin(T.truncmod(task // NOC, NT)))
            for kb in range(KB):
                for i in range(OCH):
                    ob = T.bind(T.truncmod(task, NOC) * OCH + i)
                    if ob < NB:
                        for r, j0 in T.grid(BR, NV):
                            for j1 in T.vectorized(VW):
                                j = T.meta_var(j0 * VW + j1)
                                acc[r, j] = T.if_then_else(kb == 0, T.float32(0), part[T.min(i, PART - 1), r, j])
                        add(acc, xf, vals, off, rp[ob * KB + kb], rp[ob * KB + kb + 1], b * U * PLANE + q0)
                        if kb < KB - 1:
                            for r, j0 in T.grid(BR, NV):
                                for j1 in T.vectorized(VW):
                                    j = T.meta_var(j0 * VW + j1)
                                    part[T.min(i, PART - 1), r, j] = acc[r, j]
                        else:
                            store(acc, yf, resf, scale, bias, b, ob, a0, a1)
    return f.with_attr("global_symbol", s.name())


def _grouped_kernel(s: ConvSpec, g: ConvGeometry):
    """Grouped conv: each group copies its padded input into its own scratch region (only if
    the group stores any weight), then runs the tiles of its output channels."""
    B, C, H, W, O, G = s.batch, s.in_channels, s.height, s.width, s.out_channels, s.groups
    OH, OW = s.out_hw
    CG = C // G
    U, PLANE, NT = g.slots, g.plane, g.tiles
    BR = s.block[0]
    NBG = O // G // BR
    if (O // G) % BR:
        raise ValueError(f"block of {BR} output channels crosses a group of {O // G}")
    NB = O // BR
    NNZ, VT = nnz_stored(s), _value_type(s)
    SC, RS = scale_shape(s), residual_shape(s)
    RSN = math.prod(RS)
    TQ = g.tq
    accumulate, _, store = _tile_macros(s, g)
    copy = _copy_macro(g)
    origin = lambda t: _tile_origin(s, g, t)  # noqa: E731
    NW, PER = _workers(B * G)

    @T.prim_func
    def f(x: T.Buffer((B, C, H, W), "float32"), vals: T.Buffer((NNZ, BR, 1), VT),
          off: T.Buffer((NNZ,), "int32"), rp: T.Buffer((NB + 1,), "int32"),
          scale: T.Buffer(SC, "float32"), bias: T.Buffer((O,), "float32"),
          res: T.Buffer(RS, "float32"), org: T.Buffer((U, 3), "int32"),
          xs: T.Buffer((NW, U * PLANE), "float32"),
          y: T.Buffer((B, O, OH, OW), "float32")):
        T.func_attr({"tir.noalias": True})
        for w in T.parallel(NW):
            xf = T.decl_buffer((NW * U * PLANE,), "float32", data=xs.data)
            yf = T.decl_buffer((B * O * OH * OW,), "float32", data=y.data)
            resf = T.decl_buffer((RSN,), "float32", data=res.data)
            acc = T.decl_buffer((BR, TQ), "float32", scope=STACK)
            for i_task in range(PER):
                if w * PER + i_task < B * G:
                    b = T.bind((w * PER + i_task) // G)
                    grp = T.bind(T.truncmod(w * PER + i_task, G))
                    if rp[grp * NBG] < rp[grp * NBG + NBG]:
                        for u in range(U):
                            copy(x, org, xf, b, grp * CG, u, (w * U + u) * PLANE)
                    for t in range(NT):
                        q0, a0, a1 = T.meta_var(origin(t))
                        for i in range(NBG):
                            accumulate(acc, xf, vals, off, rp[grp * NBG + i], rp[grp * NBG + i + 1],
                                       w * U * PLANE + q0)
                            store(acc, yf, resf, scale, bias, b, grp * NBG + i, a0, a1)
    return f.with_attr("global_symbol", s.name())


def scratch_shape(s: ConvSpec) -> tuple[int, ...] | None:
    """Shape of the grouped kernel's scratch output (before y), or None."""
    if s.groups == 1:
        return None
    g = conv_geometry(s)
    return (_workers(s.batch * s.groups)[0], g.slots * g.plane)


# ----------------------------------------------------------------------------- pointwise + depthwise

def can_fuse_pointwise(pw: ConvSpec, dw: ConvSpec) -> bool:
    """A 1x1 conv (CSR or dense, no residual) whose output feeds a depthwise conv only."""
    return (pw.kernel == (1, 1) and pw.stride == (1, 1) and pw.padding == (0, 0) and pw.groups == 1
            and pw.block == (1, 1) and not pw.residual and dw.groups == dw.in_channels == dw.out_channels
            and dw.block == (1, 1) and pw.out_channels == dw.in_channels and pw.batch == dw.batch
            and (pw.height, pw.width) == (dw.height, dw.width))


def _tile_width(n: int) -> int:
    """Accumulator width for a run of n floats read in tiles that must not overrun it: whole
    vectors (tiles overlap at the end of the run: 49 floats are two 32-float tiles at 0 and 17)
    rather than one tile of an odd width, which compiles to shuffles per lane (measured ~5x
    slower on MobileNetV2's 160->960 at 7x7)."""
    if n >= TILE or n < LANES:   # (48-float tiles over a 96-float plane measured 1.3x slower than 64)
        return min(TILE, n)
    return min(range(LANES, n + 1, LANES), key=lambda w: (_ceil_div(n, w) * (w / LANES + STEP_COST), -w))


def fused_input_geometry(pw: ConvSpec, dw: ConvSpec) -> ConvGeometry:
    """The 1x1 conv's input rearranged as the depthwise conv reads its own: each input channel
    zero-padded and split into the depthwise stride's phases (the depthwise geometry, with
    CIN * SH * SW slots)."""
    g = conv_geometry(dw)
    return replace(g, slots=pw.in_channels * g.slots, channels=pw.in_channels)


def fused_pointwise_geometry(pw: ConvSpec, dw: ConvSpec) -> ConvGeometry:
    """Where the 1x1 conv's weights read (input channel ci: its phases start at ci * U * PLANE
    of `fused_input_geometry`'s layout) and its tiles: one depthwise slot of PLANE floats."""
    g = conv_geometry(dw)
    tq = _tile_width(g.plane)
    return ConvGeometry("direct", pw.in_channels, g.slots * g.plane, g.row, g.src_rows, (1, 1), tq, 1, tq, 1,
                        _ceil_div(g.plane, tq), pw.in_channels, pw.height, pw.width, (0, 0), (1, 1), (1, 1))


def fused_name(pw: ConvSpec, dw: ConvSpec) -> str:
    return f"rw_conv2d_pwdw_{_digest(pw)}{_digest(dw)[:6]}"


def fused_transform_name(pw: ConvSpec, dw: ConvSpec) -> str:
    return layout_name(fused_input_geometry(pw, dw), pw.batch)


@lru_cache(maxsize=None)
def fused_input_transform(pw: ConvSpec, dw: ConvSpec):
    """The rearrangement of the 1x1 conv's input (B, CIN, H, W) -> (B, CIN * U, PLANE)."""
    g = fused_input_geometry(pw, dw)
    return _transform(g, pw.batch, pw.in_channels, pw.height, pw.width, fused_transform_name(pw, dw))


def fused_scratch_shapes(pw: ConvSpec, dw: ConvSpec) -> list[tuple[int, ...]]:
    """The depthwise conv's padded input, per (image, channel)."""
    g = conv_geometry(dw)
    return [(_workers(dw.batch * dw.groups)[0], g.slots * g.plane)]


@lru_cache(maxsize=None)
def fused_pointwise_depthwise_kernel(pw: ConvSpec, dw: ConvSpec):
    """A depthwise conv that computes its input channel itself, so that the wide 1x1 output
    (MobileNet's expansion) never goes to memory whole.

    The 1x1 conv reads its input in the depthwise conv's own layout (`fused_input_transform`:
    zero-padded, split into stride phases; CIN channels, copied once per call, rather than
    copying each of the G expanded channels). Task c computes row c of the 1x1 conv (scale,
    bias, activation) straight into the depthwise slots, then zeroes the padding (a zero input
    gives act(bias) there, but the depthwise conv must read zeros), then runs the depthwise
    tiles. Only the slots (stride phases) that channel c's stored depthwise weights read are
    computed: at 90 % sparsity a stride-2 filter keeps about one of its nine taps, so most
    channels need one phase of four. A channel whose depthwise filter stores nothing skips the
    1x1 row (its output is the bias)."""
    if not can_fuse_pointwise(pw, dw):
        raise ValueError("not a 1x1 conv feeding a depthwise conv")
    g, gp = conv_geometry(dw), fused_pointwise_geometry(pw, dw)
    B, CIN, H, W, G = pw.batch, pw.in_channels, pw.height, pw.width, dw.groups
    OH, OW = dw.out_hw
    U, PLANE, NT, ROW, NROWS = g.slots, g.plane, g.tiles, g.row, g.src_rows
    SH, SW = g.step
    PH, PW = g.padding
    TQ, TQP, NTP = g.tq, gp.tq, gp.tiles
    NNZP, VTP, SCP = nnz_stored(pw), _value_type(pw), scale_shape(pw)
    NNZ, VT, SC, RS = nnz_stored(dw), _value_type(dw), scale_shape(dw), residual_shape(dw)
    RSN = math.prod(RS)
    accumulate_pw, _, _ = _tile_macros(pw, gp)
    accumulate, _, store = _tile_macros(dw, g)
    origin = lambda t: _tile_origin(dw, g, t)  # noqa: E731
    write_pw = _run_macro(pw, TQP)
    NW, PER = _workers(B * G)

    @T.prim_func
    def f(xt: T.Buffer((B, CIN * U, PLANE), "float32"), pvals: T.Buffer((NNZP, 1, 1), VTP),
          poff: T.Buffer((NNZP,), "int32"), prp: T.Buffer((G + 1,), "int32"),
          pscale: T.Buffer(SCP, "float32"), pbias: T.Buffer((G,), "float32"),
          vals: T.Buffer((NNZ, 1, 1), VT), off: T.Buffer((NNZ,), "int32"), rp: T.Buffer((G + 1,), "int32"),
          scale: T.Buffer(SC, "float32"), bias: T.Buffer((G,), "float32"), res: T.Buffer(RS, "float32"),
          xs: T.Buffer((NW, U * PLANE), "float32"), y: T.Buffer((B, G, OH, OW), "float32")):
        T.func_attr({"tir.noalias": True})
        for w in T.parallel(NW):
            xin = T.decl_buffer((B * CIN * U * PLANE,), "float32", data=xt.data)
            xf = T.decl_buffer((NW * U * PLANE,), "float32", data=xs.data)
            yf = T.decl_buffer((B * G * OH * OW,), "float32", data=y.data)
            resf = T.decl_buffer((RSN,), "float32", data=res.data)
            accp = T.decl_buffer((1, TQP), "float32", scope=STACK)
            acc = T.decl_buffer((1, TQ), "float32", scope=STACK)
            reads = T.decl_buffer((1,), "int32", scope=STACK)
            for i_task in range(PER):
                if w * PER + i_task < B * G:
                    task = T.bind(w * PER + i_task)
                    b = T.bind(task // G)
                    c = T.bind(T.truncmod(task, G))
                    for u in range(U):
                        reads[0] = 0
                        for k in range(rp[c], rp[c + 1]):
                            if T.floordiv(off[k], PLANE) == u:
                                reads[0] = 1
                        if reads[0] > 0:
                            dst = T.bind((w * U + u) * PLANE)
                            for t in range(NTP):
                                q0 = T.bind(T.min(t * TQP, PLANE - TQP))
                                accumulate_pw(accp, xin, pvals, poff, prp[c], prp[c + 1],
                                              (b * CIN * U + u) * PLANE + q0)
                                write_pw(accp, 0, 0, xf, dst + q0, pscale, pscale, pbias, c)
                            # the padding: input rows / columns outside the image read as zeros
                            dy0 = T.bind(T.truncmod(u // SW, SH) - PH)
                            dx0 = T.bind(T.truncmod(u, SW) - PW)
                            cl = T.bind(T.min(T.max(T.floordiv(SW - 1 - dx0, SW), 0), ROW))
                            cr = T.bind(T.max(T.min(T.floordiv(W - 1 - dx0, SW) + 1, ROW), cl))
                            for r in range(NROWS):
                                if r * SH + dy0 < 0 or r * SH + dy0 >= H:
                                    for col in range(ROW):
                                        xf[dst + r * ROW + col] = T.float32(0)
                                else:
                                    for col in range(cl):
                                        xf[dst + r * ROW + col] = T.float32(0)
                                    for col in range(ROW - cr):
                                        xf[dst + r * ROW + cr + col] = T.float32(0)
                    for t in range(NT):
                        q0, a0, a1 = T.meta_var(origin(t))
                        accumulate(acc, xf, vals, off, rp[c], rp[c + 1], w * U * PLANE + q0)
                        store(acc, yf, resf, scale, bias, b, c, a0, a1)
    return f.with_attr("global_symbol", fused_name(pw, dw))
