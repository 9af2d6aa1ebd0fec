"""For arm targets the per-layer format is chosen from the arm device's measurements.

The device is injected (a counter or a board function standing in for the emulated device or
an RPC board), so these tests check the choice logic: which library and functions get
measured, how the measurements decide, and what the record says about where they came from.
One test counts real aarch64 instructions on the emulated device (qemu).
"""
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from arm_support import provisioned_home
from rwdeploy.passes.pack_sparse import pack_sparse
from rwdeploy.runtime import arm_emulator, arm_layer_timer
from rwdeploy.runtime.rpc import elf_machine
from sparse_support import small_sparse_net


def _net() -> nn.Module:
    return small_sparse_net(8, 16, 32, 0.8)


def _example() -> torch.Tensor:
    return torch.randn(1, 8, 6, 6)


class FakeDevice:
    """Records what it is asked to measure; answers with costs from `prefer`: the preferred
    format of each layer costs 1 unit, everything else 10 (dense 5)."""

    def __init__(self, prefer: dict[str, str]) -> None:
        self.prefer = prefer
        self.calls: list[tuple[str, str, tuple[int, ...]]] = []

    def _cost(self, function: str) -> float:
        for layer, fmt in self.prefer.items():
            if f"_{layer}_" in function:
                return 1.0 if function.endswith(f"_{fmt}") else (5.0 if function.endswith("_dense") else 10.0)
        raise AssertionError(f"unknown function {function}")

    def count(self, lib: Path, function: str, x: np.ndarray) -> tuple[int, float]:
        self.calls.append((elf_machine(lib), function, x.shape))
        return int(self._cost(function) * 1000), 123.0

    def board(self, lib: Path, calls) -> dict:
        self.calls += [(elf_machine(lib), f, x.shape) for f, x in calls]
        return {f: (self._cost(f), self._cost(f) * 0.9, 7) for f, _ in calls}


def test_choice_follows_the_devices_instruction_counts():
    device = FakeDevice({"0": "bsr4x1", "3": "dense"})
    timer = arm_layer_timer.arm_layer_timer("arm", counter=device.count, workers=1)
    assert timer.where.startswith("emulated aarch64 device")
    res = pack_sparse(torch.fx.symbolic_trace(_net()), _example(), target="arm", timer=timer)
    chosen = {l.name: l.chosen for l in res.record.layers}
    assert chosen == {"0": "bsr4x1", "3": "dense"}
    assert res.record.measured_on == timer.where
    conv = res.record.layers[0]
    assert conv.cost_unit == "aarch64 instructions" and conv.measured_cost["bsr4x1"] == 1000
    assert "aarch64 instructions" in conv.reason
    # every alternative of every layer ran on an aarch64 library, with the layer's input shape
    assert {m for m, _, _ in device.calls} == {"aarch64"}
    shapes = {f.split("_", 1)[1]: shape for _, f, shape in device.calls}
    assert {"0_dense", "0_csr", "0_bsr4x1", "3_dense", "3_csr"} <= set(shapes)
    # both NCHW: the dense conv's candidate converts to and from NHWC, as between packed layers
    assert shapes["0_dense"] == (1, 8, 6, 6) and shapes["0_csr"] == (1, 8, 6, 6)
    assert len(device.calls) == len(shapes)                                     # each measured once


def test_board_latency_decides_with_an_rpc_board():
    device = FakeDevice({"0": "csr", "3": "bsr1x4"})
    timer = arm_layer_timer.arm_layer_timer("arm", board=device.board)
    assert "over TVM RPC" in timer.where
    res = pack_sparse(torch.fx.symbolic_trace(_net()), _example(), target="arm", timer=timer)
    assert {l.name: l.chosen for l in res.record.layers} == {"0": "csr", "3": "bsr1x4"}
    assert res.record.layers[0].cost_unit == "ms" and res.record.layers[0].measured_ms["csr"] == 1.0


def test_without_a_device_the_host_is_a_stated_fallback(monkeypatch):
    monkeypatch.setattr(arm_emulator, "is_provisioned", lambda h: False)
    timer = arm_layer_timer.arm_layer_timer("arm")
    assert "fallback for target 'arm'" in timer.where and "not provisioned" in timer.where
    res = pack_sparse(torch.fx.symbolic_trace(_net()), _example(), target="arm", timer=timer)
    assert res.record.measured_on == timer.where
    assert all(l.measured_ms for l in res.record.layers)


def test_the_compile_timer_of_arm_targets_measures_on_the_device(monkeypatch):
    from rwdeploy.sparse.timing import HostLayerTimer, layer_timer

    monkeypatch.setattr(arm_emulator, "is_provisioned", lambda h: True)
    device = FakeDevice({"0": "csr", "3": "dense"})
    monkeypatch.setattr(arm_layer_timer, "emulator_counter", lambda: device.count)
    for target in ("arm", "rpi4"):
        timer = layer_timer(target)
        res = pack_sparse(torch.fx.symbolic_trace(_net()), _example(), target=target, timer=timer)
        assert res.record.measured_on.startswith("emulated aarch64 device")
        assert {l.name: l.chosen for l in res.record.layers} == {"0": "csr", "3": "dense"}
    assert isinstance(layer_timer("cpu"), HostLayerTimer)


@pytest.mark.qemu
def test_instruction_counts_on_the_emulated_device():
    """Real counts: at 90 % sparsity the CSR conv takes fewer aarch64 instructions than dense."""
    provisioned_home()
    conv = nn.Conv2d(16, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight[torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.9] = 0
    from rwdeploy.passes.ops import module_layer_view
    from rwdeploy.passes.pack_sparse import _candidates

    cands = {k: v for k, v in _candidates(module_layer_view(conv, "", conv)).items() if k == "csr"}
    out = arm_layer_timer.arm_layer_timer("arm")([("conv", conv, [1, 16, 10, 10], cands)])["conv"]
    assert out["csr"]["unit"] == "aarch64 instructions" and out["csr"]["emulated"]
    assert 0 < out["csr"]["insns"] < out["dense"]["insns"]
