"""Layers with one output pixel (a batch-1 Linear, a conv on a 1x1 map as in squeeze-excite
blocks) get output channels in multiples of four registers (`tvm_schedule.single_row_width`),
so that their register tile holds four independent FMA chains; the function is unchanged."""
import re

import numpy as np
import pytest
import torch
import tvm

from rwdeploy.runtime import tvm_build, tvm_schedule

nn = torch.nn


@pytest.mark.parametrize("channels,lanes,width", [(1000, 16, 1024), (150, 16, 192), (33, 16, 64), (32, 16, 32),
                                                  (10, 16, 16), (100, 8, 128), (9, 4, 16), (5, 4, 8)])
def test_single_row_width(channels, lanes, width):
    assert tvm_schedule.single_row_width(channels, lanes) == width


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 40, 3, padding=1)
        self.reduce, self.expand = nn.Conv2d(40, 36, 1), nn.Conv2d(36, 40, 1)
        self.fc = nn.Linear(40, 100)

    def forward(self, x):
        y = self.conv(x)
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(y.mean((2, 3), keepdim=True)))))
        return self.fc((y * gate).mean((2, 3)))


@pytest.mark.parametrize("batch", [1, 2])
def test_one_pixel_layers_padded_to_four_registers_and_match_torch(batch):
    model = SqueezeExcite().eval()
    x = torch.randn(batch, 3, 6, 6)
    with tvm.target.Target({"kind": "llvm"}):
        mod = tvm.transform.Sequential(tvm_schedule.prepare_passes(16))(tvm_build.import_relax(model, x))
    script = mod["main"].script()
    # at batch 1: 36 -> 64, 40 -> 64 (the 1x1-map convs), 100 -> 128 (the Linear); the 6x6 conv
    # keeps 40 (a multiple of 8); at batch 2 every layer has two or more pixels
    shapes = sorted({int(c) for c in re.findall(r"R\.Tensor\(\(\d+, (?:1, 1, )?(\d+)\), dtype", script)})
    wide = {64, 128} if batch == 1 else set()
    assert wide <= set(shapes) and (batch == 1 or not {64, 128} & set(shapes))
    art = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
