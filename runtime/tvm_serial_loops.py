"""Kernels built for one thread run their parallel loops in place.

A scheduled kernel marks its outer loop parallel; the LLVM codegen turns that loop into a
closure handed to `TVMBackendParallelLaunch`, which, even with one worker, goes through the
thread pool (a lock, the thread count read from the environment, the closure's arguments packed
into a struct) on every call. In a slim model of small layers that is a visible share: built
serial, slim ResNet-20 and LeNet-5 at 70 % ran 0.96-0.99x the time at batch 1 (interleaved,
Xeon), ResNet-18 and MobileNetV2 unchanged. A build whose target says one core
(`num-cores` = 1, what `--threads 1` asks for) cannot use a second thread anyway, so
`serial_loops_pass` makes those loops serial: the kernel's body stays one function that LLVM
optimises whole, and no launch happens.
"""
from __future__ import annotations

from typing import Any

from rwdeploy.runtime.tvm_tir_rewrite import body_pass, rewrite_children, with_loop


def runs_on_one_core(func: Any) -> bool:
    """Whether a PrimFunc's target says one core (its `num-cores` attribute is 1)."""
    target = func.attrs.get("target") if func.attrs is not None else None
    if target is None:
        return False
    cores = target.attrs.get("num-cores")
    return cores is not None and int(cores) == 1


def _serial(stmt: Any) -> Any:
    from tvm import tirx

    stmt = rewrite_children(stmt, _serial)
    if isinstance(stmt, tirx.For) and stmt.kind == tirx.ForKind.PARALLEL:
        return with_loop(stmt, kind=tirx.ForKind.SERIAL)
    return stmt


def serial_loops_pass() -> Any:
    """A TIR module pass: every parallel loop of a function whose target has one core becomes
    a serial loop. Functions for more cores, or with no target, are left as they are."""
    return body_pass("rwdeploy.SerialLoops", _serial, runs_on_one_core)
