"""Winograd F(2x2, 3x3) convs (`runtime.tvm_winograd`): the rule, the transforms against a direct
correlation by hand, and built layers against torch."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm

from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.targets import get_target
from rwdeploy.runtime.tvm_schedule import vector_lanes
from rwdeploy.runtime.tvm_winograd import (F2, F4, WINO_INPUT, WINO_OUTPUT, MinimalFilter, choose_winograd,
                                           tiles, transform_weight)


def _chosen(ci: int, out: tuple[int, int, int], co: int | None = None, strides=(1, 1), lanes=16, kernel=3):
    f = choose_winograd((kernel, kernel, ci, co or ci), strides, (1, 1), 1, lanes, out)
    return None if f is None else f.m


def test_rule():
    # too few inputs, strided, dilated, 5x5, 4-lane vectors: direct
    assert _chosen(15, (1, 28, 28)) is None
    assert _chosen(64, (1, 28, 28), strides=(2, 2)) is None
    assert choose_winograd((3, 3, 64, 64), (1, 1), (2, 2), 1, 16, (1, 28, 28)) is None
    assert _chosen(64, (1, 28, 28), kernel=5) is None
    assert _chosen(64, (1, 28, 28), lanes=4) is None
    assert _chosen(64, (1, 28, 28), lanes=8) == 4    # AVX2 as AVX-512
    # many tiles share the transformed weight: F4's fewer products win
    assert _chosen(64, (1, 28, 28)) == 4 and _chosen(64, (8, 8, 8)) == 4 and _chosen(77, (8, 7, 7)) == 4
    assert _chosen(16, (1, 32, 32)) == 4 and _chosen(38, (8, 14, 14)) == 4   # dense ResNet-20, slim ResNet-18
    # few tiles: F4's 4x weight bytes cost more than its products save (ResNet-56 at batch 1)
    assert _chosen(64, (1, 8, 8)) == 2 and _chosen(256, (1, 7, 7)) == 2 and _chosen(512, (8, 4, 4)) == 2
    # a 2x2 map: F4 would compute 4x4 outputs; one image of a 512-channel map: direct
    assert _chosen(512, (8, 2, 2)) == 2
    assert _chosen(512, (1, 4, 4)) is None and _chosen(512, (1, 2, 2)) is None
    assert tiles(F2, 8, 7, 7) == 8 * 16 and tiles(F4, 8, 7, 7) == 8 * 4 and tiles(F2, 1, 28, 28) == 196


@pytest.mark.parametrize("f", [F2, F4], ids=["F2", "F4"])
def test_minimal_filter_matrices_compute_a_direct_correlation(f: MinimalFilter):
    """Y = A^T [(G g G^T) * (B^T d B)] A, in float64 from the filter's matrices and the packed
    `transform_weight`, against the m x m correlation of an (m+2)^2 tile with a 3x3 filter."""
    rng = np.random.default_rng(0)
    d, g = rng.standard_normal((f.alpha, f.alpha)), rng.standard_normal((3, 3))
    u = transform_weight(g.reshape(3, 3, 1, 1), 1, f).reshape(f.alpha, f.alpha).astype(np.float64)
    bt, at = np.array(f.input_rows, float), np.array(f.output_rows, float)
    y = at @ (u * (bt @ d @ bt.T)) @ at.T
    direct = np.array([[np.sum(d[r:r + 3, q:q + 3] * g) for q in range(f.m)] for r in range(f.m)])
    np.testing.assert_allclose(y, direct, rtol=1e-5, atol=1e-5 * np.abs(direct).max())


def test_packed_weight_layout():
    """U[e, o // T, c, o % T] is position e of output channel o's transformed filter over input c."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 3, 5, 8)).astype(np.float32)
    packed = transform_weight(w, 4, F2)
    assert packed.shape == (16, 2, 5, 4)
    g = np.array(F2.filter_rows)
    one = g @ w[:, :, 3, 6].astype(np.float64) @ g.T      # input 3, output 6
    np.testing.assert_allclose(packed[:, 1, 3, 2], one.reshape(16), rtol=1e-6, atol=1e-6)


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


@pytest.mark.parametrize("ci,co,hw,batch,padding,residual,m", [
    (64, 64, 8, 1, 1, False, 2),      # ResNet-56's last stage at batch 1
    (80, 80, 7, 2, 1, True, 2),       # odd map: the last tile's extra row and column dropped; residual epilogue
    (64, 48, 10, 1, 0, False, 2),     # no padding: 8x8 out of 10x10
    (64, 64, 16, 1, 1, False, 4),     # even map
    (77, 77, 7, 8, 1, True, 4),       # channels no vector divides, 7 = 4 + 3
    (96, 64, 9, 8, 1, False, 4),      # 9 = 4 + 4 + 1
])
def test_winograd_conv_matches_torch(ci, co, hw, batch, padding, residual, m):
    tgt = get_target("cpu", threads=1).tvm()
    if vector_lanes(tgt) < 8:
        pytest.skip("Winograd convs are chosen with 256-bit or wider vectors only")
    assert _chosen(ci, (batch, hw + 2 * padding - 2, hw + 2 * padding - 2), co) == m
    torch.manual_seed(0)
    model = _Block(ci, co, padding, residual).eval()
    x = torch.randn(batch, ci, hw, hw)
    with tgt:
        mod = tvm_build.cpu_pipeline(tgt, {})(tvm_build.import_relax(model, x))
    funcs = [f for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and "winograd" in g.name_hint]
    assert len(funcs) == 1
    script = funcs[0].script()
    positions = re.search(r'rw_winograd_gemm = T\.sblock_alloc_buffer\(\(T\.int64\((\d+)\)', script)
    assert positions and int(positions.group(1)) == (m + 2) ** 2
    # scheduled: the transforms vectorised over channels, the epilogue (bias, residual, ReLU)
    # inlined into the output stage, no loop nest of its own
    assert "T.vectorized" in script
    blocks = set(re.findall(r'T\.sblock\("(\w+)"\)', script)) - {"root"}
    gemm = {"rw_winograd_gemm_init", "rw_winograd_gemm_update", "rw_winograd_gemm_global"}
    assert gemm <= blocks and all(b.startswith((WINO_INPUT, WINO_OUTPUT)) for b in blocks - gemm), blocks
    assert any(b.startswith(WINO_INPUT) for b in blocks) and any(b.startswith(WINO_OUTPUT) for b in blocks)
    # input channels no vector divides: the input transform in two parts (whole vectors, the
    # rest), each vectorised; the output's channels are the GEMM tile's (whole vectors); and the
    # GEMM's init, update and write-back
    assert script.count("T.vectorized") == (2 if ci % 16 else 1) + 1 + 3
    art = tvm_build.build(model, x, "cpu", threads=1)
    assert not art.kernels.get("unscheduled") and any("winograd" in k for k in art.kernels["scheduled"])
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_hardswish_epilogue_is_inlined_into_the_output_transform():
    """x * clip(x + 3, 0, 6) / 6 reads the conv's output twice (a diamond): the output stage
    still computes it in place, no loop nest of its own (`tvm_schedule._inline_epilogue`)."""
    tgt = get_target("cpu", threads=1).tvm()
    if vector_lanes(tgt) < 8:
        pytest.skip("Winograd convs are chosen with 256-bit or wider vectors only")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.Hardswish()).eval()
    x = torch.randn(2, 32, 16, 16)
    with tgt:
        mod = tvm_build.cpu_pipeline(tgt, {})(tvm_build.import_relax(model, x))
    funcs = [f for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and "winograd" in g.name_hint]
    assert len(funcs) == 1
    blocks = set(re.findall(r'T\.sblock\("(\w+)"\)', funcs[0].script())) - {"root"}
    assert all(b.startswith((WINO_INPUT, WINO_OUTPUT, "rw_winograd_gemm")) for b in blocks), blocks
    art = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
