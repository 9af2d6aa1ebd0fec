"""NCHW max pooling lowered as a row pass and a column pass (`runtime.tvm_pool`): the build
against torch, borders included (all-negative inputs, so a zero-padded or unclamped window
would show), and the default lowering kept where the two-pass form does not apply."""
import numpy as np
import pytest
import torch
import tvm

from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.targets import get_target
from rwdeploy.runtime.tvm_pool import ROWS

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


def test_channel_last_pooling_keeps_the_default_lowering():
    # after a conv the build is NHWC; the channel-innermost pool is ScheduleCPU's, not the two-pass one
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.MaxPool2d(3, 2, 1)).eval()
    x = torch.randn(1, 3, 12, 12)
    assert ROWS not in _lowered(model, x)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(tvm_build.build(model, x, "cpu", threads=1), x), ref,
                               rtol=1e-5, atol=1e-5)


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
