"""NCHW max pooling lowered as a row pass and a column pass (`runtime.tvm_pool`): the build
against torch, borders included (all-negative inputs, so a zero-padded or unclamped window
would show), and the default lowering kept where the two-pass form does not apply."""
import numpy as np
import pytest
import torch
import tvm

from rwdeploy.runtime import tvm_build, tvm_pixel_conv
from rwdeploy.runtime.targets import get_target
from rwdeploy.runtime.tvm_pool import CHANNEL_LAST, ROWS

nn = torch.nn


class PoolThenRelu(nn.Module):
    def __init__(self, pool: nn.Module, relu: bool):
        super().__init__()
        self.pool, self.relu = pool, relu

    def forward(self, x):
        y = self.pool(x)
        return torch.relu(y + 2.0) if self.relu else y


def _lowered(model: nn.Module, x: torch.Tensor) -> str:
    tgt = get_target("cpu", threads=1).tvm()
    with tgt:
        mod = tvm_build.cpu_pipeline(tgt, {})(tvm_build.import_relax(model, x))
    return "\n".join(f.script() for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc))


CASES = [  # kernel, stride, padding, input (C, H, W), ceil mode
    ((3, 3), (2, 2), (1, 1), (5, 23, 23), False),    # ResNet's stem pool, odd size
    ((3, 3), (2, 2), (1, 1), (4, 24, 24), False),
    ((2, 2), (2, 2), (0, 0), (3, 16, 17), False),
    ((3, 3), (1, 1), (1, 1), (2, 9, 11), False),
    ((3, 2), (2, 1), (1, 0), (3, 13, 10), False),   # non-square kernel and stride
    ((5, 5), (3, 3), (2, 2), (2, 20, 19), False),
    ((2, 2), (2, 2), (0, 0), (2, 6, 130), False),   # a row wider than one vector piece (26 x 5)
    ((3, 3), (2, 2), (0, 0), (2, 13, 13), True),    # ceil mode: TVM's default lowering
]


@pytest.mark.parametrize("kernel,stride,padding,shape,ceil", CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_max_pool_nchw_matches_torch(kernel, stride, padding, shape, ceil, relu):
    model = PoolThenRelu(nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil), relu).eval()
    x = -torch.rand(2, *shape) - 1.0      # every value negative: a zero in a window would win
    art = tvm_build.build(model, x, "cpu", threads=1)
    got = tvm_build.run_local(art, x)
    with torch.no_grad():
        ref = model(x).numpy()
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)  # max pooling is exact
    assert (ROWS in _lowered(model, x)) == (not ceil)


class ChannelLastPool(nn.Module):
    """An identity 1x1 conv first: the build runs it, and so the pool, channel-last (NHWC);
    the conv passes every value through exactly (one product by 1.0, the rest by 0.0)."""

    def __init__(self, channels: int, pool: nn.Module, relu: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(channels)[:, :, None, None])
        self.pool = PoolThenRelu(pool, relu)

    def forward(self, x):
        return self.pool(self.conv(x))


@pytest.mark.parametrize("kernel,stride,padding,shape,ceil", CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_max_pool_nhwc_matches_torch(kernel, stride, padding, shape, ceil, relu, monkeypatch):
    """Channel-last pooling reads the input in place (no -inf padded copy): borders clamp."""
    # the identity conv must run NHWC: with 4-5 channels it would go row-vectorised (NCHW)
    monkeypatch.setattr(tvm_pixel_conv, "MARGIN", float("inf"))
    monkeypatch.setattr(tvm_pixel_conv, "MARGIN_256_BIT", float("inf"))
    model = ChannelLastPool(shape[0], nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil), relu).eval()
    x = -torch.rand(2, *shape) - 1.0      # every value negative: a zero in a window would win
    with torch.no_grad():
        ref = model(x).numpy()
    got = tvm_build.run_local(tvm_build.build(model, x, "cpu", threads=1), x)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)
    lowered = _lowered(model, x)
    assert (CHANNEL_LAST in lowered) == (not ceil) and ROWS not in lowered
    if not ceil:
        assert "T.vectorized" in next(f for f in lowered.split("@T.prim_func") if CHANNEL_LAST in f)


def test_row_pass_runs_per_output_row_inside_the_column_pass():
    # the schedule, not only the function: the rows intermediate is computed under the column
    # pass's (channel, output row) loops, so it is one row, not a second tensor
    from tvm import s_tir

    from rwdeploy.runtime.tvm_pool import COLS

    model = PoolThenRelu(nn.MaxPool2d(3, 2, 1), False).eval()
    x = torch.randn(1, 4, 24, 24)
    tgt = get_target("cpu", threads=1).tvm()
    with tgt:
        mod = tvm_build.cpu_pipeline(tgt, {})(tvm_build.import_relax(model, x))
    func = next(f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and ROWS in f.script())
    sch = s_tir.Schedule(func)
    rows, cols = sch.get_loops(sch.get_sblock(ROWS)), sch.get_loops(sch.get_sblock(COLS))
    assert len(rows) > 2 and all(sch.get(a).same_as(sch.get(b)) for a, b in zip(rows[:2], cols[:2]))


# width 17: the 2x2 windows read 16 columns, and compute_at narrows the row pass to them
@pytest.mark.parametrize("width,piece", [(24, 24), (130, 26), (17, 16)])
def test_row_pass_is_vectorised_in_whole_pieces(width, piece):
    # left to LLVM the row pass got 4-lane code at best; the schedule vectorises it in pieces
    # of at most 4 x 16 lanes that divide the row (no remainder loop)
    from tvm import s_tir

    model = PoolThenRelu(nn.MaxPool2d(2, 2), False).eval()
    x = torch.randn(2, 3, 8, width)
    tgt = get_target("cpu", threads=1).tvm()
    with tgt:
        mod = tvm_build.cpu_pipeline(tgt, {})(tvm_build.import_relax(model, x))
    func = next(f for _, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and ROWS in f.script())
    sch = s_tir.Schedule(func)
    inner = sch.get(sch.get_loops(sch.get_sblock(ROWS))[-1])
    assert int(inner.extent) == piece and inner.kind == tvm.tirx.ForKind.VECTORIZED
