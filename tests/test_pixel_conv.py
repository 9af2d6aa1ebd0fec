"""Convolutions with few output channels, vectorised along output rows or their flattened map
(`runtime/tvm_pixel_conv`): which convs go that way (the lane rule by hand, the transposes' cost
on hand-sized graphs, when the flat map pays its copy), and builds that use them against torch:
row and channel padding, residual adds across the NCHW / NHWC border, a stride-2 neighbour,
flat maps with a partly filled last vector, batch > 1."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from rwdeploy.runtime.tvm_pixel_conv import flat_width, prefers_pixel_vectors, tiled_channels, uses_flat_map

tvm = pytest.importorskip("tvm")

from rwdeploy.runtime import tvm_build  # noqa: E402
from rwdeploy.runtime.tvm_pixel_conv import choose_pixel_convs  # noqa: E402
from rwdeploy.runtime.targets import get_target  # noqa: E402
from rwdeploy.runtime.tvm_schedule import padded_width, vector_lanes  # noqa: E402

# what the builds below choose depends on this host's vectors: 16 lanes (AVX-512) or 8 (AVX2)
HOST_LANES = vector_lanes(get_target("cpu", threads=1).tvm())


@pytest.mark.parametrize("channels, width, kw, expected", [
    (5, 32, {}, True),                  # 5 of 16 lanes by channels, 32 of 32 by pixels
    (10, 16, {}, True),                 # 10 of 16 against 16 of 16
    (19, 28, {}, True),                 # 19 of 32 against 28 of 32
    (16, 32, {}, False),                # whole channel vectors: nothing to gain
    (77, 56, {}, False),                # 77 of 80 against 56 of 64
    (19, 8, {}, False),                 # a row of 8 fills half a vector: 8 of 16
    (5, 32, {"stride": (2, 2)}, True),   # phases of the input row are contiguous loads
    (5, 32, {"stride": (3, 3)}, False),
    (5, 32, {"stride": (1, 2)}, False),
    (5, 32, {"groups": 5}, False),
    (5, 32, {"dilation": (2, 2)}, False),
    (5, 32, {"lanes": 8}, True),        # AVX2: 5 of 8 lanes by channels, 32 of 32 by pixels
    (8, 32, {"lanes": 8}, False),
    (20, 24, {"lanes": 8}, True),       # AVX2's margin (1.1): 20 of 24 against 24 of 24 (LeNet-5)
    (22, 24, {"lanes": 8}, False),      # 22 of 24: 1.09
    (5, 32, {"lanes": 8, "stride": (2, 2)}, False),  # AVX2: the strided stems measured slower
    (5, 32, {"lanes": 4}, False),       # NEON: not measured
])
def test_lane_rule(channels, width, kw, expected):
    lanes = kw.pop("lanes", 16)
    assert prefers_pixel_vectors(channels, width, lanes=lanes, channel_width=padded_width(channels, lanes, lanes),
                                 **kw) is expected


@pytest.mark.parametrize("height, width, channels, expected", [
    (8, 8, 19, True),     # 4 whole vectors against a half-register vector per row (8 of 16)
    (4, 4, 154, True),    # one whole vector against 4 of 16 lanes per row
    (7, 7, 38, True),     # 49 of 64 lanes against 7 of 16
    (28, 28, 19, False),  # rows fill 28 of 32 already: under the margin
    (10, 10, 5, False),   # 100 of 128 against 10 of 16: 5 channels do not pay the taps' copy
    (8, 8, 2, False),     # nor do 2
])
def test_flat_map_rule(height, width, channels, expected):
    assert uses_flat_map(height, width, 16, channels) is expected


@pytest.mark.parametrize("height, width, computed", [(8, 8, 64), (7, 7, 64), (4, 4, 16), (5, 5, 32),
                                                      (10, 10, 128), (14, 14, 224)])
def test_flat_width(height, width, computed):
    # whole vectors; 7 or 13 vectors (no divisor of 2-4 to tile by) get one more
    assert flat_width(height, width, 16) == computed


def test_a_flat_map_makes_a_row_of_8_pixel_vectorised():
    kw = dict(lanes=16, channel_width=padded_width(19, 16, 16))
    assert not prefers_pixel_vectors(19, 8, **kw)          # by rows: 8 of 16 against 19 of 32
    assert prefers_pixel_vectors(19, 8, out_height=8, **kw)  # flat: 64 of 64


@pytest.mark.parametrize("channels, computed", [(19, 20), (5, 5), (16, 16), (7, 7), (13, 14), (3, 3), (11, 12)])
def test_tiled_channels(channels, computed):
    assert tiled_channels(channels) == computed


def _relax_main(model: nn.Module, x: torch.Tensor):
    return tvm_build.import_relax(model.eval(), x)["main"]


def _chosen_shapes(model: nn.Module, x: torch.Tensor) -> list[tuple[int, ...]]:
    chosen = choose_pixel_convs(_relax_main(model, x), 16, lambda c: padded_width(c, 16, 16))
    return sorted(tuple(int(d) for d in w.value.shape) for w in chosen)


class Chain(nn.Module):
    """Two 5-channel 3x3 convs straight from the input: both pixel-vectorised, no transposes."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 5, 3, padding=1), nn.Conv2d(5, 5, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Projection(nn.Module):
    """A 64 -> 5 1x1 projection between two 64-channel convs (NHWC): its pixel vectors would save
    327680 MACs / 32 x (16/5 - 1) = 22528 cycles against 65536 + 5120 elements transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.p, self.b = nn.Conv2d(3, 64, 1), nn.Conv2d(64, 5, 1), nn.Conv2d(5, 64, 1)

    def forward(self, x):
        return self.b(self.p(torch.relu(self.a(x))))


def test_a_chain_from_the_input_is_chosen():
    assert _chosen_shapes(Chain(), torch.randn(1, 3, 32, 32)) == [(5, 3, 3, 3), (5, 5, 3, 3)]


def test_a_projection_between_nhwc_convs_does_not_pay_its_transposes():
    assert _chosen_shapes(Projection(), torch.randn(1, 3, 32, 32)) == []


class Stage(nn.Module):
    """A slim residual stage: 19 channels at 28x28 (rows and channels padded in the kernel), a
    residual add, then a stride-2 conv (NHWC) with a 1x1 shortcut and another residual."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 19, 3, padding=1)
        self.c1, self.c2 = nn.Conv2d(19, 19, 3, padding=1), nn.Conv2d(19, 19, 3, padding=1)
        self.bn = nn.BatchNorm2d(19)
        self.down, self.short = nn.Conv2d(19, 38, 3, stride=2, padding=1), nn.Conv2d(19, 38, 1, stride=2)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        z = torch.relu(self.bn(self.c2(torch.relu(self.c1(y)))) + y)
        return torch.relu(self.down(z) + self.short(z))


class Strided(nn.Module):
    """A 7x7 stride-2 stem (odd padding, 19 channels), max pooling, a 19-channel conv, then a
    stride-2 5 -> 10 transition with a 1x1 stride-2 shortcut, as slim ResNets have them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.stem, self.c = nn.Conv2d(3, 19, 7, stride=2, padding=3), nn.Conv2d(19, 5, 3, padding=1)
        self.down, self.short = nn.Conv2d(5, 10, 3, stride=2, padding=1), nn.Conv2d(5, 10, 1, stride=2)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)

    def forward(self, x):
        y = torch.relu(self.c(self.pool(torch.relu(self.stem(x)))))
        return torch.relu(self.down(y) + self.short(y))


def test_strided_convs_are_chosen_in_a_chain():
    assert _chosen_shapes(Strided(), torch.randn(1, 3, 64, 64)) == [
        (5, 19, 3, 3), (10, 5, 1, 1), (10, 5, 3, 3), (19, 3, 7, 7)]


class SmallMaps(nn.Module):
    """A slim ResNet's last stage: a stride-2 10 -> 19 transition to 8x8 with a 1x1 stride-2
    shortcut, a residual 19-channel block there (flat maps), then a stride-2 19 -> 38 conv to
    4x4 and a 19-channel conv on a 7x7 map (49 of 64 lanes: the last vector partly filled)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.stem = nn.Conv2d(3, 10, 3, padding=1)
        self.down, self.short = nn.Conv2d(10, 19, 3, stride=2, padding=1), nn.Conv2d(10, 19, 1, stride=2)
        self.c1, self.c2 = nn.Conv2d(19, 19, 3, padding=1), nn.Conv2d(19, 19, 3, padding=1)
        self.bn = nn.BatchNorm2d(19)
        self.last = nn.Conv2d(19, 38, 3, stride=2, padding=1)
        self.odd = nn.Conv2d(3, 19, 3, stride=2, padding=1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        z = torch.relu(self.down(y) + self.short(y))
        z = torch.relu(self.bn(self.c2(torch.relu(self.c1(z)))) + z)
        small = torch.relu(self.odd(x[:, :, :14, :14]))        # 19 channels at 7x7
        return torch.relu(self.last(z)).flatten(1).sum(1) + small.flatten(1).sum(1)


def test_small_maps_are_chosen_and_built_flat():
    model, x = SmallMaps().eval(), torch.randn(1, 3, 16, 16)
    assert _chosen_shapes(model, x) == [
        (10, 3, 3, 3), (19, 3, 3, 3), (19, 10, 1, 1), (19, 10, 3, 3), (19, 19, 3, 3), (19, 19, 3, 3),
        (38, 19, 3, 3)]
    kernels = tvm_build.build(model, x, "cpu", threads=1).kernels["scheduled"]
    # with 8 lanes an 8x8 map's rows are whole vectors: no flat map (its 16x16 convs go pixel)
    assert sum("conv2d_pixels_flat" in name for name in kernels) >= (4 if HOST_LANES >= 16 else 0)


@pytest.mark.parametrize("model, shape", [(Stage(), (2, 3, 28, 28)), (Chain(), (1, 3, 32, 32)),
                                          (Strided(), (2, 3, 64, 64)), (Strided(), (1, 3, 61, 61)),
                                          (SmallMaps(), (2, 3, 16, 16)), (SmallMaps(), (1, 3, 16, 16))])
def test_builds_with_pixel_convs_match_torch(model, shape, direct_pixel_convs):
    model.eval()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    art = tvm_build.build(model, x, "cpu", threads=1)
    if HOST_LANES >= 16 or isinstance(model, Chain):  # with 8 lanes the chain at least
        assert any("conv2d_pixels" in name for name in art.kernels.get("scheduled", []))
    assert not art.kernels.get("notes")  # no conv left unscheduled, no layout fallback
    got = tvm_build.run_local(art, x)
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def _pixel_conv_function(conv: nn.Module, x: torch.Tensor):
    from rwdeploy.runtime.targets import get_target

    target = get_target("cpu", threads=1).tvm()
    with target:
        mod = tvm_build.cpu_pipeline(target, {})(tvm_build.import_relax(nn.Sequential(conv, nn.ReLU()).eval(), x))
    return next(f for g, f in mod.functions.items()
                if isinstance(f, tvm.tirx.PrimFunc) and "conv2d_pixels" in g.name_hint)


def _copy_loops(script: str) -> list[str]:
    """The vectorised loops of a pixel conv's input copy: those before the parallel loop nest of
    its conv stage."""
    before_conv = script[:script.index('T.sblock("rw_conv2d_nchw_pixels')]
    return re.findall(r"T\.vectorized\((.*)\):", before_conv[:before_conv.rindex("T.parallel(")])


def _vec(*bounds: int) -> str:
    return ", ".join(f"T.int64({b})" for b in bounds)


@pytest.mark.parametrize("conv, hw, by_lanes", [
    (nn.Conv2d(5, 5, 3, padding=1), 32, {16: [_vec(1, 33)], 8: [_vec(1, 33)]}),  # 1 of padding each side
    (nn.Conv2d(10, 10, 3, padding=1), 16, {16: [_vec(1, 17)], 8: [_vec(1, 17)]}),
    # no padding: 4 columns past the row (8 lanes: 6 channels fill 6 of 8, not pixel-vectorised)
    (nn.Conv2d(3, 6, 5), 32, {16: [_vec(32)]}),
    # 28 columns read: 16 + 8 + 4 (8 lanes: 24 + 4), power-of-two pieces (one 28-lane vector
    # would be masked)
    (nn.Conv2d(5, 5, 3, padding=1), 28, {16: [_vec(1, 17), _vec(17, 25), _vec(25, 29)],
                                         8: [_vec(1, 25), _vec(25, 29)]}),
    # phases: not one to one (8 lanes: strided convs keep channel vectors)
    (nn.Conv2d(5, 10, 3, stride=2, padding=1), 32, {16: []}),
])
def test_padded_copy_interior_is_vectorised_and_matches_torch(conv, hw, by_lanes, direct_pixel_convs):
    """The padded input copy of a stride-1 pixel conv runs the columns it reads from the input as
    vectorised loops between the padding's (`vectorize_padded_copy`); the build is exact."""
    if HOST_LANES not in by_lanes:
        pytest.skip(f"not pixel-vectorised with {HOST_LANES}-lane vectors")
    pieces = by_lanes[HOST_LANES]
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, hw, hw)
    func = _pixel_conv_function(conv, x)
    assert _copy_loops(func.script()) == pieces
    model = nn.Sequential(conv, nn.ReLU()).eval()
    art = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-5, atol=1e-5)


def test_flat_copy_is_vectorised_per_column_tap_and_matches_torch(direct_pixel_convs):
    """The flat kernel's stride-1 copy ([n, c, rw, y, x] = input[y - 1, x + rw - 1]) is split
    into one loop per column tap, each vectorised over its own interior (by hand, 8 columns:
    tap 0 reads padding at x = 0, then [1, 8) = 4 + 2 + 1; tap 1 all 8; tap 2 [0, 7) = 4 + 2 +
    1, padding at x = 7; the pieces of 1 stay scalar); the build is exact. (Built direct: an
    8x8 3x3 conv otherwise goes folded row Winograd, `tvm_row_winograd`.)"""
    if HOST_LANES < 16:
        pytest.skip("with 8-lane vectors an 8x8 map's rows are whole vectors: no flat map")
    torch.manual_seed(0)
    conv = nn.Conv2d(19, 19, 3, padding=1)
    x = torch.randn(2, 19, 8, 8)
    func = _pixel_conv_function(conv, x)
    assert _copy_loops(func.script()) == [_vec(1, 5), _vec(5, 7), _vec(8), _vec(4), _vec(4, 6)]
    model = nn.Sequential(conv, nn.ReLU()).eval()
    art = tvm_build.build(model, x, "cpu", threads=1)
    assert any("conv2d_pixels_flat" in name for name in art.kernels.get("scheduled", []))
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-5, atol=1e-5)


def test_pixel_tile_fits_the_registers():
    from rwdeploy.runtime.tvm_pixel_conv import pixel_conv_tile

    # 20 channels, a 32-wide row of 4 vectors of 8: 20 accumulators take 5 channels with 32
    # registers, 12 take 2 with 16 (AVX2: 20 spilled)
    assert pixel_conv_tile([1, 20, 32], 32, 8, 32) == ((1, 5, 1), 32, 8)
    assert pixel_conv_tile([1, 20, 32], 32, 8, 16) == ((1, 2, 1), 32, 8)
