"""CPU schedule for chains of data-movement stages (reshape, transpose, strided slice, squeeze):
each intermediate stage read where it is used instead of written out whole.

TVM's fusion puts a reshape, a transpose and a slice into one kernel, but legalises each as its
own loop nest writing a full intermediate buffer, and nothing schedules such a kernel: a ViT's
qkv split (reshape to (tokens, 3, heads, 64), transpose to (3, heads, tokens, 64)) copied the
tensor twice, through index arithmetic LLVM does not vectorise (0.08 ms of the ViT-Tiny block's
~2 ms; ONNX Runtime's Split and Transpose 0.04). Inlined, the last stage reads the source
directly, and its indices simplify to plain strides once the loop bounds are known.

Only stages that compute nothing (their value is one load) are inlined: a stage that computes
(an exp, a multiply) may be broadcast to more elements than it has, and would be recomputed for
each.
"""
from __future__ import annotations

from typing import Any

SPATIAL = 0  # tirx IterVar kind


def _moves_data(block: Any) -> bool:
    """A block of spatial axes only whose body stores one element loaded from a buffer."""
    from tvm import tirx

    if any(iv.iter_type != SPATIAL for iv in block.iter_vars) or block.init is not None:
        return False
    store = block.body
    # (a load is a tvm.ir.expr.TensorLoad in TVM 0.27, with `indices`, not a tirx.BufferLoad)
    return isinstance(store, tirx.BufferStore) and hasattr(store.value, "indices")


def schedule_injective(func: Any) -> Any | None:
    """`func` with its data-movement stages inlined into their readers, or None where it has
    no such stage before its last one, or any stage that reduces."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if len(blocks) < 2 or any(any(iv.iter_type != SPATIAL for iv in sch.get(b).iter_vars) for b in blocks):
        return None
    inlined = 0
    for block in blocks[:-1]:
        if _moves_data(sch.get(block)):
            try:
                sch.compute_inline(block)
            except Exception:  # noqa: BLE001 - e.g. read by a stage with a different loop nest
                continue
            inlined += 1
    if not inlined:
        return None
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)
