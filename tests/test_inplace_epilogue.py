"""A kernel writing its output over the residual its epilogue reads (`runtime/tvm_inplace_epilogue.py`):
the per-kernel safety rule on hand-made kernels, and built models against torch."""
import numpy as np
import pytest
import torch
from torch import nn
import tvm
from tvm import te

from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.tvm_inplace_epilogue import reads_only_where_written


def _func(*tensors: te.Tensor):
    return te.create_prim_func(list(tensors))


def test_an_elementwise_epilogue_may_write_over_what_it_reads():
    a, b = te.placeholder((4, 8), name="a"), te.placeholder((4, 8), name="b")
    out = te.compute((4, 8), lambda i, j: a[i, j] * 2.0 + b[i, j], name="out")
    f = _func(a, b, out)
    assert reads_only_where_written(f, 0, 2) and reads_only_where_written(f, 1, 2)


def test_a_read_at_another_element_forbids_it():
    a = te.placeholder((16,), name="a")
    out = te.compute((16,), lambda i: a[i] + a[(i + 1) % 16], name="out")   # a neighbour's value
    assert not reads_only_where_written(_func(a, out), 0, 1)
    t = te.placeholder((4, 4), name="t")
    flipped = te.compute((4, 4), lambda i, j: t[j, i] + 1.0, name="flipped")  # a transpose
    assert not reads_only_where_written(_func(t, flipped), 0, 1)


def test_a_reduction_or_a_second_stage_forbids_it():
    a, w = te.placeholder((8,), name="a"), te.placeholder((8, 8), name="w")
    k = te.reduce_axis((0, 8), name="k")
    # the output accumulates over k: a[i] would be read after out[i] was first written
    dot = te.compute((8,), lambda i: te.sum(a[i] * w[i, k], axis=k), name="dot")
    assert not reads_only_where_written(_func(a, w, dot), 0, 2)
    # a read by a stage before the one that writes the output: that stage would see outputs
    doubled = te.compute((8,), lambda i: a[i] * 2.0, name="doubled")
    out = te.compute((8,), lambda i: doubled[(i + 3) % 8] + a[i], name="out")
    assert not reads_only_where_written(_func(a, out), 0, 1)


def test_a_parameter_that_is_not_read_or_is_written_is_not_a_candidate():
    a, b = te.placeholder((8,), name="a"), te.placeholder((8,), name="b")
    out = te.compute((8,), lambda i: a[i] + 1.0, name="out")
    assert not reads_only_where_written(_func(a, b, out), 1, 2)   # b is never read
    first = te.compute((8,), lambda i: a[i] * 3.0, name="first")
    second = te.compute((8,), lambda i: first[i] + 2.0, name="second")
    # two outputs, the second read from the first where written: still two tensors
    assert not reads_only_where_written(_func(a, first, second), 1, 2)


class _Bottleneck(nn.Module):
    """A residual block whose last 1x1 conv adds the shortcut (its own conv's output) in its
    epilogue; `reuse_shortcut`: a further conv, on the block's output, adds the shortcut again,
    so its kernel runs after the block's and the block's must not write over the shortcut."""

    def __init__(self, channels: int, mid: int, reuse_shortcut: bool = False):
        super().__init__()
        self.shortcut = nn.Conv2d(channels, channels, 1)
        self.reduce = nn.Conv2d(channels, mid, 1)
        self.conv = nn.Conv2d(mid, mid, 3, padding=1)
        self.expand = nn.Conv2d(mid, channels, 1)
        self.after = nn.Conv2d(channels, channels, 1) if reuse_shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.shortcut(x)
        y = torch.relu(self.expand(torch.relu(self.conv(torch.relu(self.reduce(x))))) + r)
        return y if self.after is None else self.after(y) + r


def _build(model: nn.Module, x: torch.Tensor):
    tvm_build.set_threads(1)
    art = tvm_build.build(model.eval(), x, "cpu", threads=1)
    _, got = tvm_build.bind_local(art, x)
    return art, got


@pytest.mark.parametrize("batch,channels,mid,hw", [(1, 32, 16, 10), (2, 48, 8, 7)])
def test_a_residual_conv_writes_over_its_shortcut_and_matches_torch(batch, channels, mid, hw):
    torch.manual_seed(0)
    model = _Bottleneck(channels, mid)
    x = torch.randn(batch, channels, hw, hw)
    art, got = _build(model, x)
    in_place = art.kernels.get("in place", [])
    assert len(in_place) == 1 and "conv2d" in in_place[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_a_shortcut_read_again_later_is_written_over_only_by_its_last_reader():
    torch.manual_seed(1)
    model = _Bottleneck(32, 16, reuse_shortcut=True)
    x = torch.randn(1, 32, 9, 9)
    art, got = _build(model, x)
    # the block's conv must leave the shortcut (the later conv adds it); the later one may not
    assert len(art.kernels.get("in place", [])) == 1
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_the_callers_input_is_never_written_over():
    # Linears need no layout change: the second one's epilogue adds the function's parameter
    torch.manual_seed(2)
    fc0, fc = nn.Linear(64, 64).eval(), nn.Linear(64, 64).eval()

    class Residual(nn.Module):
        def forward(self, x):
            return torch.relu(fc(torch.relu(fc0(x))) + x)

    x = torch.randn(4, 64)
    before = x.clone()
    art, got = _build(Residual(), x)
    assert "in place" not in art.kernels or not art.kernels["in place"]
    np.testing.assert_array_equal(x.numpy(), before.numpy())
    np.testing.assert_allclose(got, Residual()(x).detach().numpy(), rtol=1e-4, atol=1e-5)


class _Identity(nn.Module):
    """A bottleneck whose shortcut is its input: chained, each block's output (written over its
    own shortcut) stays live across the next block's three convs as that block's shortcut."""

    def __init__(self, channels: int, mid: int):
        super().__init__()
        self.reduce, self.conv = nn.Conv2d(channels, mid, 1), nn.Conv2d(mid, mid, 3, padding=1)
        self.expand = nn.Conv2d(mid, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.expand(torch.relu(self.conv(torch.relu(self.reduce(x))))) + x)


def test_chained_blocks_keep_each_written_over_shortcut_alive_until_its_last_reader():
    torch.manual_seed(3)
    model = nn.Sequential(_Identity(32, 8), _Identity(32, 8), _Identity(32, 8))
    x = torch.randn(2, 32, 12, 12)
    art, got = _build(model, x)
    assert len(art.kernels.get("in place", [])) == 3
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)
