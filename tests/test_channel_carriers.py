"""Removed channels' constants folded into a kept constant channel instead of a map.

Alignment keeps some zero-producing channels; where one of them carries the same spatial
pattern as the removed channels a conv reads, the conv's weight absorbs their part and no
constant map (nor the small conv that makes it) follows the layer. The slim model must stay
the original function, in torch and in ONNX Runtime.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwdeploy.passes.remove_zero_channels import remove_zero_channels
from rwdeploy.passes.trace import trace_model
from rwdeploy.runtime.onnx_export import export_onnx
from rwdeploy.runtime.ort_runner import OrtRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ZEROED = [0, 1, 2, 3, 4]  # conv1 filters zeroed: 3 of 8 kept, --align 4 keeps channel 0 back


class ThreeConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.conv3 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return self.conv3(F.relu(self.bn2(self.conv2(y))))


class PooledBranch(nn.Module):
    """A conv reads two groups: constants of ones pattern (a) and pooled ones (b, whose border
    differs: average pooling counts the zero padding)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.AvgPool2d(3, 1, 1)
        self.c = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([self.a(x), self.pool(self.b(x))], 1))


def _trained_looking(net: nn.Module, convs: list[nn.Conv2d], bns: list[nn.BatchNorm2d], carrier_value: float) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for bn in bns:
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.rand(bn.num_features, generator=g) + 0.2)  # removed channels: relu(shift) > 0
            bn.running_mean[0] = 0.0
            bn.bias[0] = carrier_value  # channel 0 is the one alignment keeps back
        for conv in convs:
            conv.weight[ZEROED] = 0.0
    net.eval()


def _slim(net: nn.Module, example: torch.Tensor, align: int | str):
    gm = trace_model(net, example).gm
    return remove_zero_channels(gm, example, align=align)


def _folded(record) -> dict[str, str | None]:
    return {layer.name: layer.folded for layer in record.layers}


def _assert_same_function(net: nn.Module, slim: nn.Module) -> None:
    for seed, batch in ((1, 1), (2, 3)):
        x = torch.randn(batch, 3, 12, 10, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            want, got = net(x), slim(x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_a_kept_constant_channel_carries_the_removed_ones():
    net = ThreeConvs()
    _trained_looking(net, [net.conv1], [net.bn1], carrier_value=0.7)
    example = torch.randn(1, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    res = _slim(net, example, align=4)
    assert res.gm.conv2.weight.shape[1] == 4  # 3 kept + channel 0 kept for alignment
    assert _folded(res.record)["conv2"] == "carrier"
    assert not [k for k in res.gm.state_dict() if k.startswith("_rw_const")]  # no map, no border kernel
    _assert_same_function(net, res.gm)
    # without a channel kept back there is nothing to carry: the border constant stays
    off = _slim(net, example, align="off")
    assert _folded(off.record)["conv2"] in ("border kernel", "constant map")
    _assert_same_function(net, off.gm)


def test_a_kept_channel_holding_zero_carries_nothing():
    net = ThreeConvs()
    _trained_looking(net, [net.conv1], [net.bn1], carrier_value=-5.0)  # relu of the kept channel: 0
    example = torch.randn(1, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    res = _slim(net, example, align=4)
    assert res.gm.conv2.weight.shape[1] == 4
    assert _folded(res.record)["conv2"] == "border kernel"
    _assert_same_function(net, res.gm)


def test_removed_channels_of_another_pattern_keep_their_map():
    net = PooledBranch()
    _trained_looking(net, [net.a[0], net.b[0]], [net.a[1], net.b[1]], carrier_value=0.7)
    example = torch.randn(1, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    res = _slim(net, example, align=4)
    assert res.gm.c.weight.shape[1] == 8  # each branch: 3 kept + 1 kept back
    # the pooled branch's removed channels are not multiples of a's kept constant channel
    assert _folded(res.record)["c"] in ("border kernel", "constant map")
    _assert_same_function(net, res.gm)


def test_carried_model_runs_in_onnx_runtime_without_border_convs(tmp_path):
    net = ThreeConvs()
    _trained_looking(net, [net.conv1], [net.bn1], carrier_value=0.7)
    example = torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(0))
    slim = _slim(net, example[:1], align=4).gm
    path = tmp_path / "slim.onnx"
    export_onnx(slim.eval(), example[:1], path)
    assert [n.op_type for n in onnx.load(path).graph.node].count("Conv") == 3  # the model's three
    runner = OrtRunner(path, threads=1)
    got = runner.run(example.numpy())
    want = net(example).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))
