"""CPU schedules for the Relax build: the hot kernels are tiled and vectorised, not left naive.

TVM 0.27's default CPU pipeline legalises every op into plain loop nests and schedules none of
them (a dense layer runs ~100x slower than torch). This module supplies the missing step:

1. `prepare_passes`: fold BatchNorm into the preceding conv, turn convolutions into NHWC
   data / HWIO weights (output channels innermost and contiguous, in the weights as well),
   and fold the constant weight transforms at compile time.
2. `ScheduleCPU`: for every fused PrimFunc with one reduction block whose innermost spatial
   axis is the output channel (conv2d_nhwc, matmul/dense, channel-last pooling) apply a
   register-blocked schedule: output channels split into a vector tile, the output width
   into an unrolled row tile, reductions outside the tile, the accumulator in a local buffer,
   the fused epilogue (bias, residual add, ReLU) computed on the tile, outer loops parallel.
   Functions it does not recognise are left to LLVM's loop vectoriser, and functions already
   scheduled (e.g. from a MetaSchedule database) are never touched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from rwdeploy.runtime.tvm_loops import largest_divisor, vector_pieces
from rwdeploy.runtime.tvm_pixel_conv import (PIXEL_CONV, PIXEL_PAD, choose_pixel_convs, pixel_conv_tile,
                                             vectorize_padded_copy)
from rwdeploy.runtime.tvm_row_winograd import (ROW_WINO_INPUT, ROW_WINO_OUTPUT, schedule_row_winograd_input,
                                               schedule_row_winograd_output)
from rwdeploy.runtime.tvm_split_reduction import split_one_pixel_reduction
from rwdeploy.runtime.tvm_weight_prefetch import ANNOTATION as PREFETCH_ANNOTATION
from rwdeploy.runtime.tvm_winograd import (WINO_GEMM, WINO_INPUT, WINO_OUTPUT, output_tile, schedule_winograd_input,
                                           schedule_winograd_output)

SPATIAL, REDUCE = 0, 2  # tirx IterVar kinds
# Names of the compute stages `tvm_legalize` emits (packed-weight conv, depthwise conv, dense,
# and their padding stage); `schedule_reduction` recognises the stages by them.
CONV = "rw_conv2d_nhwc_packed"
DEPTHWISE = "rw_depthwise_conv2d_nhwc"
DENSE = "rw_dense_packed"
PAD = "rw_pad"
# an NCHW input read as NHWC by a conv (`tvm_input_layout`): inlined into its reader
NCHW_VIEW = "rw_nchw_as_nhwc"
STAGES = (CONV, DEPTHWISE, DENSE, PIXEL_CONV, WINO_GEMM)
# Accumulator vectors of one register tile, by the ISA's vector registers (32 with AVX-512
# and NEON, 16 with AVX2/SSE): the rest hold the weight vectors and the broadcast input.
ACCUMULATORS = {32: 24, 16: 12}
# With AVX-512 a broadcast input can be the FMA's memory operand, so a tile may take all but
# the weight vectors and one spare register: 64 channels at 28x28 get 2 vectors x 14 pixels
# (4 x 4 within 24); dense ResNet-18 at 112x112, batch 1, interleaved: 7.38 -> 7.09 ms and
# 7.65 -> 7.25 (ONNX Runtime 7.29, 7.49); VGG-16-BN 1 % faster, ResNet-20 and MobileNetV2
# unchanged.
AVX512_ACCUMULATORS = 28
# Independent FMAs per reduction step that cover the FMA latency (4 cycles x 2 pipes, with
# slack): a tile with fewer stalls on its own accumulators.
LATENCY_FMAS = 16
STACK = "global"  # storage scope of a tile's accumulators (see `schedule_reduction`)
# TVM puts a "global" buffer on the stack only when it is smaller than this (its runtime's
# kMaxStackAlloca); a larger one is a TVMBackendAllocWorkspace call per tile.
STACK_BYTES = 1024
# Reductions shorter than this (inputs per output: Cin x kernel taps) keep their tile's
# accumulators under `STACK_BYTES` (see `register_tile`).
SHORT_REDUCTION = 64
DEPTHWISE_ROW_TILE = 4  # output pixels (along a row) per depthwise tile
# Weights up to this size stay cached while all output pixels stream past them; larger ones
# (VGG's 3x3x512x512, a classifier) are read once instead, one output-channel tile at a time,
# with all pixels computed against that tile before the next.
CACHED_WEIGHT_BYTES = 1 << 20
# Weights larger than this come from L2 for every pixel tile: on a map of 16-28 pixels (slim
# ResNet-18 70 %'s 154 channels at 4x4, 887 KB of weights) one tile of the whole map by one
# channel vector reads them once, where 2 vectors x 8 pixels read them twice; interleaved on
# the Xeon, batch 1: the whole slim model 0.957-0.965x the time.
L2_WEIGHT_BYTES = 256 << 10
# A streamed weight (larger than that, with 512-bit vectors) is read as this many concurrent
# sequential streams per vector of the tile (see `streams_weights`).
WEIGHT_STREAMS = 4
# A conv with few input channels reads its padding in place where it reads each input at most
# this many times (see `inlines_padding`).
INLINED_READS = 4


def vector_width(channels: int, lanes: int) -> int:
    """Lanes of the vectors an output-channel tile is made of: a whole register where that
    divides `channels`, else a half or a quarter of one (8 or 4 floats with AVX-512: 24
    channels are three 8-float vectors rather than two 16-float ones with 8 wasted), else the
    largest divisor <= two registers as one odd-width vector (a predicate in the vector loop
    measured slower than that)."""
    for width in (lanes, lanes // 2, lanes // 4):
        if width >= 4 and channels % width == 0:
            return width
    return largest_divisor(channels, 2 * lanes)


@dataclass(frozen=True)
class RegisterTile:
    """One register tile of accumulators: `pixels` per output pixel axis (outer to inner) by
    `channels` output channels, in vectors of `width` lanes."""

    pixels: tuple[int, ...]
    channels: int
    width: int

    @property
    def vectors(self) -> int:
        return self.channels // self.width


def register_tile(pixel_extents: list[int], channels: int, lanes: int, registers: int = 32,
                  weight_bytes: int = 0) -> RegisterTile:
    """The register tile of a convolution / dense layer with this output shape.

    Per reduction step the tile loads one weight vector per channel vector, broadcasts one
    input per pixel and issues pixels x vectors FMAs. The choice keeps at least 16
    accumulators where the map allows (to cover the FMA latency), then loads no more than
    FMAs (two of each per cycle on a core with two 512-bit FMA pipes), then the most pixels:
    a tile reads its weights once per step whatever its width, so weight bytes per FMA are
    64 / pixels, and a conv whose weights exceed L1 streams them from L2 for every tile (a VGG
    3x3 conv with 64 channels at 32x32: 4 channel vectors x 4 pixels 98 GMAC/s, 2 x 8 pixels
    106). `tvm_legalize` packs constant weights in blocks of the channel tile.

    Weights larger than `L2_WEIGHT_BYTES` on an output of 16-28 pixels (all images) are read
    from L2 by every pixel tile: the tile is then the whole map by one vector, which reads them
    once.

    Weights larger than `CACHED_WEIGHT_BYTES` (`weight_bytes`) come from beyond L2: with
    512-bit vectors the tile there has, after the 16 accumulators, two channel vectors where
    the channels allow, each reading its own streams of weights (`streams_weights`).

    With narrower vectors (NEON, AVX2) weight bytes per FMA are 16 or 32 / pixels and the tile
    keeps the most FMAs per load after the 16 accumulators: the most-pixels order made dense
    ResNet-18 on the arm target 796 M -> 874 M aarch64 instructions per inference (emulated
    device), and it was measured faster only on 512-bit cores.

    A tile of 16 or more 512-bit accumulators is 1 KB or more, which TVM allocates with a
    workspace call per tile (`STACK_BYTES`): with allocation, zeroing, stores and release it
    costs about what a few dozen FMAs do. Where the reduction is short (`SHORT_REDUCTION`,
    inputs per output = weight_bytes / 4 / channels) the tile stays under it: MobileNetV2's
    1x1 convs (5-96 inputs) on the Xeon, interleaved, batch 1: slim 70 % 1.11 -> 0.98-1.05 ms,
    dense 6.18 -> 5.83 ms; a cap for every layer instead made dense VGG-16-BN 13 % and
    ResNet-18 6 % slower, their 3x3 convs (hundreds of inputs) amortise the call.

    Pixel tiles are runs of whole rows (`pixel_tile`), except where no run of rows reaches
    `LATENCY_FMAS` with any channel tile: then any box of the map's axes (`pixel_box`), so a
    7x7 map at batch 8 is not tiled 7 pixels at a time.
    """
    width = vector_width(channels, lanes)
    wide = lanes >= 16 and registers >= 32
    budget = AVX512_ACCUMULATORS if wide else ACCUMULATORS.get(registers, 12)
    streamed = streams_weights(weight_bytes, lanes)
    map_pixels = math.prod(pixel_extents)
    if (wide and len(pixel_extents) >= 3 and 16 <= map_pixels <= budget and not streamed
            and weight_bytes > L2_WEIGHT_BYTES):
        # the whole map by one vector: each weight vector is read from L2 once per inference
        return RegisterTile(tuple(pixel_extents), width, width)
    tile = _best_tile(pixel_extents, channels, width, lanes, registers, budget, weight_bytes, pixel_tile)
    if lanes >= 16 and math.prod(tile.pixels) * tile.vectors < LATENCY_FMAS and len(pixel_extents) > 1:
        # no run of rows covers the FMA latency (7 pixels of a 7x7 map by one vector): a box
        # across rows or images may (`pixel_box`; measured on 512-bit cores only)
        tile = _best_tile(pixel_extents, channels, width, lanes, registers, budget, weight_bytes, pixel_box)
    return tile


def _best_tile(pixel_extents: list[int], channels: int, width: int, lanes: int, registers: int,
               budget: int, weight_bytes: int, tiler: Callable[[list[int], int], list[int]]) -> RegisterTile:
    """`register_tile`'s choice among 1-4 channel vectors, each with `tiler`'s pixel tile."""
    wide = lanes >= 16 and registers >= 32
    streamed = streams_weights(weight_bytes, lanes)
    best: tuple[tuple[Any, ...], RegisterTile] | None = None
    for vectors in (4, 3, 2, 1):
        if channels % (vectors * width):
            continue
        most = min(budget, registers - 1 - vectors) // vectors if wide else budget // vectors
        if weight_bytes and weight_bytes // (4 * channels) < SHORT_REDUCTION:
            most = min(most, (STACK_BYTES - 1) // (vectors * width * 4))
        pixels = tiler(pixel_extents, max(1, most))
        count = math.prod(pixels)
        fmas, loads = count * vectors, count + vectors
        if streamed:
            score = (min(fmas, LATENCY_FMAS), vectors == 2, count, fmas / loads)
        elif lanes >= 16:
            score = (min(fmas, LATENCY_FMAS), loads <= fmas, count, fmas / loads)
        else:
            score = (min(fmas, LATENCY_FMAS), fmas / loads)
        if best is None or score > best[0]:
            best = (score, RegisterTile(tuple(pixels), vectors * width, width))
    assert best is not None  # one vector always divides the channels (`vector_width`)
    return best[1]


def streams_weights(weight_bytes: int, lanes: int) -> bool:
    """Whether a layer's weights are read as several concurrent streams: weights too large to
    stay cached between inferences (`CACHED_WEIGHT_BYTES`), on a 512-bit core.

    Such a layer is bound by how fast one core pulls its weights from L3 / DRAM, and that is
    bound by the misses in flight, more of them with more sequential streams to prefetch. The
    weights are packed per channel vector (`weight_block`), so each vector of the tile reads
    its own stream, and the innermost reduction loop is split into `WEIGHT_STREAMS` interleaved
    parts: a two-vector tile reads 8 streams. Interleaved on the Xeon (batch 1, 1 thread, each
    run its own period): ResNet-18's layer3 + layer4 (7x7 and 4x4 maps) 4.7-5.9 -> 3.9-4.0 ms
    (ONNX Runtime 4.2-4.4; one stream per tile, 1 vector x 16 pixels, before), VGG-16-BN
    whole 9.4 -> 6.4 ms (ONNX Runtime 6.5), ResNet-18 at 112x112 11.0 -> 8.2 (7.9); 2 streams
    (2 vectors) 4.1-4.5, 4 streams of 1 vector 4.3, 16 streams 4.3. Each stream is also
    prefetched ahead in software (`tvm_weight_prefetch`).
    """
    return lanes >= 16 and weight_bytes > CACHED_WEIGHT_BYTES


def streamed_reduction(inputs: int, weight_bytes: int, lanes: int) -> int:
    """The input channels a conv computes over: its own, or where its weights are streamed the
    next multiple of `WEIGHT_STREAMS` (zero weights against zero input channels), so that the
    reduction splits into the streams. Unaligned counts are what a slim model has by default:
    slim VGG-16-BN 30 % `--align off`'s 358 -> 358 conv at 4x4 ran in one stream, 0.70 ms at
    batch 1 inside the model (`tvm_profile`) against 0.28 for the 360-channel build that
    `--align 8` makes; the whole slim model 0.73x the time with the padding
    (`benchmarks/streamed_weights.py --rate 0.3 --unpadded`)."""
    if not streams_weights(weight_bytes, lanes):
        return inputs
    return -(-inputs // WEIGHT_STREAMS) * WEIGHT_STREAMS


def weight_block(tile: RegisterTile, weight_bytes: int, lanes: int) -> int:
    """Output channels per contiguous block of a packed weight: the tile's (one block per tile
    and reduction step), or one vector's where the weights are streamed (a stream per vector)."""
    return tile.width if streams_weights(weight_bytes, lanes) else tile.channels


def inlines_padding(padded_shape: list[int], pixel_extents: list[int], reduction: int, lanes: int) -> bool:
    """Whether a (non-depthwise) conv reads its zero padding in place, a bounds check per input
    it broadcasts, instead of from a padded copy of its NHWC input (`padded_shape`, channels
    last): where the input has fewer channels than a 512-bit vector, so that the copy cannot
    move whole vectors of them (a scalar select per element), and the conv reads each input at
    most `INLINED_READS` times (output pixels x taps over input pixels, from its `pixel_extents`
    and `reduction` = taps x channels), so that the checks cost less than the copy: a 3x3
    stride-2 stem (2.2 reads), not a 3x3 stride-1 one (8; measured no faster) nor ResNet's 7x7
    stride-2 one (11; 2-9 % slower at batch 8). MobileNetV2's 3 -> 32 stem at 224 x 224 on the
    Xeon: 214 -> 145 us a call (`tvm_profile`); the slim 70 % model 0.89-0.90x the time, the
    dense one 0.97-1.00x (`benchmarks/stem_input.py`); with AVX2 (Zen 3) see
    `tvm_input_layout.folds_transpose`. NEON keeps the copy (not measured)."""
    channels = padded_shape[-1]
    if lanes < 8 or channels >= lanes:
        return False
    reads = math.prod(pixel_extents) * (reduction // channels) / math.prod(padded_shape[:-1])
    return reads <= INLINED_READS


def depthwise_tile(pixel_extents: list[int], channels: int, lanes: int) -> RegisterTile:
    """The tile of a depthwise convolution: each input is loaded, not broadcast, so there is
    no reuse across the tile to gain from a large one; two vectors of channels by a few
    pixels of one row keep the taps' loads independent without spilling."""
    width = vector_width(channels, lanes)
    vectors = 2 if channels % (2 * width) == 0 and 2 * width <= 2 * lanes else 1
    pixels = [1] * (len(pixel_extents) - 1) + [largest_divisor(pixel_extents[-1], DEPTHWISE_ROW_TILE)]
    return RegisterTile(tuple(pixels), vectors * width, width)


def pixel_tile(extents: list[int], max_pixels: int) -> list[int]:
    """The register tile over the output's pixel axes (outer to inner, e.g. N, H, W): the
    largest rectangle of at most `max_pixels` that divides the map evenly: a divisor of the
    innermost extent, or whole rows and a divisor of the next extent, and so on (on a 2x2 map
    at batch 8, two whole images). Tiles stay rectangles because the fused epilogue is placed
    per tile by its bounding box."""
    best, best_size, inner = [1] * len(extents), 1, 1
    for axis in range(len(extents) - 1, -1, -1):
        d = largest_divisor(extents[axis], max(1, max_pixels // inner))
        if inner * d > best_size:
            best, best_size = [1] * axis + [d] + extents[axis + 1:], inner * d
        inner *= extents[axis]
        if inner > max_pixels:
            break
    return best


def pixel_box(extents: list[int], max_pixels: int) -> list[int]:
    """The register tile over the output's pixel axes as any box of at most `max_pixels`
    dividing the map evenly: a divisor of every extent, the most pixels, then the longest runs
    along the inner axes. Where `pixel_tile`'s rows cannot fill a tile, a box can: a 7x7 map at
    batch 8 by one channel vector is tiled 4 images x 1 row x 7 (28 FMAs per step) rather than
    one row of 7, which leaves the FMA pipes waiting on their own latency. Slim ResNet-18 70 %
    at batch 8 (80 channels at 7x7), per kernel on the Xeon: 0.376 -> 0.314 ms a conv; the
    whole model 0.976x the time, interleaved (`benchmarks/pass_ablation.py --pass box-tile`)."""
    boxes: list[list[int]] = [[]]
    for extent in extents:
        boxes = [box + [d] for box in boxes for d in range(1, extent + 1)
                 if extent % d == 0 and math.prod(box) * d <= max_pixels]
    return max(boxes, key=lambda box: (math.prod(box), tuple(reversed(box))))


def _compute_stages(func: Any) -> list[str]:
    """The conv / depthwise / dense stages (`STAGES`) among `func`'s blocks."""
    from tvm import s_tir

    try:
        sch = s_tir.Schedule(func)
        names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    except Exception:  # not a function with blocks (a hand-written kernel)
        return []
    return [n for n in names if n in STAGES]


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:200]}" if text else type(err).__name__


def _has_loop_schedule(sch: Any) -> bool:
    """True when some loop is already parallel, vectorised, unrolled or bound."""
    from tvm.tirx import ForKind

    seen = set()
    pending = list(sch.get_child_blocks(sch.get_sblock("root")))
    while pending:
        block = pending.pop()
        for loop in sch.get_loops(block):
            if sch.get(loop).kind != ForKind.SERIAL:
                return True
        for child in sch.get_child_blocks(block):
            if id(child) not in seen:
                seen.add(id(child))
                pending.append(child)
    return False


def _weight_bytes(block: Any, pixel_vars: list[Any]) -> int:
    """Bytes of the operands the block reads without indexing by output pixel (the weights)."""
    from tvm.tirx.analysis import undefined_vars

    pixel = {id(v) for v in pixel_vars}
    total = 0
    for region in block.reads:
        used = [v for r in region.region for v in undefined_vars(r.min)]
        if not any(id(v) in pixel or any(v.same_as(p) for p in pixel_vars) for v in used):
            n = 1
            for d in region.source.ty.shape:
                n *= int(d)
            total += n * 4
    return total


def schedule_reduction(func: Any, lanes: int, registers: int = 32) -> Any | None:
    """The scheduled PrimFunc, or None when `func` does not have the recognised shape.

    The shape: one reduction block whose spatial axes are output pixels (any number, e.g.
    N, H, W or a batch) then output channels. The tile is `pixel_tile` x `channel_tile`
    accumulators, reduction loops outside it; output-channel tiles outermost when the
    weights exceed `CACHED_WEIGHT_BYTES`, else innermost of the tile loops.
    """
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    if _has_loop_schedule(sch):  # a hand-written kernel (e.g. the sparse ones): keep it
        return None
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = [b for b in blocks
                  if any(iv.iter_type == REDUCE for iv in sch.get(b).iter_vars)]
    if len(reductions) != 1:
        return None
    red = reductions[0]
    for view in blocks:
        if sch.get(view).name_hint == NCHW_VIEW:
            sch.compute_inline(view)
    if sch.get(red).name_hint == DENSE:  # a batch-1 classifier's few chains of FMAs
        channels = int(sch.get(sch.get_loops(red)[-2]).extent)
        red = split_one_pixel_reduction(sch, red, channels // vector_width(channels, lanes))
    block = sch.get(red)
    kinds = [iv.iter_type for iv in block.iter_vars]
    n_spatial = kinds.count(SPATIAL)
    if kinds != [SPATIAL] * n_spatial + [REDUCE] * (len(kinds) - n_spatial) or n_spatial == 0:
        return None
    loops = sch.get_loops(red)
    if len(loops) != len(kinds):
        return None
    extents = [int(sch.get(loop).extent) for loop in loops]
    spatial, reduce = loops[:n_spatial], loops[n_spatial:]
    pixel_vars = [iv.var for iv in block.iter_vars[:n_spatial - 1]]

    # The padding stage: inlined into a depthwise convolution (its few taps per output cannot
    # pay for a copy of the whole input) and into a conv of few input channels (`inlines_padding`),
    # else its own parallel loop nest.
    for producer in sch.get_producers(red):
        name = sch.get(producer).name_hint
        producer_loops = sch.get_loops(producer)
        if name == PAD and (block.name_hint == DEPTHWISE or inlines_padding(
                [int(sch.get(loop).extent) for loop in producer_loops], extents[:n_spatial - 1],
                math.prod(extents[n_spatial:]), lanes)):
            sch.compute_inline(producer)
            continue
        if name == WINO_INPUT:
            schedule_winograd_input(sch, producer, lanes)
        elif name == ROW_WINO_INPUT:
            schedule_row_winograd_input(sch, producer, lanes)
        elif name == PAD and len(producer_loops) == 4:
            _schedule_padding(sch, producer_loops, lanes)
        elif producer_loops:
            sch.parallel(producer_loops[0])
            if name == PIXEL_PAD:
                vectorize_padded_copy(sch, producer, lanes)

    depthwise = block.name_hint == DEPTHWISE
    pixel_extents, channels = extents[:n_spatial - 1], extents[n_spatial - 1]
    weight_bytes = _weight_bytes(block, pixel_vars)
    if block.name_hint == PIXEL_CONV:  # NCHW, vectors along the output row (`tvm_pixel_conv`)
        tile = RegisterTile(*pixel_conv_tile(pixel_extents, channels, lanes, registers))
    elif depthwise:
        tile = depthwise_tile(pixel_extents, channels, lanes)
    else:
        tile = register_tile(pixel_extents, channels, lanes, registers, weight_bytes)
    co_outer, co_inner = sch.split(spatial[-1], [None, tile.channels])
    pix_outer, pix_inner = [], []
    for loop, size in zip(spatial[:-1], tile.pixels):
        o, i = sch.split(loop, [None, size])
        pix_outer.append(o)
        pix_inner.append(i)
    # `pad_channels_pass` padded this layer and its slice back is fused here: a tile's write-back
    # of the last channel tile would carry a predicate (`channel < C`), which TVM scalarises.
    # Such a layer writes back all its channels of a pixel tile at once, in the partitioned
    # loop of `_vectorize_writeback`.
    padded = _output_channels(sch) < channels
    if padded:
        outer = [*pix_outer, co_outer]
    elif depthwise:
        # Output rows outermost, then channel tiles, then the row's pixels: one channel
        # tile of the few input rows a row of taps reads stays in L1 (all channels of
        # them would not).
        outer = [*pix_outer[:-1], co_outer, pix_outer[-1]]
    elif weight_bytes > CACHED_WEIGHT_BYTES:
        # Large weights (VGG's 3x3x512x512, a classifier) are read once: all pixels are
        # computed against one output-channel tile's block before the next.
        outer = [co_outer, *pix_outer]
    else:  # weights stay cached while the pixels stream past them
        outer = [*pix_outer, co_outer]
    # A tile of several vectors is unrolled over vector-wide pieces: LLVM scalarises parts of
    # a 48-lane vector type, it does not split it into three registers.
    vectors = [co_inner] if tile.vectors == 1 else list(sch.split(co_inner, [None, tile.width]))
    streams = []
    if (not depthwise and streams_weights(weight_bytes, lanes) and reduce
            and int(sch.get(reduce[-1]).extent) % WEIGHT_STREAMS == 0):
        # the innermost reduction as WEIGHT_STREAMS interleaved parts, each its own stream
        streams, inner = sch.split(reduce[-1], [WEIGHT_STREAMS, None])
        reduce, streams = [*reduce[:-1], inner], [streams]
        if math.prod(tile.pixels) > 1:
            # each stream's next lines requested ahead of its loads (`tvm_weight_prefetch`);
            # not in a one-pixel tile (a batch-1 dense layer), where each weight vector feeds one
            # FMA, the hardware prefetcher already keeps up with the plain sweep and the extra
            # instructions cost: 1280 -> 1000 and 4096 -> 1024 at batch 1 ran 1.03-1.06x slower
            sch.annotate(inner, PREFETCH_ANNOTATION, 1)
    sch.reorder(*outer, *reduce, *streams, *pix_inner, *vectors)
    unrolled = streams + ([sch.fuse(*pix_inner)] if pix_inner else []) + vectors[:-1]
    # Loop kinds are set while the block still carries its init: after decompose_reduction
    # the update block no longer counts as a reduction and vectorize/parallel refuse it.
    for loop in unrolled:
        sch.unroll(loop)
    if depthwise:
        # A depthwise tile's reduction is its few taps: unrolled, the input a tap shares with
        # its neighbours (stride 1: 3 of a row's 4 pixels) is loaded once.
        for loop in reduce:
            sch.unroll(loop)
    sch.vectorize(vectors[-1])
    chunk = sch.fuse(*(outer[:-1] if padded else outer))
    sch.parallel(chunk)

    # One register tile per parallel iteration (a padded layer's: a pixel tile's channel tiles),
    # its accumulators in a buffer of that tile written back (with the epilogue) right after
    # its reduction. `STACK` scope: TVM lowers a
    # "local" buffer, whatever its size, to a TVMBackendAllocWorkspace call, and a "global"
    # one under 1 KB (every depthwise tile, conv tiles of up to 15 vectors) to a stack array,
    # which LLVM keeps in registers. With workspace accumulators (for a group of tiles, to
    # amortise the call), a depthwise tile stored and reloaded its accumulators at every tap
    # and every tile's write-back re-read them from the group's buffer: MobileNetV2 at batch
    # 1 on the Xeon, interleaved: 6.23 -> 5.66 ms (ONNX Runtime 6.01).
    accumulator = sch.cache_write(red, 0, STACK)
    sch.reverse_compute_at(accumulator, chunk)
    _inline_epilogue(sch, accumulator)
    # a Winograd conv's output transform combines several of M's elements: its own loop nest,
    # the conv's epilogue inlined into it
    if block.name_hint == WINO_GEMM:
        _inline_epilogue(sch, sch.get_sblock(WINO_OUTPUT))
        schedule_winograd_output(sch, lanes, output_tile(block))
    elif _has_block(sch, ROW_WINO_OUTPUT):
        _inline_epilogue(sch, sch.get_sblock(ROW_WINO_OUTPUT))
        schedule_row_winograd_output(sch, lanes)
    init = sch.decompose_reduction(red, reduce[0]) if reduce else None
    if init is not None:
        sch.vectorize(sch.get_loops(init)[-1])
    writeback = sch.get_loops(accumulator)[1:]
    # The write-back unrolled: with every access to the accumulators at a constant offset, LLVM
    # keeps them in registers (`tvm_stack_tiles`) instead of storing the tile and reading it back.
    for loop in writeback[:-1]:
        sch.unroll(loop)
    if writeback and int(sch.get(writeback[-1]).extent) > 1:
        # a flat pixel conv's stage is (N, C, pixels of the map), a row one's (N, C, H, W)
        _vectorize_writeback(sch, accumulator, writeback[-1], tile.width,
                             flat=block.name_hint == PIXEL_CONV and n_spatial == 3)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _has_block(sch: Any, name: str) -> bool:
    return any(sch.get(b).name_hint == name for b in sch.get_child_blocks(sch.get_sblock("root")))


def _inline_epilogue(sch: Any, accumulator: Any) -> None:
    """The elementwise epilogue after a reduction, computed on its tile: each single consumer
    of the accumulator's write-back is inlined into it in turn.

    Where the output is read twice, x * f(x) (hardswish: x * clip(x + 3, 0, 6) / 6 as
    `torch.export` writes it), the branch f's stages are first inlined into their readers, so
    that one consumer reads x twice: the diamond had stopped the inlining, and the conv wrote
    its output and each stage of the epilogue made a pass over it (MobileNetV3's 3 -> 16 stem
    at 224 x 224: 0.23 ms with ReLU6, 0.80 with hardswish)."""
    for _ in range(256):
        consumers = sch.get_consumers(accumulator)
        if len(consumers) == 1:
            try:
                sch.reverse_compute_inline(consumers[0])
            except Exception:  # not inlinable (e.g. a reshape): it stays a separate loop nest
                return
            continue
        merged = False
        for block in consumers:
            if sch.get_consumers(block):   # a branch stage, not an output
                try:
                    sch.compute_inline(block)
                    merged = True
                    break
                except Exception:  # a reduction (e.g. a squeeze-excite pool): the diamond stays
                    continue
        if not merged:
            return


def _schedule_padding(sch: Any, loops: list[Any], lanes: int) -> None:
    """The padded copy of an NHWC input: rows (of all images) parallel, channels in vectors
    (a scalar select per element before: 1-1.5 % of dense ResNet-18 / VGG-16-BN)."""
    n, y, _, c = loops
    sch.parallel(sch.fuse(n, y))
    channels = int(sch.get(c).extent)
    if channels % lanes == 0:
        sch.vectorize(sch.split(c, [None, lanes])[-1] if channels > lanes else c)


def _output_channels(sch: Any) -> int:
    """Channels (last axis) of what the function's last stages (those nothing reads) write."""
    last = [b for b in sch.get_child_blocks(sch.get_sblock("root")) if not sch.get_consumers(b)]
    return min(int(region.source.ty.shape[-1]) for b in last for region in sch.get(b).writes)


def _vectorize_writeback(sch: Any, block: Any, last: Any, width: int, flat: bool = False) -> None:
    """Vectorise the write-back's channel loop.

    Where the output has fewer channels than the tile (`pad_channels_pass` padded the layer and
    the slice back is fused here), the loop carries a predicate `channel < C`; vectorised as
    one loop, TVM scalarises it and LLVM turned it into gathers and scatters (LeNet-5 slim's
    10-channel conv1 at batch 8: 0.072 ms, 0.041 ms unpadded). The loop is partitioned
    instead: whole vectors below C, power-of-two vectors for the rest of C (10 = 8 + 2), none
    with a predicate, and the padding, which writes nothing.
    """
    extent = int(sch.get(last).extent)
    written = sch.get(block).writes
    valid = int(written[0].source.ty.shape[-1]) if len(written) == 1 else extent
    if flat and len(written) == 1:  # a flat pixel conv's tile covers the whole (H, W) map
        valid = math.prod(int(d) for d in written[0].source.ty.shape[2:])
    if valid < extent:
        parts = vector_pieces(valid, width)
        # the padding's part is inferred (TVM wants the given factors to sum below the extent)
        for loop, size in zip(sch.loop_partition(last, parts + [None]), parts):
            lanes = min(size, width)
            if lanes > 1:
                sch.vectorize(sch.split(loop, [None, lanes])[-1] if size > lanes else loop)
        return
    if extent > width and extent % width == 0:
        outer, last = sch.split(last, [None, width])
        sch.unroll(outer)
    sch.vectorize(last)


def vector_registers(target: Any) -> int:
    """Vector registers of the target's ISA: 32 with AVX-512 and on AArch64, else 16."""
    keys = str(target.attrs.get("mtriple", "")) + str(target.attrs.get("mattr", ""))
    return 32 if vector_lanes(target) >= 16 or "aarch64" in keys or "arm64" in keys else 16


def vector_lanes(target: Any) -> int:
    """float32 lanes of the target's widest vector register (16 with AVX-512, 8 with AVX2, 4 with NEON)."""
    import tvm

    codegen = tvm.target.codegen
    try:
        bits = int(codegen.llvm_get_vector_width(target))
        # TVM 0.27 reports 512 for any x86 CPU name (haswell included): ask for the ISA instead
        if bits > 128 and not codegen.target_has_features("avx512f", target):
            bits = 256 if codegen.target_has_features("avx", target) else 128
    except Exception:
        bits = 128
    return max(1, bits // 32)


def schedule_cpu_pass(target: Any, stats: dict[str, list[str]] | None = None) -> Any:
    """A module pass scheduling every unscheduled PrimFunc: max pooling (`tvm_pool`), a
    transpose (`tvm_transpose`), a conv / dense / pooling reduction (`schedule_reduction`), else
    a chain of data-movement stages (`tvm_injective`); the first that recognises it.

    `stats`, when given, receives the names under "scheduled" and "unscheduled".
    """
    import tvm
    from tvm import tirx

    from rwdeploy.runtime.tvm_injective import schedule_injective
    from rwdeploy.runtime.tvm_pool import schedule_max_pool
    from rwdeploy.runtime.tvm_transpose import schedule_transpose

    lanes, registers = vector_lanes(target), vector_registers(target)

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.ScheduleCPU")
    def schedule(mod: Any, _ctx: Any) -> Any:
        updates = {}
        for gvar, func in mod.functions.items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            name = gvar.name_hint
            if func.attrs is not None and "tirx.is_scheduled" in func.attrs:
                if stats is not None:
                    stats.setdefault("tuned", []).append(name)
                continue
            failure = ": its loop nest is not one the CPU schedule recognises"
            try:
                scheduled = (schedule_max_pool(func, lanes) or schedule_transpose(func, lanes)
                             or schedule_reduction(func, lanes, registers) or schedule_injective(func))
            except Exception as err:  # a shape this schedule cannot handle: leave it to LLVM
                scheduled, failure = None, f" ({_first_line(err)})"
            if scheduled is not None:
                updates[gvar] = scheduled
            if stats is not None:
                stats.setdefault("scheduled" if scheduled is not None else "unscheduled",
                                 []).append(name)
                stages = _compute_stages(func) if scheduled is None else []
                if stages:
                    # a conv / dense left to LLVM runs one scalar accumulator at a time, tens of
                    # times slower than its scheduled form, with a correct output: say so
                    stats.setdefault("notes", []).append(
                        f"kernel {name} ({', '.join(stages)}) could not be scheduled{failure}; "
                        "it runs as plain loops, far slower than the other layers")
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return schedule


# CPUs whose 512-bit instructions run as two 256-bit halves (AMD Zen 4): there a half-register
# vector costs half a whole one, on cores with 512-bit units (Intel's AVX-512 cores) the same.
SPLIT_512_BIT = ("znver4",)


def channel_unit(target: Any) -> int:
    """What output channels are padded to a multiple of on this target (`padded_width`): a
    whole register where a narrower vector costs as much as a whole one (AVX-512 cores with
    512-bit units: 24 channels as three 8-float vectors issue three FMAs where two 16-float
    ones issue two; on a Xeon at batch 1 / 8 slim ResNet-20 30 % 0.94x at batch 8, 70 %
    0.92x / 0.94x, slim MobileNetV2 30 % 0.85x, 70 % 0.97x the time with half registers);
    also with AVX2, whose 128-bit FMAs issue like 256-bit ones (Zen 3, whole models interleaved:
    dense LeNet-5, 20 -> 50 channels, 0.66x the time at batch 1 and 0.53x at batch 8 with 50 as
    56 rather than 52 in 4-lane vectors); else half a register (Zen 4, where 24 channels as three
    halves measured faster than two whole registers, and NEON, whose half is 4 floats)."""
    lanes = vector_lanes(target)
    if lanes == 8 or (lanes >= 16 and str(target.attrs.get("mcpu", "")) not in SPLIT_512_BIT):
        return lanes
    return half_register(lanes)


def half_register(lanes: int) -> int:
    return max(4, lanes // 2) if lanes > 4 else lanes


def padded_width(channels: int, lanes: int, unit: int | None = None) -> int:
    """The next multiple of `unit` (default half a register; `lanes` when that is 4 or less);
    up to half a register's worth of channels stay one half register whatever `unit` is: one
    narrow vector issues as one FMA like a whole one, and writes half the bytes (slim ResNet-20
    50 %'s 8-channel layers padded to 16: 4-10 % slower)."""
    half = half_register(lanes)
    unit = half if channels <= half else (unit or half)
    return -(-channels // unit) * unit


def single_row_width(channels: int, lanes: int, unit: int | None = None) -> int:
    """Output channels for a layer with one output pixel (a batch-1 Linear, a conv on a 1x1
    map): a multiple of four registers once there are more than two registers' worth.

    Its register tile has one pixel, so its accumulators are its channel vectors, and each is
    a chain of K dependent FMAs: MobileNetV2's 1280 -> 1000 classifier (1000 = 125 x 8) ran as
    one 8-lane chain, 168 us against numpy's 35. Four whole registers keep four chains in
    flight, what the FMA latency (4 cycles, 1 per cycle at 512 bits on Zen 4) needs.
    """
    if channels <= 2 * lanes:
        return padded_width(channels, lanes, unit)
    return -(-channels // (4 * lanes)) * (4 * lanes)


def pad_channels_pass(lanes: int, unit: int | None = None) -> Any:
    """Pad output channels of constant-weight convs/matmuls to a multiple of `unit` (default
    half a register; `channel_unit`) or of four registers where the output has one pixel
    (`single_row_width`).

    A vector tile of odd width (50 channels -> 25 lanes) is legalised by LLVM into element
    inserts and shuffles: LeNet-5's second conv ran ~20x slower than its FLOPs allow. Zero
    filters appended to the weight make the width a multiple of half a vector register (the
    tile is then made of half-register vectors, see `vector_width`, rather than of whole ones
    with up to half of them wasted); a slice right after the layer drops them again, so the
    function is unchanged.
    """
    import numpy as np
    import tvm
    from tvm import relax

    from rwdeploy.runtime.tvm_fold import rewrite_functions

    @relax.expr_functor.mutator
    class PadChannels(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or len(call.args) < 2:
                return call
            weight = call.args[1]
            if not isinstance(weight, tvm.ir.expr.GenericConst) or not hasattr(weight.value, "numpy"):
                return call
            name = call.op.name
            if name == "relax.nn.conv2d":
                attrs = call.attrs
                if (attrs.data_layout != "NHWC" or attrs.kernel_layout != "HWIO"
                        or attrs.out_layout != "NHWC" or int(attrs.groups) != 1):
                    return call
            elif name != "relax.matmul" or len(weight.value.shape) != 2:
                return call
            w = weight.value.numpy()
            channels = w.shape[-1]
            try:
                pixels = math.prod(int(d) for d in list(call.ty.shape)[:-1])
            except (TypeError, ValueError):   # a symbolic dimension
                pixels = 0
            padded = single_row_width(channels, lanes, unit) if pixels == 1 else padded_width(channels, lanes, unit)
            if padded == channels:
                return call
            w = np.concatenate([w, np.zeros((*w.shape[:-1], padded - channels), w.dtype)], -1)
            wide = self.builder_.emit(tvm.ir.Call(call.op, [call.args[0], relax.const(w)],
                                                   call.attrs, call.ty_args))
            axis = len(wide.ty.shape) - 1
            return relax.op.strided_slice(wide, axes=[axis], begin=[0], end=[channels])

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.PadChannels")
    def pad(mod: Any, _ctx: Any) -> Any:
        return rewrite_functions(PadChannels(mod), mod)

    return pad


def clip_to_min_max_pass() -> Any:
    """clip(x, lo, hi) -> minimum(maximum(x, lo), hi) (ReLU6 in MobileNet).

    ConvertLayout has no layout rule for `relax.clip`: it wraps every clip in NHWC->NCHW
    and back transposes (10 ms of MobileNetV2's 40). Two binary ops with scalar constants
    follow the layout of their input.
    """
    import tvm
    from tvm import relax

    from rwdeploy.runtime.tvm_fold import rewrite_functions

    @relax.expr_functor.mutator
    class ClipToMinMax(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.clip"):
                return call
            x, low, high = call.args
            dtype = x.ty.dtype
            low = relax.const(float(low.value), dtype)
            high = relax.const(float(high.value), dtype)
            return relax.op.minimum(self.builder_.emit(relax.op.maximum(x, low)), high)

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.ClipToMinMax")
    def rewrite(mod: Any, _ctx: Any) -> Any:
        return rewrite_functions(ClipToMinMax(mod), mod)

    return rewrite


def prepare_passes(lanes: int | None = None, stats: dict[str, list[str]] | None = None,
                   unit: int | None = None) -> list[Any]:
    """Relax passes run before legalisation: BN folding, NHWC/HWIO layout, constant folding,
    and (with `lanes`) output channels padded to multiples of `unit` (`channel_unit`; default
    half a register).

    FoldConstant must run between FoldBatchnormToConv2D and ConvertLayout: on the unfolded
    result ConvertLayout segfaults (TVM 0.27, ResNet-20). The weight arithmetic is folded in
    numpy first (`tvm_fold`): FoldConstant builds every call with LLVM, most of a build's time.
    """
    from tvm import relax

    from rwdeploy.runtime.tvm_bn_bias import bias_into_batch_norm_pass
    from rwdeploy.runtime.tvm_depthwise_pad import widen_depthwise_pass
    from rwdeploy.runtime.tvm_fold import fold_weight_arithmetic_pass

    return [
        # a slim model's border maps (convs of constant maps) become constants for the next pass
        fold_weight_arithmetic_pass(),
        relax.transform.FoldConstant(),
        bias_into_batch_norm_pass(),
        relax.transform.FoldBatchnormToConv2D(),
        relax.transform.DecomposeOpsForInference(),
        fold_weight_arithmetic_pass(),
        relax.transform.FoldConstant(),
        clip_to_min_max_pass(),
        nhwc_or_as_given_pass(stats, lanes, unit),
        fold_weight_arithmetic_pass(),
        relax.transform.FoldConstant(),
        *([pad_channels_pass(lanes, unit), widen_depthwise_pass(lambda c: padded_width(c, lanes, unit))]
          if lanes else []),
    ]


def nhwc_or_as_given_pass(stats: dict[str, list[str]] | None = None, lanes: int | None = None,
                          unit: int | None = None) -> Any:
    """ConvertLayout to NHWC/HWIO, or the module unchanged where TVM's ConvertLayout fails.

    With `lanes`, the convs `tvm_pixel_conv.choose_pixel_convs` picks (output rows that fill
    vectors better than the output channels, padded as `pad_channels_pass` would, and enough
    saved to pay the transposes) stay NCHW, for the pixel-vectorised kernel; ConvertLayout puts
    the transposes between them and NHWC neighbours.

    TVM 0.27's ConvertLayout raises on some graphs (NextViT: `std::bad_alloc` from the pass
    itself, on the unpruned model too). The convolutions then stay NCHW: they build with TVM's
    own lowering, slower but correct, and `stats["notes"]` says so.
    """
    import tvm
    from tvm import relax

    nhwc = {"relax.nn.conv2d": ["NHWC", "HWIO"]}

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.NhwcOrAsGiven")
    def convert(mod: Any, _ctx: Any) -> Any:
        try:
            if not lanes:
                return relax.transform.ConvertLayout(nhwc)(mod)
            pixels: set[Any] = set()
            for func in mod.functions.values():
                if isinstance(func, relax.Function):
                    pixels |= choose_pixel_convs(func, lanes, lambda c: padded_width(c, lanes, unit))

            def layout_for_conv(call: Any) -> dict[str, list[str]]:
                if call.op.name == "relax.nn.conv2d" and call.args[1] in pixels:
                    return {"relax.nn.conv2d": ["NCHW", "OIHW"]}
                return nhwc

            converted = relax.transform.ConvertLayout(nhwc, layout_cb=layout_for_conv)(mod)
            # the same tensor transposed for two readers (a residual and the next conv) once
            return relax.transform.EliminateCommonSubexpr()(converted) if pixels else converted
        except Exception as err:  # noqa: BLE001 - a TVM failure in an optional optimisation
            if stats is not None:
                stats.setdefault("notes", []).append(
                    f"layout kept as given (NCHW): TVM's ConvertLayout failed "
                    f"({type(err).__name__}: {str(err).strip().splitlines()[-1][:120] if str(err).strip() else ''})")
            return mod

    return convert

