"""conv -> add(constant) -> batch norm (what `remove_zero_channels` leaves where it folded a
removed channel into the next layer: a per-channel bias, or a border map where that layer pads
with zeros) folds into the conv like a plain conv -> batch norm (`runtime.tvm_bn_bias`), and
the build still computes what torch does; an add of another activation is left alone."""
import numpy as np
import pytest
import torch
import tvm

from rwdeploy.runtime import tvm_build, tvm_schedule

nn = torch.nn


class ConvAddBatchNorm(nn.Module):
    def __init__(self, added: str):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()
            self.bn.bias.normal_()
        self.added = added
        self.register_buffer("b", torch.randn(1, 8, 1, 1) if added == "per channel" else torch.randn(1, 8, 6, 6))
        self.other = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        if self.added == "border map":   # as remove_zero_channels writes it: a conv of a ones map
            y = y + nn.functional.conv2d(torch.ones(1, 3, 6, 6), self.other.weight.expand(8, 3, 3, 3), padding=1)
        else:
            y = y + (self.other(x) if self.added == "activation" else self.b)
        return torch.relu(self.bn(y))


@pytest.mark.parametrize("added", ["per channel", "map", "border map", "activation"])
def test_bias_before_batch_norm_folds_and_matches_torch(added):
    model = ConvAddBatchNorm(added).eval()
    x = torch.randn(2, 3, 6, 6)
    with tvm.target.Target({"kind": "llvm"}):
        mod = tvm.transform.Sequential(tvm_schedule.prepare_passes(16))(tvm_build.import_relax(model, x))
    decomposed = any(op in mod["main"].script() for op in ("R.subtract", "R.divide", "R.sqrt"))
    assert decomposed is (added == "activation")   # folded into the conv when the add is a constant
    art = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
