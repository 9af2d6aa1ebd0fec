"""Kernels built for one thread run their parallel loops in place.

A scheduled kernel marks its outer loop parallel; the LLVM codegen turns that loop into a
closure handed to `TVMBackendParallelLaunch`, which, even with one worker, goes through the
thread pool (a lock, the thread count read from the environment, the closure's arguments packed
into a struct) on every call. In a slim model of small layers that is a visible share: built
serial, slim ResNet-20 and LeNet-5 at 70 % ran 0.96-0.99x the time at batch 1 (interleaved,
Xeon), ResNet-18 and MobileNetV2 unchanged. A build whose target says one core
(`num-cores` = 1, what `--threads 1` asks for) cannot use a second thread anyway, so
`serial_loops_pass` makes the loops of small kernels serial: no launch happens. Large kernels
keep the launch, which costs them nothing measurable, because their serial bodies ran slower.
"""
from __future__ import annotations

import math
from typing import Any

from rwdeploy.runtime.tvm_tir_rewrite import body_pass, rewrite_children, with_loop

# Loop nests up to this many iterations (about a 2-MMAC conv, tens of microseconds) run serial.
# Above it the launch is noise, and the serial body measured slower: dense ResNet-18's 512 ->
# 512 conv at 4x4 1.035x, dense ResNet-18 and VGG-16-BN whole 1.03x (interleaved, Xeon).
SERIAL_MAX_ITERATIONS = 1 << 21


def runs_on_one_core(func: Any) -> bool:
    """Whether a PrimFunc's target says one core (its `num-cores` attribute is 1)."""
    target = func.attrs.get("target") if func.attrs is not None else None
    if target is None:
        return False
    cores = target.attrs.get("num-cores")
    return cores is not None and int(cores) == 1


def loop_iterations(stmt: Any) -> float:
    """How many times the innermost statements of `stmt` run (vector lanes counted): the
    product of constant loop extents down each path, summed over a sequence; infinite where an
    extent is not a constant or a while loop runs."""
    from tvm import tirx

    if isinstance(stmt, tirx.SeqStmt):
        return sum(loop_iterations(child) for child in stmt.seq)
    if isinstance(stmt, tirx.For):
        if not isinstance(stmt.extent, tirx.IntImm):
            return math.inf
        return int(stmt.extent) * loop_iterations(stmt.body)
    if isinstance(stmt, tirx.While):
        return math.inf
    if isinstance(stmt, tirx.IfThenElse):
        other = 0 if stmt.else_case is None else loop_iterations(stmt.else_case)
        return max(loop_iterations(stmt.then_case), other)
    body = getattr(stmt, "body", None)
    return 1 if body is None else loop_iterations(body)


def _serial(stmt: Any) -> Any:
    from tvm import tirx

    stmt = rewrite_children(stmt, _serial)
    if (isinstance(stmt, tirx.For) and stmt.kind == tirx.ForKind.PARALLEL
            and loop_iterations(stmt) <= SERIAL_MAX_ITERATIONS):
        return with_loop(stmt, kind=tirx.ForKind.SERIAL)
    return stmt


def serial_loops_pass() -> Any:
    """A TIR module pass: every parallel loop of up to `SERIAL_MAX_ITERATIONS` iterations in a
    function whose target has one core becomes a serial loop. Functions for more cores, or
    with no target, are left as they are."""
    return body_pass("rwdeploy.SerialLoops", _serial, runs_on_one_core)
