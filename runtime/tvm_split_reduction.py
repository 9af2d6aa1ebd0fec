"""A batch-1 dense layer with few outputs, its reduction split into independent partial sums.

`tvm_schedule.register_tile`'s accumulators are a tile's pixels x channel vectors, and each is
a chain of dependent FMAs, one per reduction step. A dense layer at batch 1 has one pixel, so
its chains are its output vectors: a 10-class classifier (10 outputs padded to 16 lanes) is one
chain of K dependent FMAs, each waiting the FMA's latency (4 cycles) for the last, where the
core could issue two per cycle. `pad_channels_pass` gives layers of more than two vectors four
whole ones (`single_row_width`); this is the rest: K split into `reduction_parts` slices, each
accumulated in its own vectors (TIR's `rfactor`: a block of partial sums, then one that adds
them up), so that `CHAINS` accumulators are in flight.

On the Xeon (one thread, batch 1, whole call of a one-layer model, interleaved): 500 -> 10
(slim LeNet-5's classifier) 1.45 -> 1.08 us, 2048 -> 10 3.09 -> 1.80, 1280 -> 32 2.28 -> 2.08,
64 -> 10 0.85 -> 0.80 (the call itself is about 0.9 us); 4, 8 or 16 chains alike on 500 -> 10.
"""
from __future__ import annotations

from typing import Any

REDUCE = 2  # tirx IterVar kind
# independent accumulator vectors that cover the FMA latency: 4 cycles x 2 FMA pipes
CHAINS = 8
# fewest reduction steps a slice is given: each slice costs one vector add at the end
MIN_SLICE = 16


def reduction_parts(length: int, vectors: int) -> int:
    """Slices to cut a reduction of `length` steps into, for a tile of `vectors` accumulator
    vectors: the most, up to CHAINS // vectors, that divide it into slices of MIN_SLICE or more
    steps (1: leave it whole)."""
    most = CHAINS // max(vectors, 1)
    return max((p for p in range(1, most + 1) if length % p == 0 and length // p >= MIN_SLICE), default=1)


def split_one_pixel_reduction(sch: Any, red: Any, vectors: int) -> Any:
    """Split the single reduction loop of `red`, a block with one output pixel (all spatial
    loops but the channels of extent 1), into `reduction_parts` partial sums; returns the block
    that computes them, its spatial loops (slice, pixels, channels) in the order of its
    iteration variables (what `schedule_reduction` tiles), or `red` itself where nothing is
    split. The block that adds the slices up runs the slices outermost, the channels in a vector."""
    block = sch.get(red)
    kinds = [iv.iter_type for iv in block.iter_vars]
    loops = sch.get_loops(red)
    if kinds.count(REDUCE) != 1 or kinds[-1] != REDUCE or len(loops) != len(kinds):
        return red
    extents = [int(sch.get(loop).extent) for loop in loops]
    if any(e != 1 for e in extents[:-2]):
        return red
    parts = reduction_parts(extents[-1], vectors)
    if parts < 2:
        return red
    outer, _ = sch.split(loops[-1], [parts, None])
    partial = sch.rfactor(outer, factor_axis=0)
    *spatial, part, inner = sch.get_loops(partial)
    sch.reorder(part, *spatial, inner)
    *spatial, part = sch.get_loops(red)
    sch.reorder(part, *spatial)
    sch.vectorize(spatial[-1])
    return partial
