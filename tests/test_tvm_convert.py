"""Converters for ops TVM's Relax importer lacks (runtime/tvm_convert.py), built and run with
TVM for the cpu target and compared with torch; and the import error for an op with none."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwdeploy.errors import TvmImportError
from rwdeploy.passes.verify import compare
from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.tvm_convert import adaptive_bins

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class AdaptiveMaxPools(nn.Module):
    """Several adaptive max poolings of one input, flattened side by side (one TVM build)."""

    def __init__(self, sizes: list[tuple[int | None, int | None]]) -> None:
        super().__init__()
        self.sizes = sizes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.adaptive_max_pool2d(x, s).flatten(1) for s in self.sizes], dim=1)


def _tvm_vs_torch(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, object]:
    artifact = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model(x)
    return ref, compare(ref, artifact_output(artifact, x), tolerance=0.0)


def artifact_output(artifact, x):
    return torch.from_numpy(tvm_build.run_local(artifact, x))


def test_adaptive_bins_match_torchs_windows():
    """Hand-computed: 7 -> 3 windows overlap ([0,3), [2,5), [4,7)); 8 -> 4 tile exactly."""
    assert adaptive_bins(7, 3) == [(0, 3), (2, 5), (4, 7)]
    assert adaptive_bins(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert adaptive_bins(5, 5) == [(i, i + 1) for i in range(5)]


@pytest.mark.parametrize("shape, sizes", [
    # output sizes that divide the input: max_pool2d with kernel = stride
    ((2, 3, 8, 12), [(4, 4), (2, 3), (1, 1), (8, 12), (None, 6)]),
    # sizes that do not: overlapping windows, one axis or both
    ((2, 3, 7, 10), [(3, 3), (4, 5), (5, None), (2, 4), (6, 7), (7, 10)]),
], ids=["divides", "does-not-divide"])
def test_adaptive_max_pool2d_matches_torch(shape, sizes):
    model = AdaptiveMaxPools(sizes).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ref, check = _tvm_vs_torch(model, x)
    assert check.mismatch is None and check.max_abs == 0.0, check  # a max selects, it does not round


def test_adaptive_max_pool2d_after_a_conv_in_a_classifier_head():
    """The form it takes in real networks: conv -> adaptive max pool to 1x1 -> linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveMaxPool2d((3, 3)), nn.Flatten(),
                          nn.Linear(72, 10)).eval()
    _, check = _tvm_vs_torch(model, torch.randn(1, 3, 12, 12))
    assert check.max_rel <= 1e-5, check


def test_amax_matches_torch():
    class GlobalMax(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x.amax((2, 3)), torch.logsumexp(x, dim=1).flatten(1)], dim=1)

    _, check = _tvm_vs_torch(GlobalMax().eval(), torch.randn(2, 4, 5, 6))
    assert check.max_rel <= 1e-5, check


class RReLUNet(nn.Module):
    """nn.RReLU in eval mode: torch.export keeps it as aten.rrelu_with_noise_functional, an op
    TVM 0.27's importer lacks and rwdeploy has no converter for."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.RReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x)).mean(dim=(2, 3))


def test_an_op_without_converter_names_the_node():
    with pytest.raises(TvmImportError) as info:
        tvm_build.import_relax(RReLUNet().eval(), torch.randn(1, 3, 8, 8))
    err = info.value
    assert "rrelu_with_noise_functional" in err.message and err.node and err.node in err.message
    assert "'act'" in err.message  # the module it comes from
    assert "--target onnx" in err.hint and "none" not in err.hint


class Windows(nn.Module):
    """im2col and col2im (F.unfold / F.fold) with padding, stride, dilation and a non-square
    kernel: kept whole for TVM (torch decomposes them into indexing TVM 0.27 cannot import)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = F.unfold(x, 3, padding=1, stride=2)
        y = F.fold(torch.relu(cols - 0.1), (x.shape[2], x.shape[3]), 3, padding=1, stride=2)
        return torch.cat([y.flatten(1), F.unfold(x, (2, 3), dilation=(1, 2)).flatten(1)], 1)


def test_im2col_and_col2im_match_torch():
    model, x = Windows().eval(), torch.randn(2, 3, 7, 9)
    script = tvm_build.import_relax(model, x).script()
    assert "conv2d_transpose" in script  # col2im as a transposed conv, not decomposed indexing
    _, check = _tvm_vs_torch(model, x)
    assert check.max_rel <= 1e-6, check


class HaloWindows(nn.Module):
    """Tensor.unfold as HaloNet uses it (overlapping windows: size > step) along two dims, and a
    non-overlapping one on the last dim, whose length the windows do not divide."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        halo = x.unfold(2, 4, 2).unfold(3, 5, 3)          # (N, C, 3, 2, 4, 5) for 8x9 maps
        tail = x.unfold(-1, 2, 2)                          # (N, C, 8, 4, 2): the 9th column unused
        return torch.cat([halo.flatten(1), torch.relu(tail).flatten(1)], 1)


@pytest.mark.parametrize("shape", [(2, 3, 8, 9), (1, 2, 10, 11)])
def test_unfold_matches_torch(shape):
    model, x = HaloWindows().eval(), torch.randn(*shape)
    _, check = _tvm_vs_torch(model, x)
    assert check.max_abs == 0.0, check  # windows only copy values
