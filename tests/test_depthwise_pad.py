"""A depthwise conv with an odd channel count runs on the padded tensor its input was sliced from
(`runtime.tvm_depthwise_pad`): widened only where every value between the slice and the
depthwise is read once and channel-local, and the build computes what torch does."""
import re

import numpy as np
import pytest
import torch
import tvm

from rwdeploy.runtime import tvm_build, tvm_schedule

nn = torch.nn


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    return bn


class InvertedResidual(nn.Module):
    """1x1 expand -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> 1x1 project, with odd
    widths (as a slim MobileNetV2 has them); `reuse` also reads the expanded tensor elsewhere."""

    def __init__(self, cin: int, hidden: int, stride: int = 1, reuse: bool = False, divide: bool = False,
                 act: nn.Module | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.expand, self.bn1 = nn.Conv2d(cin, hidden, 1, bias=False), _bn(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False)
        self.bn2, self.project = _bn(hidden), nn.Conv2d(hidden, cin, 1)
        self.reuse, self.divide, self.stride = reuse, divide, stride
        self.act = act or nn.ReLU6()
        self.register_buffer("scale", torch.rand(1, hidden, 1, 1) + 0.5)

    def forward(self, x):
        h = self.act(self.bn1(self.expand(x)))
        if self.divide:
            h = h / self.scale
        y = self.project(nn.functional.relu6(self.bn2(self.dw(h))))
        if self.reuse:   # the expanded tensor is read twice: the pass must leave it alone
            y = y + h.mean(dim=1, keepdim=True)
        return y


def _depthwise_groups(model: nn.Module, x: torch.Tensor) -> list[int]:
    with tvm.target.Target({"kind": "llvm"}):
        mod = tvm.transform.Sequential(tvm_schedule.prepare_passes(16))(tvm_build.import_relax(model, x))
    return [int(g) for g in re.findall(r"groups=(\d+)", mod["main"].script()) if int(g) > 1]


def _build_matches_torch(model: nn.Module, x: torch.Tensor) -> None:
    art = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("hidden,stride,divide", [(29, 1, False), (29, 2, False), (58, 1, True), (10, 2, False)])
def test_odd_depthwise_runs_widened_and_matches_torch(hidden, stride, divide):
    model = InvertedResidual(7, hidden, stride, divide=divide).eval()
    x = torch.randn(1, 7, 12, 12)
    padded = -(-hidden // 8) * 8
    assert _depthwise_groups(model, x) == [padded]
    for batch in (1, 3):
        xb = torch.randn(batch, 7, 12, 12)
        _build_matches_torch(model, xb)


class Square(nn.Module):
    def forward(self, x):
        return x * x


@pytest.mark.parametrize("act", [nn.SiLU(), nn.Hardswish(), nn.GELU(), Square()],
                         ids=["silu", "hardswish", "gelu", "square"])
def test_activation_graphs_between_slice_and_depthwise_run_widened(act):
    """Hardswish arrives as x * clip(x + 3, 0, 6) / 6: x is read twice, both times inside
    (x * x: twice by one binding)."""
    model = InvertedResidual(7, 29, act=act).eval()
    x = torch.randn(2, 7, 12, 12)
    assert _depthwise_groups(model, x) == [32]
    _build_matches_torch(model, x)


def test_depthwise_whose_input_is_read_elsewhere_is_left_alone():
    model = InvertedResidual(7, 29, reuse=True).eval()
    x = torch.randn(1, 7, 12, 12)
    assert _depthwise_groups(model, x) == [29]
    _build_matches_torch(model, x)


def test_aligned_depthwise_is_left_alone():
    model = InvertedResidual(7, 32).eval()
    assert _depthwise_groups(model, torch.randn(1, 7, 12, 12)) == [32]
