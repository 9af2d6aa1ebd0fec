"""Row Winograd F(4, 3) for pixel-vectorised convs (`runtime/tvm_row_winograd.py`): the rule, the
transforms against a direct correlation, and built layers against torch."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm
from torch import nn

from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.targets import get_target
from rwdeploy.runtime.tvm_row_winograd import (F4, ROW_WINO_INPUT, ROW_WINO_OUTPUT, ROW_WINO_ROWS,
                                               choose_row_winograd, transform_row_weight)
from rwdeploy.runtime.tvm_schedule import vector_lanes


@pytest.mark.parametrize("kernel, stride, out_h, out_w, lanes, flat, expected", [
    ((3, 3), (1, 1), 32, 32, 16, False, F4),
    ((3, 3), (1, 1), 28, 28, 16, False, F4),       # rows of 16 + 8 + 4
    ((3, 3), (1, 1), 14, 14, 16, False, None),     # no whole tiles of 4 rows
    ((3, 3), (1, 1), 8, 8, 16, True, F4),          # flat map: folded, 2 row tiles x 8 columns
    ((3, 3), (1, 1), 16, 8, 16, True, F4),         # 4 tiles x 8: two vectors
    ((3, 3), (1, 1), 4, 4, 16, True, None),        # 1 tile x 4 columns: a quarter vector
    ((3, 3), (1, 1), 12, 12, 16, True, None),      # 3 tiles x 12 = 36: no whole vectors
    ((3, 3), (2, 2), 16, 16, 16, False, None),
    ((1, 1), (1, 1), 32, 32, 16, False, None),
    ((3, 3), (1, 1), 32, 32, 8, False, F4),        # AVX2: rows of 4 x 8
    ((3, 3), (1, 1), 28, 28, 8, False, F4),        # 24 + 4
    ((3, 3), (1, 1), 32, 32, 4, False, None),      # NEON: not measured
    ((3, 3), (1, 1), 32, 6, 16, False, None),      # a row no vector pieces of 4 cover
])
def test_rule(kernel, stride, out_h, out_w, lanes, flat, expected):
    assert choose_row_winograd(kernel, stride, (1, 1), out_h, out_w, lanes, flat) is expected


def test_one_dimensional_f4_is_a_correlation():
    rng = np.random.default_rng(0)
    d, g = rng.standard_normal(6), rng.standard_normal(3)
    bt, gm, at = (np.array(rows, np.float64) for rows in (F4.input_rows, F4.filter_rows, F4.output_rows))
    got = at @ ((gm @ g) * (bt @ d))
    want = np.array([d[i:i + 3] @ g for i in range(4)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_weight_transform_is_g_per_kernel_column():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    u = transform_row_weight(w, F4)
    assert u.shape == (4, 3, 6, 3)
    one = np.array(F4.filter_rows) @ w[2, 1, :, 0].astype(np.float64)   # output 2, input 1, column 0
    np.testing.assert_allclose(u[2, 1, :, 0], one, rtol=1e-6, atol=1e-6)


class _Block(nn.Module):
    """conv + BN + ReLU, then conv + BN + residual + ReLU (where the shapes allow)."""

    def __init__(self, ci: int, co: int, padding: int):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(ci, co, 3, padding=padding), nn.BatchNorm2d(co)
        self.c2, self.b2 = nn.Conv2d(co, co, 3, padding=1), nn.BatchNorm2d(co)
        for bn in (self.b1, self.b2):
            with torch.no_grad():
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(y)) + y)


def _functions(model: nn.Module, x: torch.Tensor) -> list:
    target = get_target("cpu", threads=1).tvm()
    with target:
        mod = tvm_build.cpu_pipeline(target, {})(tvm_build.import_relax(model, x))
    return [f for g, f in mod.functions.items()
            if isinstance(f, tvm.tirx.PrimFunc) and "row_winograd" in g.name_hint]


# the flat (folded) layers need 16 lanes (with 8, rows of 8 are whole vectors), and the
# 19-channel 28x28 layer was written for them (with 8 it depends on `MARGIN_256_BIT`)
@pytest.mark.parametrize("ci, co, hw, batch, padding, folded, lanes", [
    (5, 5, 32, 1, 1, False, 8),      # slim ResNet-20 70 %'s first stage
    (10, 10, 16, 8, 1, False, 8),    # its second, a batch
    (19, 19, 28, 2, 1, False, 16),   # 20 channels computed (`tiled_channels`), rows of 28 = 16 + 8 + 4
    (7, 5, 18, 1, 0, False, 8),      # no padding: 16 x 16 out of 18 x 18, then a padded conv
    (19, 19, 8, 1, 1, True, 16),     # its third (8x8, flat): 2 row tiles x 8 columns per vector
    (19, 19, 8, 8, 1, True, 16),
    (24, 19, 10, 2, 0, True, 16),    # no padding: 8 x 8 out of 10 x 10, then a padded conv
])
def test_built_layers_match_torch(ci, co, hw, batch, padding, folded, lanes):
    if vector_lanes(get_target("cpu", threads=1).tvm()) < lanes:
        pytest.skip(f"row Winograd is chosen for this layer with {lanes}-lane vectors or wider")
    torch.manual_seed(0)
    model = _Block(ci, co, padding).eval()
    x = torch.randn(batch, ci, hw, hw)
    funcs = _functions(model, x)
    assert len(funcs) == 2   # both convs
    for func in funcs:
        script = func.script()
        # the three stages, the epilogue (bias, residual, ReLU) inlined into the output stage
        # rather than left as loop nests of their own, rows in vectors
        blocks = set(re.findall(r'T\.sblock\("([a-z_0-9]+)"\)', script))
        assert all(any(b.startswith(stage) for b in blocks) for stage in (ROW_WINO_INPUT, ROW_WINO_OUTPUT))
        assert not any(b.startswith(("T_add", "compute", "T_multiply")) for b in blocks), blocks
        assert "T.vectorized" in script
        # folded: the transformed rows, then one copy per column tap ([n, c, e, 3, T, W])
        assert any(b.startswith(ROW_WINO_ROWS) for b in blocks) is folded
        if folded:
            alloc = re.search(rf"{ROW_WINO_INPUT} = T\.sblock_alloc_buffer\((.*)\)$", script, re.M)
            dims = [int(v) for v in re.findall(r"T\.int64\((\d+)\)", alloc.group(1))]
            assert dims[0] == batch and dims[2:] == [6, 3, 2, 8], dims   # 8x8 out: 2 tiles of 4 rows
    art = tvm_build.build(model, x, "cpu", threads=1)
    assert not art.kernels.get("notes")
    assert sum("row_winograd" in k for k in art.kernels["scheduled"]) == 2
    with torch.no_grad():
        want = model(x).numpy()
    got = tvm_build.run_local(art, x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
