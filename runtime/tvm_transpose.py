"""CPU schedule for layout transposes (NHWC <-> NCHW and other axis permutations).

A transpose whose innermost output axis is not the input's innermost one reads with a stride
of a whole row of the input per element. TVM's default lowering walks the output in order:
every read touches a new cache line and a line is read again only after the whole map has
gone past, so the transpose runs at cache-miss speed. A packed (sparse) artifact converts the
output of a dense stem conv back to NCHW this way: MobileNetV2's 1x32x112x112 map took 4.8 ms,
more than the rest of the model.

`schedule_transpose` tiles the two axes involved into square blocks (the input's innermost
axis and the output's), so one tile reads and writes a few cache lines each, and runs the
tiles in parallel.
"""
from __future__ import annotations

from typing import Any

from rwdeploy.runtime.tvm_loops import largest_divisor


def schedule_transpose(func: Any, lanes: int) -> Any | None:
    """The scheduled PrimFunc, or None when `func` is not a single-block transpose (one
    spatial block storing one input element per output element, its indices a permutation of
    the loop variables) that moves the innermost axis."""
    from tvm import s_tir, tirx

    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if len(blocks) != 1:
        return None
    block = sch.get(blocks[0])
    if block.reads is None or len(block.reads) != 1 or any(iv.iter_type != 0 for iv in block.iter_vars):
        return None
    store = block.body
    load = getattr(store, "value", None)
    if not isinstance(store, tirx.BufferStore) or not hasattr(load, "indices"):
        return None  # (a load is a tvm.ir.expr.TensorLoad in TVM 0.27, its buffer `source`)
    out_vars = list(store.indices)
    in_vars = list(load.indices)
    if not all(isinstance(v, tirx.Var) for v in out_vars + in_vars) or len(in_vars) != len(out_vars):
        return None
    block_vars = [iv.var for iv in block.iter_vars]
    if len(out_vars) != len(block_vars) or not all(a.same_as(b) for a, b in zip(out_vars, block_vars)):
        return None
    order = [next((i for i, b in enumerate(block_vars) if v.same_as(b)), None) for v in in_vars]
    if None in order or sorted(order) != list(range(len(block_vars))):
        return None  # not a permutation of the output's axes
    loops = sch.get_loops(blocks[0])
    if len(loops) != len(block_vars):
        return None
    inner_in = order[-1]
    last = len(loops) - 1
    if inner_in == last:
        return None  # the innermost axis stays innermost: rows are copied whole already
    extents = [int(sch.get(loop).extent) for loop in loops]
    if min(extents[inner_in], extents[last]) < 4:
        return None  # a few channels (an RGB input to NHWC): LLVM's own loops are as fast
    a_outer, a_inner = sch.split(loops[inner_in], [None, largest_divisor(extents[inner_in], lanes)])
    b_outer, b_inner = sch.split(loops[last], [None, largest_divisor(extents[last], lanes)])
    others = [loop for i, loop in enumerate(loops) if i not in (inner_in, last)]
    sch.reorder(*others, a_outer, b_outer, a_inner, b_inner)
    sch.parallel(sch.fuse(*others, a_outer))
    sch.unroll(a_inner)
    sch.vectorize(b_inner)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
