"""Output channels are padded to whole registers on cores with 512-bit units and with AVX2, and
to half registers on Zen 4 (`tvm_schedule.channel_unit`); either way the build computes the
model's function."""
import re

import numpy as np
import pytest
import torch
import tvm

from rwdeploy.runtime import tvm_build, tvm_schedule

nn = torch.nn


@pytest.mark.parametrize("target,unit", [
    ({"kind": "llvm", "mcpu": "znver4"}, 8),
    ({"kind": "llvm", "mcpu": "sapphirerapids"}, 16),
    ({"kind": "llvm", "mcpu": "skylake-avx512"}, 16),
    ({"kind": "llvm", "mcpu": "haswell"}, 8),
    ({"kind": "llvm", "mcpu": "znver3"}, 8),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, 4),
])
def test_channel_unit(target, unit):
    assert tvm_schedule.channel_unit(tvm.target.Target(target)) == unit


@pytest.mark.parametrize("channels,lanes,unit,width", [(24, 16, 16, 32), (24, 16, None, 24), (5, 16, 16, 8), (8, 16, 16, 8), (9, 16, 16, 16),
                                                       (5, 16, None, 8), (40, 16, 16, 48), (20, 4, None, 20)])
def test_padded_width(channels, lanes, unit, width):
    assert tvm_schedule.padded_width(channels, lanes, unit) == width


class InvertedResidual(nn.Module):
    """A MobileNetV2 block at 24 channels (expand 24 -> 72, depthwise, project 72 -> 24)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.expand = nn.Conv2d(24, 72, 1)
        self.depthwise = nn.Conv2d(72, 72, 3, padding=1, groups=72)
        self.project = nn.Conv2d(72, 24, 1)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        z = torch.clamp(self.expand(y), 0, 6)
        z = torch.clamp(self.depthwise(z), 0, 6)
        return y + self.project(z)


@pytest.mark.parametrize("unit", [8, 16])
def test_whole_register_padding_keeps_the_function(unit, monkeypatch):
    model = InvertedResidual().eval()
    x = torch.randn(1, 3, 14, 14)
    with tvm.target.Target({"kind": "llvm"}):
        mod = tvm.transform.Sequential(tvm_schedule.prepare_passes(16, unit=unit))(tvm_build.import_relax(model, x))
    widths = {int(c) for c in re.findall(r"R\.Tensor\(\(1, 14, 14, (\d+)\)", mod["main"].script())}
    # 24 -> 32 and 72 -> 80 with whole registers (sliced back to 24 and 72 after the layer);
    # both are already multiples of 8
    assert ({32, 80} <= widths) == (unit == 16) and {24, 72} <= widths
    monkeypatch.setattr(tvm_schedule, "channel_unit", lambda target: unit)
    art = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
