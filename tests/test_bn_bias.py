"""conv -> add(per-channel constant) -> batch norm (what `remove_zero_channels` leaves where it
folded a removed channel into the next layer's bias) folds into the conv like a plain
conv -> batch norm (`runtime.tvm_bn_bias`), and the build still computes what torch does; an
add that is not per channel is left alone."""
import numpy as np
import pytest
import torch
import tvm

from rwdeploy.runtime import tvm_build, tvm_schedule

nn = torch.nn


class ConvAddBatchNorm(nn.Module):
    def __init__(self, per_channel: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        with torch.no_grad():
            self.bn.running_mean.normal_()
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.normal_()
            self.bn.bias.normal_()
        self.register_buffer("b", torch.randn(1, 8, 1, 1) if per_channel else torch.randn(1, 8, 6, 6))

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x) + self.b))


@pytest.mark.parametrize("per_channel", [True, False])
def test_bias_before_batch_norm_folds_and_matches_torch(per_channel):
    model = ConvAddBatchNorm(per_channel).eval()
    x = torch.randn(2, 3, 6, 6)
    with tvm.target.Target({"kind": "llvm"}):
        mod = tvm.transform.Sequential(tvm_schedule.prepare_passes(16))(tvm_build.import_relax(model, x))
    decomposed = any(op in mod["main"].script() for op in ("R.subtract", "R.divide", "R.sqrt"))
    assert decomposed is not per_channel   # folded into the conv only when the add is per channel
    art = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
