"""The measurers the compile pipeline gives `pack_sparse`: each layer's dense and packed forms
timed as the kernels a compiled artifact runs, where that artifact will run.

`layer_timer(target)` picks one: arm-family targets measure on the arm device
(`runtime.arm_layer_timer`: a board over RPC, else instruction counts on the emulated aarch64
device, the host only as a stated fallback); other targets on this host
(`runtime.layer_formats.measure_layer_formats`). TVM is imported when a timer first measures, so
a model with nothing to pack never loads it; `where` is set then (the record's `measured_on`).
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

Layers = Sequence[tuple[str, nn.Module, Sequence[int], dict]]


class HostLayerTimer:
    """Times on this host; for a target other than `cpu` that is a proxy, and `where` says so.

    `threads`: TVM's thread count while measuring, that of the artifact (compile's `--threads`);
    None keeps the process's (TVM_NUM_THREADS). Measured at the host's two threads while the
    artifact ran on one, a sparse kernel (parallel over row chunks) gained from the second
    thread where the small dense conv did not: the demo's LeNet-5 conv2 was packed as "1.12x
    faster" and the 1-thread artifact ran 1.6x / 2.2x slower at batch 1 / 8 than with it dense.
    """

    times_fused_pairs = True   # takes `pairs` (see `measure_layer_formats`)

    def __init__(self, target: str = "cpu", threads: int | None = None) -> None:
        self.target, self.threads = target, threads
        self.where: str | None = None

    def __call__(self, layers: Layers, pairs: Sequence[tuple[str, str]] = ()) -> dict[Any, dict[str, dict]]:
        from rwdeploy.runtime import tvm_sparse
        from rwdeploy.runtime.layer_formats import measure_layer_formats
        from rwdeploy.runtime.tvm_build import set_threads

        cpu = tvm_sparse.host_target()
        before = tvm_sparse.threads()
        threads = self.threads or before
        self.where = f"host {cpu.attrs.get('mcpu', 'cpu')} via TVM, {threads} thread{'s' if threads > 1 else ''}"
        if self.target != "cpu":
            self.where += f" (proxy: target {self.target!r} is not measurable here; pass timer= to measure it)"
        set_threads(threads)
        try:
            return measure_layer_formats(layers, cpu, pairs)
        finally:
            set_threads(before)


class ArmLayerTimer:
    """Times on the arm device (`runtime.arm_layer_timer`), chosen when it first measures."""

    def __init__(self, target: str = "arm", *, rpc: str | None = None, tracker: str | None = None,
                 key: str | None = None) -> None:
        self.target, self.rpc, self.tracker, self.key = target, rpc, tracker, key
        self.where: str | None = None

    def __call__(self, layers: Layers) -> dict[str, dict[str, dict]]:
        from rwdeploy.runtime.arm_layer_timer import arm_layer_timer

        timer = arm_layer_timer(self.target, rpc=self.rpc, tracker=self.tracker, key=self.key)
        self.where = timer.where
        return timer(layers)


def layer_timer(target: str, *, rpc: str | None = None, tracker: str | None = None,
                key: str | None = None, threads: int | None = None) -> Any:
    """The `pack_sparse` measurer for a target name (see the module doc); `threads`: the
    artifact's thread count, which host measurements use."""
    from rwdeploy.runtime.targets import TARGETS

    if target in TARGETS and TARGETS[target].family == "arm":
        return ArmLayerTimer(target, rpc=rpc, tracker=tracker, key=key)
    return HostLayerTimer(target, threads=threads)
