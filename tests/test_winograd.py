"""Winograd F(2x2, 3x3) convs (`runtime.tvm_winograd`): the rule, the transforms against a direct
correlation by hand, and built layers against torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.targets import get_target
from rwdeploy.runtime.tvm_schedule import vector_lanes
from rwdeploy.runtime.tvm_winograd import (_B_FIRST, _B_SECOND, _B_SIGN, POSITIONS, WINO_INPUT, WINO_OUTPUT,
                                           tiles, transform_weight, uses_winograd)


def test_rule():
    conv = (3, 3, 64, 64)
    assert uses_winograd(conv, (1, 1), (1, 1), 1, 16, 196)
    assert not uses_winograd((3, 3, 32, 64), (1, 1), (1, 1), 1, 16, 196)    # too few inputs
    assert not uses_winograd(conv, (2, 2), (1, 1), 1, 16, 196)
    assert not uses_winograd(conv, (1, 1), (2, 2), 1, 16, 196)
    assert not uses_winograd((5, 5, 64, 64), (1, 1), (1, 1), 1, 16, 196)
    assert not uses_winograd(conv, (1, 1), (1, 1), 1, 8, 196)                # measured on 512-bit cores only
    # a transformed weight streamed from memory needs tiles enough to share it
    assert not uses_winograd((3, 3, 512, 512), (1, 1), (1, 1), 1, 16, 4)
    assert uses_winograd((3, 3, 512, 512), (1, 1), (1, 1), 1, 16, 8)
    assert uses_winograd((3, 3, 160, 160), (1, 1), (1, 1), 1, 16, 4)        # 1.6 MB of U: stays in L2
    assert tiles(8, 7, 7) == 8 * 16 and tiles(1, 28, 28) == 196


def test_transforms_by_hand_match_a_direct_correlation():
    """The three transforms in numpy, as the compute writes them (B^T's rows as a(k) + s(k) b(k),
    A^T's as signed sums of three), against the 2x2 correlation of a 4x4 tile with a 3x3 filter."""
    rng = np.random.default_rng(0)
    d, g = rng.standard_normal((4, 4)), rng.standard_normal((3, 3))
    u = transform_weight(g.reshape(3, 3, 1, 1).astype(np.float32), 1).reshape(4, 4).astype(np.float64)
    bd = np.array([d[_B_FIRST[k]] + _B_SIGN[k] * d[_B_SECOND[k]] for k in range(4)])
    v = np.array([bd[:, _B_FIRST[k]] + _B_SIGN[k] * bd[:, _B_SECOND[k]] for k in range(4)]).T
    m = u * v
    signs = {0: (1, 1, 1), 1: (1, -1, -1)}
    y = np.array([[sum(signs[r][k] * signs[q][l] * m[r + k, q + l] for k in range(3) for l in range(3))
                   for q in range(2)] for r in range(2)])
    direct = np.array([[np.sum(d[r:r + 3, q:q + 3] * g) for q in range(2)] for r in range(2)])
    np.testing.assert_allclose(y, direct, rtol=1e-6, atol=1e-6)
    assert u.size == POSITIONS


class _Block(torch.nn.Module):
    def __init__(self, ci: int, co: int, padding: int, residual: bool):
        super().__init__()
        self.conv = torch.nn.Conv2d(ci, co, 3, padding=padding)
        self.bn = torch.nn.BatchNorm2d(co)
        self.residual = residual
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return torch.relu(y + x) if self.residual else torch.relu(y)


@pytest.mark.parametrize("ci,co,hw,batch,padding,residual", [
    (64, 64, 16, 1, 1, False),     # even map
    (80, 80, 7, 2, 1, True),       # odd map: the last tile's extra row and column dropped; residual epilogue
    (77, 77, 7, 8, 1, True),       # channels no vector divides
    (64, 48, 10, 1, 0, False),     # no padding: 8x8 out of 10x10
    (96, 64, 9, 3, 1, False),      # odd map at an odd batch
])
def test_winograd_conv_matches_torch(ci, co, hw, batch, padding, residual):
    tgt = get_target("cpu", threads=1).tvm()
    if vector_lanes(tgt) < 16:
        pytest.skip("Winograd convs are chosen on 512-bit vector cores only")
    torch.manual_seed(0)
    model = _Block(ci, co, padding, residual).eval()
    x = torch.randn(batch, ci, hw, hw)
    with tgt:
        mod = tvm_build.cpu_pipeline(tgt, {})(tvm_build.import_relax(model, x))
    funcs = [f for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and "winograd" in g.name_hint]
    assert len(funcs) == 1
    script = funcs[0].script()
    # scheduled: the transforms vectorised over channels, the epilogue (bias, residual, ReLU)
    # inlined into the output stage, no loop nest of its own
    assert "T.vectorized" in script and f'T.sblock("{WINO_INPUT}")' in script
    blocks = set(__import__("re").findall(r'T\.sblock\("(\w+)"\)', script))
    assert blocks <= {WINO_INPUT, "rw_winograd_gemm", "rw_winograd_gemm_init", "rw_winograd_gemm_update",
                      f"{WINO_OUTPUT}", "rw_winograd_gemm_global", "root"}, blocks
    art = tvm_build.build(model, x, "cpu", threads=1)
    assert not art.kernels.get("unscheduled") and any("winograd" in k for k in art.kernels["scheduled"])
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
