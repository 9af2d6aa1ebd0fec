"""The measurer the compile pipeline gives `pack_sparse`: each layer's dense and packed forms
timed as the TVM kernels a compiled artifact runs (`runtime.tvm_sparse.measure_layer_formats`),
on this host. TVM is imported when it first measures, so a model with nothing to pack never
loads it.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn


class HostLayerTimer:
    """A `pack_sparse` timer; after measuring, `where` says where (the record's `measured_on`)."""

    def __init__(self, target: str = "cpu") -> None:
        self.target = target
        self.where: str | None = None

    def __call__(self, layers: Sequence[tuple[str, nn.Module, Sequence[int], dict]]) -> dict[str, dict[str, dict]]:
        from rwdeploy.runtime import tvm_sparse

        cpu = tvm_sparse.host_target()
        self.where = f"host {cpu.attrs.get('mcpu', 'cpu')} via TVM, {tvm_sparse.threads()} threads"
        if self.target != "cpu":
            self.where += f" (proxy: target {self.target!r} is not measurable here; pass timer= to measure it)"
        return tvm_sparse.measure_layer_formats(layers, cpu)
