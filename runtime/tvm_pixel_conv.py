"""Convolutions with few output channels, vectorised over output pixels (NCHW) instead of channels.

The CPU build's convolutions are NHWC with output channels in vectors (`tvm_schedule`): each FMA
adds one broadcast input times a vector of weights to a vector of output channels. A layer with
few output channels fills few of a vector's lanes: slim ResNet-20 70 %'s 5-channel convs use 5
of 8 (half-register vectors issue like whole ones on a 512-bit core: 5 of 16), its 10- and
19-channel convs 10 of 16 and 19 of 32. Those layers ran at 22-33 GMAC/s where the dense
model's run at 77.

Here such a conv stays NCHW and its vectors run along the output row: each FMA adds a broadcast
weight times a vector of 16 neighbouring input pixels (one unaligned load of the padded input
row) to 16 output pixels, and one input vector serves a tile's output channels. The lanes
wasted are then those of the row's last vector (a 28-wide row: 4 of 32), not of the channels.
A 5 -> 5 3x3 conv at 32x32 with ReLU alone, 1 thread on the Xeon: 3.8 us (60 GMAC/s) against
10.5 us in the NHWC build.

Where the rows are short (an 8x8 map: half a vector per row) the map is flattened instead
(`conv2d_nchw_flat`): the taps' inputs are copied once into a buffer where a vector is 16
consecutive pixels of the map, whatever the row width (`uses_flat_map` decides, the copy's cost
included). Slim ResNet-20 70 %'s last stage, 19 channels at 8x8 (19 of 32 lanes by channels, 8
of 16 by rows), runs that way; the whole model at batch 1, interleaved A/B on the Xeon against
the NHWC build of that stage: 0.88x the time (ResNet-56 0.89x; two steps, see
`conv2d_nchw_flat`). Its 3x3 stride-1 convs have since gone row Winograd, folded over the flat
map (`tvm_row_winograd`); the flat direct conv keeps the others (5x5, stride 2, maps whose row
tiles do not fill whole vectors).

`choose_pixel_convs` decides which convs of a model go that way (`prefers_pixel_vectors` per
conv, then whether the cycles saved pay the transposes to NHWC neighbours);
`tvm_schedule.nhwc_or_as_given_pass` keeps those NCHW and TVM's ConvertLayout puts the
transposes in. `conv2d_nchw_pixels` (by rows) or `conv2d_nchw_flat` is their compute (stride 1
or 2, the legaliser's, for every NCHW conv `pixel_candidate` accepts), and `pixel_conv_tile` the
register tile `tvm_schedule.schedule_reduction` gives its `PIXEL_CONV` stage: output channels x
rows x row vectors, or output channels x up to `FLAT_VECTORS` vectors of the flat map.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from rwdeploy.runtime.tvm_loops import largest_divisor, vector_pieces

PIXEL_CONV = "rw_conv2d_nchw_pixels"
PIXEL_PAD = "rw_pad_nchw"
PIXEL_KEPT = "rw_pixels_kept"
# A conv goes pixel-vectorised when its output rows fill this much more of its vectors than
# its output channels would: the lane count leaves out the padded input copy and the row's
# partial write-back (1.08 measured no better on slim ResNet-18 / VGG-16-BN).
MARGIN = 1.25
# the same with 256-bit vectors (Zen 3, whole models interleaved): dense LeNet-5, 20 and 50
# channels in 24 and 56 lanes against rows of 24 and an 8x8 map, 0.67x / 0.57x the time at batch
# 1 / 8 with 1.1 (the NHWC tile of 7 channel vectors is one vector wide); slim ResNet-18 70 %
# 0.94x at batch 1, slim VGG-16-BN and ResNet-20 1.00x
MARGIN_256_BIT = 1.1
# accumulators per register tile: 32 AVX-512 registers less the input vectors and broadcasts
ACCUMULATORS = 20
# the same with 16 registers (AVX2): 20 spilled, slim ResNet-20 70 % on Zen 3 ran 1.08-1.12x the
# time of its NHWC build with them and 0.73x with 12
ACCUMULATORS_16 = 12
# vectors of a flat map per register tile (`pixel_conv_tile`): 4 x 5 channels loads 9 vectors per 20 FMAs
FLAT_VECTORS = 4
# cycles per element of the flat kernel's copy of the taps' inputs (vectorised along output rows)
FLAT_COPY_CYCLES = 0.25
# column taps a flat copy is split into, one loop each, to vectorise their interiors (a 7x7 kernel)
MAX_COLUMN_TAPS = 7


def _row_width(width: int, lanes: int) -> int:
    """The output row as computed: whole vectors of `lanes`, or one half-register vector for a
    row of at most half a register."""
    half = max(4, lanes // 2)
    return half if width <= half else -(-width // lanes) * lanes


def _filled(used: int, computed: int, lanes: int) -> float:
    """The fraction of the lanes issued that carry results: a half-register vector costs as
    much as a whole one on a core with 512-bit units (`tvm_schedule.channel_unit`)."""
    return used / max(computed, lanes)


def _pixel_fill(out_height: int | None, out_width: int, lanes: int, out_channels: int) -> float:
    """The fraction of the issued lanes a pixel-vectorised conv fills: by rows, or over its
    flattened map where that fills more (`uses_flat_map`; needs the height)."""
    if out_height is None or not uses_flat_map(out_height, out_width, lanes, out_channels):
        return _filled(out_width, _row_width(out_width, lanes), lanes)
    return _filled(out_height * out_width, flat_width(out_height, out_width, lanes), lanes)


def prefers_pixel_vectors(out_channels: int, out_width: int, *, lanes: int, channel_width: int,
                          stride: tuple[int, int] = (1, 1), dilation: tuple[int, int] = (1, 1),
                          groups: int = 1, out_height: int | None = None) -> bool:
    """Whether a conv runs pixel-vectorised: an undilated, ungrouped conv of stride 1 or 2 on a
    512-bit core (stride 1 only on a 256-bit one) whose output rows (or, given `out_height`, its
    flattened map where `uses_flat_map`) fill its vectors at least `MARGIN` times better than its
    output channels (padded to `channel_width`, `tvm_schedule.padded_width`) do
    (`MARGIN_256_BIT` with 8 lanes).

    With AVX2 (Zen 3, whole models interleaved, slim 70 %, batch 1 / 8): ResNet-20 0.60x the
    time (with row Winograd), LeNet-5 0.86x / 0.79x, VGG-16-BN 0.89x / 0.85x; the stride-2 stems
    lost there (MobileNetV2 3 -> 10 at 112x112 1.2x, its depthwise conv then reading 10 unpadded
    channels; ResNet-18 3 -> 19 7x7 1.07x), so strided convs keep channel vectors."""
    strides = ((1, 1), (2, 2)) if lanes >= 16 else ((1, 1),) if lanes >= 8 else ()
    if groups != 1 or tuple(stride) not in strides or tuple(dilation) != (1, 1):
        return False
    by_pixels = _pixel_fill(out_height, out_width, lanes, out_channels)
    by_channels = _filled(out_channels, channel_width, lanes)
    return by_pixels >= (MARGIN if lanes >= 16 else MARGIN_256_BIT) * by_channels


def tiled_channels(channels: int) -> int:
    """Output channels as computed: `channels`, or the next count with a divisor of 4 or more
    that fits a tile, where `channels` has none (19 -> 20). A tile's channels share each input
    vector it loads; a tile of one channel (19 is prime) loads a vector per FMA, and half of
    those loads cross a cache line: slim ResNet-18 70 %'s 19-channel convs at 28x28 ran 0.080
    ms against 0.054 in the NHWC build."""
    room = ACCUMULATORS // 2
    count = channels
    while count <= channels + 3 and channels > 4:
        if largest_divisor(count, room) >= 4:
            return count
        count += 1
    return channels


# cycles per element of a transpose between NCHW and NHWC (an unscheduled copy: 112x112x10
# floats in 43 us on the Xeon), against 2 x `lanes` MACs per cycle for a conv's FMAs
TRANSPOSE_CYCLES = 1.0


@dataclass
class _Conv:
    call: Any
    gain: float          # FMA cycles saved by pixel vectors
    in_elements: int
    out_elements: int
    before: list[Any]    # the convs (or None: a function parameter) its input comes from
    after: list[Any]     # the convs its output reaches (None: the function's output)


def choose_pixel_convs(func: Any, lanes: int, channel_width: Callable[[int], int]) -> set[Any]:
    """The weights (constants) of the NCHW convs of a Relax function that run pixel-vectorised.

    A conv qualifies by `prefers_pixel_vectors`; it is kept when the FMA cycles its pixel vectors
    save pay the transposes it causes (`TRANSPOSE_CYCLES` per element): its input's, where a conv
    it reads from (through any other ops) stays NHWC, its output's, where a conv it feeds does.
    Dropping one conv can make its neighbours' transposes necessary, so this repeats until nothing
    changes. A chain of such convs pays nothing between its links (slim ResNet-20 70 %'s 32x32
    stage); a lone 1x1 projection between NHWC depthwise convs pays both ways (MobileNetV2 70 %'s
    10 -> 5 at 112x112: 85 us of transposes for 13 us saved, measured 1.29x slower as a whole).
    """
    from tvm import relax

    made: dict[Any, Any] = {}   # var -> the call binding it
    users: dict[Any, list[Any]] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            if isinstance(binding.value, relax.Call):
                made[binding.var] = binding.value
                for arg in binding.value.args:
                    if isinstance(arg, relax.Var):
                        users.setdefault(arg, []).append(binding.var)
    convs: dict[Any, _Conv] = {}
    for var, call in made.items():
        info = pixel_candidate(call, lanes, channel_width)
        if info is not None:
            convs[var] = _Conv(call, *info, [], [])
    outputs = set(_vars(func.body.body))

    def is_conv(var: Any) -> bool:  # any conv: those not in `convs` stay NHWC
        return var in made and getattr(made[var].op, "name", None) == "relax.nn.conv2d"

    def reaches_back(var: Any, seen: set) -> list[Any]:
        if var not in made or is_conv(var):
            return [var if var in made else None]
        found = []
        for arg in made[var].args:
            if isinstance(arg, relax.Var) and arg not in seen:
                seen.add(arg)
                found += reaches_back(arg, seen)
        return found

    def reaches_forward(var: Any, seen: set) -> list[Any]:
        found = [None] if var in outputs else []
        for user in users.get(var, []):
            if user in seen:
                continue
            seen.add(user)
            found += [user] if is_conv(user) else reaches_forward(user, seen)
        return found

    for var, conv in convs.items():
        data = conv.call.args[0]
        conv.before = reaches_back(data, {data}) if isinstance(data, relax.Var) else [None]
        conv.after = reaches_forward(var, {var})
    chosen = set(convs)
    changed = True
    while changed:
        changed = False
        for var in list(chosen):
            conv = convs[var]
            cost = (conv.in_elements * any(n is not None and n not in chosen for n in conv.before)
                    + conv.out_elements * any(n is not None and n not in chosen for n in conv.after))
            if conv.gain <= TRANSPOSE_CYCLES * cost:
                chosen.discard(var)
                changed = True
    return {convs[var].call.args[1] for var in chosen}


def _vars(expr: Any) -> list[Any]:
    from tvm import relax

    if isinstance(expr, relax.Var):
        return [expr]
    if isinstance(expr, relax.Tuple):
        return [v for field in expr.fields for v in _vars(field)]
    return []


def pixel_candidate(call: Any, lanes: int, channel_width: Callable[[int], int]) -> tuple[float, int, int] | None:
    """(FMA cycles saved, input elements, output elements) of an NCHW conv2d call with a constant
    OIHW weight that `prefers_pixel_vectors`, else None."""
    import math

    from rwdeploy.runtime.tvm_fold import constant_value, static_shape

    if getattr(call.op, "name", None) != "relax.nn.conv2d":
        return None
    attrs = call.attrs
    out_shape, in_shape = static_shape(call), static_shape(call.args[0])
    weight = constant_value(call.args[1])
    if (attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or attrs.out_layout != "NCHW"
            or out_shape is None or in_shape is None or len(out_shape) != 4 or weight is None
            or call.ty.dtype != "float32"):
        return None
    channels, height, width = out_shape[1], out_shape[2], out_shape[3]
    if not prefers_pixel_vectors(channels, width, lanes=lanes, channel_width=channel_width(channels),
                                 out_height=height,
                                 stride=tuple(int(v) for v in attrs.strides),
                                 dilation=tuple(int(v) for v in attrs.dilation), groups=int(attrs.groups)):
        return None
    macs = math.prod(out_shape) * math.prod(weight.shape[1:])
    by_channels = _filled(channels, channel_width(channels), lanes)
    by_pixels = _pixel_fill(height, width, lanes, channels)
    gain = macs / (2 * lanes) * (1 / by_channels - 1 / by_pixels)
    return gain, math.prod(in_shape), math.prod(out_shape)


def flat_width(out_height: int, out_width: int, lanes: int) -> int:
    """The output map as computed by the flat kernel (`conv2d_nchw_flat`): all its pixels in
    whole vectors of `lanes`, one more where their count (over `FLAT_VECTORS`) has no divisor
    of 2 to `FLAT_VECTORS` to tile by (a 10x10 map: 7 vectors could only be tiled one at a
    time, 5 channels x 1 vector; 8 are tiled 4 x 5)."""
    vectors = -(-(out_height * out_width) // lanes)
    if vectors > FLAT_VECTORS and largest_divisor(vectors, FLAT_VECTORS) < 2:
        vectors += 1
    return vectors * lanes


def uses_flat_map(out_height: int, out_width: int, lanes: int, out_channels: int) -> bool:
    """Whether a pixel-vectorised conv runs on its flattened map rather than by rows: its map
    fills vectors `MARGIN` times better that way (an 8x8 map: 4 whole vectors, against a
    half-register vector per row), by enough to pay for copying each tap's inputs.

    The copy writes (input channels x taps) elements per output pixel, `FLAT_COPY_CYCLES` each,
    where the FMAs take that times the output channels / (2 x `lanes` x the fraction filled)
    cycles (two FMA pipes): the cycles saved must exceed the copy's. Slim ResNet-20 70 %'s
    19 channels at 8x8 (1 -> 0.5 cycles per lane pair) pass; slim LeNet-5 70 %'s 5 channels
    at 10x10 (0.625 -> 0.78 filled) do not, and ran 1.15x slower flat."""
    pixels = out_height * out_width
    by_rows = _filled(out_width, _row_width(out_width, lanes), lanes)
    by_map = _filled(pixels, flat_width(out_height, out_width, lanes), lanes)
    saved = out_channels * (1 / by_rows - 1 / by_map)
    return by_map >= MARGIN * by_rows and saved / (2 * lanes) >= FLAT_COPY_CYCLES


def conv2d_nchw_flat(data: Any, weight: Any, strides: tuple[int, int], padding: tuple[int, int, int, int],
                     lanes: int, channels: int) -> Any:
    """NCHW convolution (groups 1) over the flattened output map: the taps' inputs copied once
    (`PIXEL_PAD`, zero where a tap reads padding) so that a tap of consecutive output pixels is
    a vector load whatever the row width; the map's pixels computed in whole vectors
    (`flat_width`), the extras and the zero channels (`tiled_channels`) dropped after
    (`PIXEL_KEPT`).

    Stride 1 copies the input once per column tap ([n, c, rw, row, x]; a row tap is an offset of
    whole rows), stride 2 once per tap ([n, c, rh, rw, y, x]). The per-tap copy of a stride-1
    layer (9 copies of the input) had slim ResNet-20 70 %'s 19 x 8x8 stage reading its taps from
    L2 (44 KB of copies with 14 KB of weights); with 3 copies the whole model ran 0.93x the time
    (ResNet-56 0.91x), interleaved on the Xeon."""
    from tvm import te, tirx

    n, ci, h, w = (int(v) for v in data.shape)
    computed, _, kh, kw = (int(v) for v in weight.shape)
    sh, sw = strides
    top, left, bottom, right = padding
    oh, ow = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
    flat = flat_width(oh, ow, lanes)
    rows = -(-flat // ow)   # the copy's rows: whole output rows covering the computed pixels
    rc, rh, rw = te.reduce_axis((0, ci), "rc"), te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")

    def inside(yi: Any, xi: Any) -> Any:
        return tirx.all(yi >= 0, yi < h, xi >= 0, xi < w)

    zero = tirx.const(0.0, data.dtype)
    if sh == 1:
        # one copy per column tap: a row tap is then an offset of whole rows in the same copy
        # (a third of the copy, which stays in L1 with the weights where 9 did not)
        def shifted(i: Any, c: Any, rw_: Any, y: Any, x: Any) -> Any:
            yi, xi = y - top, x * sw + rw_ - left
            return tirx.if_then_else(inside(yi, xi), data[i, c, yi, xi], zero)

        taps = te.compute((n, ci, kw, rows + kh - 1, ow), shifted, name=PIXEL_PAD)
        out = te.compute((n, computed, flat),
                         lambda i, o, p: te.sum(taps[i, rc, rw, p // ow + rh, p % ow] * weight[o, rc, rh, rw],
                                                axis=[rc, rh, rw]),
                         name=PIXEL_CONV)
    else:
        def tap_value(i: Any, c: Any, rh_: Any, rw_: Any, y: Any, x: Any) -> Any:
            yi, xi = y * sh + rh_ - top, x * sw + rw_ - left
            return tirx.if_then_else(inside(yi, xi), data[i, c, yi, xi], zero)

        taps = te.compute((n, ci, kh, kw, rows, ow), tap_value, name=PIXEL_PAD)
        out = te.compute((n, computed, flat),
                         lambda i, o, p: te.sum(taps[i, rc, rh, rw, p // ow, p % ow] * weight[o, rc, rh, rw],
                                                axis=[rc, rh, rw]),
                         name=PIXEL_CONV)
    return te.compute((n, channels, oh, ow), lambda i, o, y, x: out[i, o, y * ow + x], name=PIXEL_KEPT)


def conv2d_nchw_pixels(data: Any, weight: Any, strides: tuple[int, int], padding: tuple[int, int, int, int],
                       lanes: int, channels: int) -> Any:
    """NCHW convolution (groups 1) with an OIHW weight whose first `channels` filters are the
    layer's (the rest zero: `tiled_channels`), its output rows computed in whole vectors
    (`_row_width`), the extra columns and channels dropped after (`PIXEL_KEPT`).

    The input is copied once, zero-padded, into `PIXEL_PAD` with its columns split by phase:
    [n, c, x % stride, y, x // stride]. A tap of a strided conv then reads, for consecutive
    outputs, consecutive elements of one phase: a vector load, where the columns as given would
    be a gather (stride 1: one phase, the padded input as it is)."""
    from tvm import te, tirx

    n, ci, h, w = (int(v) for v in data.shape)
    computed, _, kh, kw = (int(v) for v in weight.shape)
    sh, sw = strides
    top, left, bottom, right = padding
    oh, ow = (h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1
    row = _row_width(ow, lanes)
    # every computed column's taps: x + rw // sw for x < row, in each of the sw phases
    columns = row + (kw - 1) // sw

    def padded_value(i: Any, c: Any, phase: Any, y: Any, j: Any) -> Any:
        x = j * sw + phase
        inside = tirx.all(y >= top, y < h + top, x >= left, x < w + left)
        return tirx.if_then_else(inside, data[i, c, y - top, x - left], tirx.const(0.0, data.dtype))

    padded = te.compute((n, ci, sw, h + top + bottom, columns), padded_value, name=PIXEL_PAD)
    rc, rh, rw = te.reduce_axis((0, ci), "rc"), te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    out = te.compute((n, computed, oh, row),
                     lambda i, o, y, x: te.sum(padded[i, rc, rw % sw, y * sh + rh, x + rw // sw]
                                               * weight[o, rc, rh, rw], axis=[rc, rh, rw]),
                     name=PIXEL_CONV)
    if row == ow and computed == channels:
        return out
    return te.compute((n, channels, oh, ow), lambda i, o, y, x: out[i, o, y, x], name=PIXEL_KEPT)


def interior_columns(sch: Any, block: Any) -> tuple[int, int] | None:
    """The range [start, stop) of a padded copy's innermost loop over which every element it
    writes is read from its input (no tap reaches the padding), or None where the copy's
    innermost index does not run along the input's rows one to one (a strided phase)."""
    import tvm
    from tvm.tirx.analysis import undefined_vars

    stmt = sch.get(block)
    loops = sch.get_loops(block)
    # the loops above a partition of an outer axis (`vectorize_padded_copy`) are outside the
    # block's scope: only the innermost must be the column's
    if (len(stmt.reads) != 1 or not loops
            or int(sch.get(loops[-1]).extent) != int(stmt.iter_vars[-1].dom.extent)):
        return None
    region = stmt.reads[0]
    width = int(region.source.ty.shape[-1])
    column = stmt.iter_vars[-1].var
    analyzer = tvm.sym.Analyzer()
    for iv in stmt.iter_vars:
        analyzer.bind(iv.var, tvm.ir.Range.from_min_extent(iv.dom.min, iv.dom.extent))
    offset = analyzer.simplify(region.region[-1].min - column)
    if any(v.same_as(column) for v in undefined_vars(offset)):
        return None
    bound = analyzer.const_int_bound(offset)
    extent = int(sch.get(loops[-1]).extent)
    start, stop = max(0, -int(bound.min_value)), min(extent, width - int(bound.max_value))
    return (start, stop) if start < stop else None


def vectorize_padded_copy(sch: Any, block: Any, lanes: int) -> bool:
    """Split a `PIXEL_PAD` copy's rows into the padding before, the columns read from the input
    and the padding after (`interior_columns`), and vectorise the middle part, whose bounds
    check then folds away: the copy ran one select per element. The middle goes as whole
    vectors and then power-of-two pieces (`vector_pieces`: 28 = 16 + 8 + 4; a piece of one
    stays scalar): an odd-width LLVM vector would be split into masked pieces. Slim ResNet-20 /
    ResNet-56 70 % on the Xeon, whole models interleaved: 0.981-0.988x the time at batch 1 and 8.

    The flat kernel's stride-1 copy (`conv2d_nchw_flat`: [n, c, rw, y, x]) shifts its columns by
    the column tap `rw`, so no range of columns is interior for every tap: its `rw` loop is
    first split into one loop per tap, each with its own interior (a 3x3 conv on an 8x8 map:
    [1, 8), [0, 8), [0, 7)). It had run as scalar copies, a fifth of a 19 -> 19 conv at 8x8
    (slim ResNet-20 70 %'s last stage); that conv alone 24.4 -> 22.2 us at batch 8, 2.56 -> 2.48
    at batch 1, its FMAs now ~80 % of its time; whole slim ResNet-20 / ResNet-56 70 %, old and
    new interleaved, 0.991-1.007x (noise). Returns whether any part was vectorised."""
    tap = _column_tap_loop(sch, block)
    if tap is None:
        return _vectorize_interior(sch, block, lanes)
    extent = int(sch.get(tap).extent)
    parts = sch.loop_partition(tap, [1] * (extent - 1) + [None])
    done = [_vectorize_interior(sch, sch.get_child_blocks(part)[0], lanes) for part in parts]
    return any(done)


def _column_tap_loop(sch: Any, block: Any) -> Any | None:
    """The loop of a copy's outer axes whose variable shifts the column it reads (the flat
    copy's column tap), where it is the only one and at most `MAX_COLUMN_TAPS` long; else None."""
    import tvm
    from tvm.tirx.analysis import undefined_vars

    stmt = sch.get(block)
    loops = sch.get_loops(block)
    if len(stmt.reads) != 1 or len(loops) != len(stmt.iter_vars):
        return None
    column = stmt.iter_vars[-1].var
    offset = tvm.sym.Analyzer().simplify(stmt.reads[0].region[-1].min - column)
    free = undefined_vars(offset)
    if any(v.same_as(column) for v in free):   # a strided phase: no interior to find
        return None
    shifting = [k for k, iv in enumerate(stmt.iter_vars[:-1]) if any(v.same_as(iv.var) for v in free)]
    if len(shifting) != 1:
        return None
    loop = loops[shifting[0]]
    extent = int(sch.get(loop).extent)
    return loop if 1 < extent <= MAX_COLUMN_TAPS else None


def _vectorize_interior(sch: Any, block: Any, lanes: int) -> bool:
    columns = interior_columns(sch, block)
    if columns is None:
        return False
    start, stop = columns
    pieces = vector_pieces(stop - start, lanes)
    if pieces[0] < 2:
        return False
    loop = sch.get_loops(block)[-1]
    extent = int(sch.get(loop).extent)
    factors: list[int | None] = ([start] if start else []) + pieces + ([None] if stop < extent else [])
    factors[-1] = None   # loop_partition takes the rest as the last part, not a sum equal to the extent
    parts = sch.loop_partition(loop, factors) if len(factors) > 1 else [loop]
    for part, size in zip(parts[1 if start else 0:], pieces):
        if size > 1:
            sch.vectorize(part)
    return True


def pixel_conv_tile(extents: list[int], row: int, lanes: int,
                    registers: int = 32) -> tuple[tuple[int, ...], int, int]:
    """(tile over the (N, C, H) axes, row lanes per tile, vector width) of a `PIXEL_CONV` stage
    with these (N, C, H) extents and computed row width: the whole row, in vectors of `lanes`
    (or one narrower one), by the most output channels (each loaded input vector serves them
    all), then rows, that keep the tile within `ACCUMULATORS` (`ACCUMULATORS_16` with 16
    vector registers).

    A flat stage (`conv2d_nchw_flat`: (N, C) extents, `row` the whole computed map) is tiled
    in pieces of up to `FLAT_VECTORS` vectors of its map by the most channels."""
    width = min(row, lanes)
    accumulators = ACCUMULATORS if registers >= 32 else ACCUMULATORS_16
    if len(extents) == 2:
        vectors = largest_divisor(row // width, FLAT_VECTORS)
        channels = largest_divisor(extents[1], max(1, accumulators // vectors))
        return (1, channels), vectors * width, width
    vectors = row // width
    room = max(1, accumulators // vectors)
    channels = largest_divisor(extents[1], room)
    rows = largest_divisor(extents[2], max(1, room // channels))
    return (1, channels, rows), row, width
