"""Software prefetch of streamed weights: each weight stream's next lines requested ahead.

At batch 1 a layer whose weights do not stay cached between inferences (`tvm_schedule.
streams_weights`: ResNet-18's layer3-4, VGG's 512-channel convs, a classifier) reads them from
L3 or memory once per image, and waits on those misses: on the Xeon, ResNet-18's 256 -> 256
conv at 7x7 ran 607 us with cold caches against 409 us with warm ones. The schedule already
reads them as several sequential streams (one per channel vector and reduction part), which
the hardware prefetcher follows, but it starts each stream late and runs only a few lines
ahead; LLVM inserts no software prefetch on x86 (its loop data prefetch pass emitted nothing
with any `cl-opt` distance).

`tvm_schedule.schedule_reduction` marks the innermost reduction loop of such a kernel with
`ANNOTATION` (not in a one-pixel tile, a batch-1 dense layer, where each weight vector feeds one
FMA and the prefetches measured 1.03-1.06x slower: the hardware prefetcher keeps up there); `weight_prefetch_pass`, run on the lowered kernels, finds that loop's vector
loads whose address moves with the loop (the weight streams; the inputs are broadcast scalar
loads and the accumulators sit at constant offsets) and appends to the loop body one prefetch
per stream, `PREFETCH_AHEAD_BYTES` ahead of the load. `benchmarks/streamed_weights.py` (whole models,
batch 1, interleaved, Xeon; `results/prefetch_xeon*.md`): ResNet-18 at 112x112 warm 0.915-0.94x
the time, cold 0.92-0.93x (TVM/ORT 1.02 -> 0.94); VGG-16-BN 0.89x / 0.905x (0.99 -> 0.88);
MobileNetV2 0.98x; at batch 8, where each weight serves 8 images, 0.99x. Warm calls gain as
much as cold ones: a whole model's weights leave the caches between calls anyway. 256 bytes
ahead gained 4-8 %, 1024 bytes 3-7 %. A prefetch past the end of the weights near the loop's
last iterations does not fault (x86 PREFETCHh, AArch64 PRFM).
"""
from __future__ import annotations

import math
from typing import Any

from rwdeploy.runtime.tvm_tir_rewrite import body_pass, buffer_loads, rewrite_children, with_loop

ANNOTATION = "rwdeploy_prefetch_weights"
PREFETCH_AHEAD_BYTES = 512  # 8 cache lines of 64 bytes


def _statements(body: Any) -> list[Any]:
    from tvm import tirx

    return list(body.seq) if isinstance(body, tirx.SeqStmt) else [body]


def weight_streams(loop: Any) -> list[tuple[Any, Any, int]]:
    """(buffer, index of the load's first lane, elements per iteration) of each distinct vector
    load in `loop`'s body whose address moves with the loop variable by a constant stride.
    Only a flat body is read (statements bound, stored or evaluated directly in it, as an
    unrolled register tile is): a nested loop returns nothing."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    analyzer = tvm.sym.Analyzer()
    found: list[tuple[Any, Any, int]] = []
    for stmt in _statements(loop.body):
        if isinstance(stmt, tirx.Bind):
            # the loop's own common subexpressions: expanded, so each index is a function of
            # the loop variable and the loop-invariant names bound outside it
            analyzer.bind(stmt.var, analyzer.simplify(stmt.value))
            exprs = [stmt.value]
        elif isinstance(stmt, tirx.BufferStore):
            exprs = [stmt.value, *stmt.indices]
        elif isinstance(stmt, tirx.Evaluate):
            exprs = [stmt.value]
        else:
            return []
        for expr in exprs:
            for load in buffer_loads(expr):
                if len(load.indices) != 1 or not isinstance(load.indices[0], tirx.Ramp):
                    continue
                base = analyzer.simplify(load.indices[0].base)
                coefficients = tvm.sym.detect_linear_equation(base, [loop.loop_var])
                if len(coefficients) != 2 or not isinstance(coefficients[0], tirx.IntImm):
                    continue
                stride = int(coefficients[0])
                if stride == 0 or any(b.same_as(load.source) and tvm_ffi.structural_equal(i, base)
                                      for b, i, _ in found):
                    continue
                found.append((load.source, base, stride))
    return found


def _prefetch(buffer: Any, index: Any) -> Any:
    from tvm import tirx

    address = tirx.address_of(tirx.BufferLoad(buffer, [index]))
    # TVM's LLVM codegen does not lower its own `tirx.prefetch`; LLVM's intrinsic takes read
    # access (0), keep in all cache levels (3), data cache (1)
    flags = [tirx.IntImm("int32", v) for v in (0, 3, 1)]
    return tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0", address, *flags))


def with_prefetches(loop: Any, ahead_bytes: int | None = None) -> Any:
    """`loop` with a prefetch of each weight stream `ahead_bytes` ahead appended to its body
    (`PREFETCH_AHEAD_BYTES` by default; at the end, where the body's bound names are all in
    scope); itself when it has none or `ahead_bytes` is 0."""
    import tvm
    from tvm import tirx

    ahead_bytes = PREFETCH_AHEAD_BYTES if ahead_bytes is None else ahead_bytes
    streams = weight_streams(loop)
    if not streams or ahead_bytes <= 0:
        return loop
    prefetches = []
    for buffer, base, stride in streams:
        step_bytes = abs(stride) * tvm.DataType(str(buffer.dtype)).bits // 8
        ahead = math.ceil(ahead_bytes / step_bytes) * stride
        prefetches.append(_prefetch(buffer, base + ahead))
    return with_loop(loop, body=tirx.SeqStmt([*_statements(loop.body), *prefetches]))


def _rewrite(stmt: Any) -> Any:
    from tvm import tirx

    stmt = rewrite_children(stmt, _rewrite)
    if isinstance(stmt, tirx.For) and stmt.annotations is not None and ANNOTATION in stmt.annotations:
        return with_prefetches(stmt)
    return stmt


def weight_prefetch_pass() -> Any:
    """A TIR module pass on lowered kernels: every loop `tvm_schedule` annotated with
    `ANNOTATION` gets a prefetch per weight stream (`with_prefetches`)."""
    return body_pass("rwdeploy.WeightPrefetch", _rewrite)
