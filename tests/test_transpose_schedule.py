"""Layout transposes in a cpu build (`runtime.tvm_transpose`): tiled, parallel, and exactly
the permutation (compared with torch's element for element)."""
import numpy as np
import pytest
import torch

from rwdeploy.runtime import tvm_build


class Permute(torch.nn.Module):
    def __init__(self, perm: tuple[int, ...]) -> None:
        super().__init__()
        self.perm = perm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.perm).contiguous()


@pytest.mark.parametrize("shape,perm,scheduled", [
    ((1, 28, 28, 32), (0, 3, 1, 2), True),     # NHWC -> NCHW (a dense stem's output among packed layers)
    ((2, 24, 9, 9), (0, 2, 3, 1), True),       # NCHW -> NHWC, batch 2
    ((1, 7, 5, 12), (0, 3, 1, 2), True),       # extents no tile of 16 divides
    ((3, 20, 36), (0, 2, 1), True),
    ((1, 3, 32, 32), (0, 2, 3, 1), False),     # an RGB input to NHWC: 3 channels, left to LLVM
])
def test_transpose_is_tiled_and_exact(shape, perm, scheduled):
    torch.manual_seed(0)
    x, model = torch.randn(shape), Permute(perm)
    art = tvm_build.build(model, x, "cpu", threads=1)
    names = art.kernels.get("scheduled", [])
    assert any("transpose" in n for n in names) == scheduled, art.kernels
    np.testing.assert_array_equal(tvm_build.run_local(art, x), model(x).numpy())
