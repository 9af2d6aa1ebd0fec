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

from typing import Any

SPATIAL, REDUCE = 0, 2  # tirx IterVar kinds
MAX_ROW_TILE = 8  # output pixels per register tile (8 x 2 vectors of accumulators)


def _largest_divisor(n: int, cap: int) -> int:
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


def _channel_tile(channels: int, lanes: int) -> int:
    """Output-channel tile: two vectors, one vector, else the largest divisor <= two vectors.

    A tile that does not divide the extent would put a predicate in the vector loop, which
    measured slower than an odd-width vector, so only divisors are used.
    """
    for tile in (2 * lanes, lanes):
        if channels % tile == 0:
            return tile
    return _largest_divisor(channels, 2 * lanes)


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


def schedule_reduction(func: Any, lanes: int) -> Any | None:
    """The scheduled PrimFunc, or None when `func` does not have the recognised shape."""
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
    kinds = [iv.iter_type for iv in sch.get(red).iter_vars]
    n_spatial = kinds.count(SPATIAL)
    if kinds != [SPATIAL] * n_spatial + [REDUCE] * (len(kinds) - n_spatial) or n_spatial == 0:
        return None
    loops = sch.get_loops(red)
    if len(loops) != len(kinds):
        return None
    extents = [int(sch.get(loop).extent) for loop in loops]
    spatial, reduce = loops[:n_spatial], loops[n_spatial:]

    # Producers (the padding stage of a conv) run as their own parallel loop nest.
    for producer in sch.get_producers(red):
        producer_loops = sch.get_loops(producer)
        if producer_loops:
            sch.parallel(producer_loops[0])

    co_outer, co_inner = sch.split(spatial[-1], [None, _channel_tile(extents[n_spatial - 1], lanes)])
    width = extents[n_spatial - 2] if n_spatial >= 2 else 1
    row_tile = _largest_divisor(width, MAX_ROW_TILE)
    if n_spatial >= 3:
        # Rows and columns as one pixel axis: on small feature maps (4x4, 2x2 at the end of
        # VGG/ResNet) a tile of several whole rows streams the large weights once per tile
        # instead of once per short row. Tiles must stay rectangles (whole rows, or a
        # divisor of a row): the epilogue is placed per tile by its bounding box.
        pixels = width * extents[n_spatial - 3]
        whole_rows = [t for t in range(width, MAX_ROW_TILE + 1, width) if pixels % t == 0]
        if whole_rows and whole_rows[-1] > row_tile:
            row_tile = whole_rows[-1]
            spatial = [*spatial[:-3], sch.fuse(spatial[-3], spatial[-2]), spatial[-1]]
    if n_spatial >= 2:
        row_outer, row_inner = sch.split(spatial[-2], [None, row_tile])
        outer = [*spatial[:-2], row_outer, co_outer]
        inner = [row_inner, co_inner]
    else:
        outer, inner = [co_outer], [co_inner]
    sch.reorder(*outer, *reduce, *inner)
    # Loop kinds are set while the block still carries its init: after decompose_reduction
    # the update block no longer counts as a reduction and vectorize/parallel refuse it.
    if len(inner) == 2:
        sch.unroll(inner[0])
    sch.vectorize(inner[-1])
    sch.parallel(sch.fuse(*outer[:-1]) if len(outer) > 2 else outer[0])
    loops_above_tile = min(len(outer), 2)  # after the fuse

    accumulator = sch.cache_write(red, 0, "local")
    sch.reverse_compute_at(accumulator, outer[-1])
    consumers = sch.get_consumers(accumulator)
    while len(consumers) == 1:  # the elementwise epilogue, applied on the tile
        try:
            sch.reverse_compute_inline(consumers[0])
        except Exception:  # not inlinable (e.g. a reshape): it stays a separate loop nest
            break
        consumers = sch.get_consumers(accumulator)
    init = sch.decompose_reduction(red, reduce[0]) if reduce else None
    if init is not None:
        sch.vectorize(sch.get_loops(init)[-1])
    writeback = sch.get_loops(accumulator)[loops_above_tile:]
    if writeback and int(sch.get(writeback[-1]).extent) > 1:
        sch.vectorize(writeback[-1])
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def vector_lanes(target: Any) -> int:
    """float32 lanes of the target's widest vector register (16 with AVX-512, 4 with NEON)."""
    import tvm

    try:
        bits = int(tvm.target.codegen.llvm_get_vector_width(target))
    except Exception:
        bits = 128
    return max(1, bits // 32)


def schedule_cpu_pass(target: Any, stats: dict[str, list[str]] | None = None) -> Any:
    """A module pass applying `schedule_reduction` to every unscheduled PrimFunc.

    `stats`, when given, receives the names under "scheduled" and "unscheduled".
    """
    import tvm
    from tvm import tirx

    lanes = vector_lanes(target)

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
            try:
                scheduled = schedule_reduction(func, lanes)
            except Exception:  # a shape this schedule cannot handle: leave it to LLVM
                scheduled = None
            if scheduled is not None:
                updates[gvar] = scheduled
            if stats is not None:
                stats.setdefault("scheduled" if scheduled is not None else "unscheduled",
                                 []).append(name)
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    return schedule


def _padded_width(channels: int, lanes: int) -> int:
    return -(-channels // lanes) * lanes


def pad_channels_pass(lanes: int) -> Any:
    """Pad output channels of constant-weight convs/matmuls to a multiple of `lanes`.

    A vector tile of odd width (50 channels -> 25 lanes) is legalised by LLVM into element
    inserts and shuffles: LeNet-5's second conv ran ~20x slower than its FLOPs allow. Zero
    filters appended to the weight make the width a multiple of the vector length; a slice
    right after the layer drops them again, so the function is unchanged.
    """
    import numpy as np
    import tvm
    from tvm import relax

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
            padded = _padded_width(channels, lanes)
            if padded == channels:
                return call
            w = np.concatenate([w, np.zeros((*w.shape[:-1], padded - channels), w.dtype)], -1)
            wide = self.builder_.emit(tvm.ir.Call(call.op, [call.args[0], relax.const(w)],
                                                   call.attrs, call.ty_args))
            axis = len(wide.ty.shape) - 1
            return relax.op.strided_slice(wide, axes=[axis], begin=[0], end=[channels])

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.PadChannels")
    def pad(mod: Any, _ctx: Any) -> Any:
        mutator = PadChannels(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gvar, mutator.visit_expr(func))
        return mutator.builder_.finalize()

    return pad


def clip_to_min_max_pass() -> Any:
    """clip(x, lo, hi) -> minimum(maximum(x, lo), hi) (ReLU6 in MobileNet).

    ConvertLayout has no layout rule for `relax.clip`: it wraps every clip in NHWC->NCHW
    and back transposes (10 ms of MobileNetV2's 40). Two binary ops with scalar constants
    follow the layout of their input.
    """
    import tvm
    from tvm import relax

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
        mutator = ClipToMinMax(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gvar, mutator.visit_expr(func))
        return mutator.builder_.finalize()

    return rewrite


def prepare_passes(lanes: int | None = None) -> list[Any]:
    """Relax passes run before legalisation: BN folding, NHWC/HWIO layout, constant folding,
    and (with `lanes`) output channels padded to whole vectors.

    FoldConstant must run between FoldBatchnormToConv2D and ConvertLayout: on the unfolded
    result ConvertLayout segfaults (TVM 0.27, ResNet-20).
    """
    from tvm import relax

    return [
        relax.transform.FoldBatchnormToConv2D(),
        relax.transform.DecomposeOpsForInference(),
        relax.transform.FoldConstant(),
        clip_to_min_max_pass(),
        relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]}),
        relax.transform.FoldConstant(),
        *([pad_channels_pass(lanes)] if lanes else []),
    ]
