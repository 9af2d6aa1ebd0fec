"""Where the time of a Relax VM inference goes: CPU time of every call the VM makes.

TVM 0.27's Relax VM has no profiler; `VirtualMachine.set_instrument` calls a function before
and after every call instruction. `profile_calls` times each call with the calling thread's
CPU time (`time.thread_time`: robust to other processes on a shared machine, exact for a
1-thread run where every kernel executes on the calling thread), over several inferences.
The instrument itself costs a few microseconds per call: compare `calls_ms` with an
uninstrumented measurement of the whole inference for the VM's own overhead.

`categorize(symbol)` sorts the callees of a build into what they are (sparse kernels, the
conv input layout transforms, dense layers left, layout conversions, other ops, VM builtins).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

CATEGORIES = (
    "sparse conv",          # rwdeploy conv kernels (epilogue fused: bias, BN, ReLU/clip, residual)
    "conv input layout",    # rwdeploy conv input transforms (zero padding, stride phases, im2col)
    "sparse linear",
    "dense conv/linear",    # layers left dense (TVM's scheduled kernels)
    "layout conversion",    # transposes / layout_transform between NCHW and NHWC parts
    "pooling",
    "other ops",            # elementwise ops not fused, reshapes, ...
    "vm",                   # VM builtins: allocation, shape checks, ...
)


def categorize(symbol: str) -> str:
    s = symbol.lower()
    if s.startswith("vm.builtin") or s.startswith("vm."):
        return "vm"
    if s.startswith("rw_conv2d_layout"):
        return "conv input layout"
    if s.startswith("rw_conv2d"):
        return "sparse conv"
    if s.startswith("rw_linear"):
        return "sparse linear"
    if "conv" in s or "matmul" in s or "dense" in s:
        return "dense conv/linear"
    if "transpose" in s or "layout_transform" in s or "permute" in s:
        return "layout conversion"
    if "pool" in s:
        return "pooling"
    return "other ops"


@dataclass
class CallTime:
    index: int          # position in the inference's call sequence
    symbol: str
    category: str
    ms: float           # median over the profiled inferences (thread CPU time)


def profile_calls(vm: Any, function: str, *args: Any, runs: int = 5) -> list[CallTime]:
    """Per-call thread CPU time of `vm[function](*args)`, median over `runs` inferences."""
    samples: list[list[tuple[str, float]]] = []
    current: list[tuple[str, float]] = []
    start: list[float] = []

    def instrument(func: Any, symbol: str, before: bool, ret: Any, *rest: Any) -> int:
        if before:
            start.append(time.thread_time())
        else:
            current.append((symbol, time.thread_time() - start.pop()))
        return 0

    vm[function](*args)                       # warm-up: first-call allocations
    vm.set_instrument(instrument)
    try:
        for _ in range(runs):
            current = []
            vm[function](*args)
            samples.append(current)
    finally:
        vm.set_instrument(None)
    if not samples[0]:
        raise ValueError("the VM reported no calls: profile a build made with exec_mode=\"bytecode\" "
                         "(a \"compiled\" one runs its calls as machine code, past the instrument)")
    calls = []
    for i, (symbol, _) in enumerate(samples[0]):
        ms = statistics.median(run[i][1] for run in samples if len(run) > i) * 1e3
        calls.append(CallTime(i, symbol, categorize(symbol), ms))
    return calls


def by_category(calls: list[CallTime]) -> dict[str, float]:
    """Total ms per category (every category present, 0 when unused)."""
    out = {c: 0.0 for c in CATEGORIES}
    for c in calls:
        out[c.category] += c.ms
    return out
