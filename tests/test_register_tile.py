"""The register tile of the dense conv / matmul schedule (`tvm_schedule.register_tile`): the
shapes it picks for AVX-512 (16 lanes, 32 registers), and a build whose packed weight and
schedule agree on the tile, against torch."""
import math
import re

import numpy as np
import pytest
import torch
import tvm

from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.targets import get_target
from rwdeploy.runtime.tvm_schedule import (CACHED_WEIGHT_BYTES, WEIGHT_STREAMS, RegisterTile, inlines_padding,
                                           pixel_box, register_tile, streamed_reduction, streams_weights, vector_lanes)

MB = 1 << 20


@pytest.mark.parametrize("pixels,channels,weight_bytes,tile", [
    # weights in L2: loads <= FMAs, then most pixels (2 vectors x 8 rather than 4 x 4)
    ([1, 32, 32], 64, 147 << 10, RegisterTile((1, 1, 8), 32, 16)),
    ([1, 16, 16], 128, 576 << 10, RegisterTile((1, 1, 8), 32, 16)),
    # up to 28 accumulators (the broadcast is a memory operand): 2 x 14 pixels, not 4 x 4
    ([1, 28, 28], 64, 147 << 10, RegisterTile((1, 1, 14), 32, 16)),
    ([1, 14, 14], 256, 0, RegisterTile((1, 1, 14), 32, 16)),
    # weights streamed from beyond L2: after 16 accumulators two vectors (a stream each)
    ([1, 4, 4], 512, 9 * MB, RegisterTile((1, 2, 4), 32, 16)),
    ([1, 7, 7], 512, 9 * MB, RegisterTile((1, 1, 7), 32, 16)),
    ([1, 4, 4], 512, 0, RegisterTile((1, 2, 4), 32, 16)),
    ([1, 2, 2], 512, 9 * MB, RegisterTile((1, 2, 2), 64, 16)),   # 4 pixels: 16 accumulators first
    ([1, 32, 32], 16, 9 << 10, RegisterTile((1, 1, 16), 16, 16)),  # one vector is all there is
    ([1, 48, 48], 144, 36 << 10, RegisterTile((1, 1, 8), 48, 16)),  # three vectors x 8 pixels
    # a short reduction (5 or 32 inputs per output) keeps the tile under 1 KB, on the stack
    ([1, 112, 112], 32, 5 * 32 * 4, RegisterTile((1, 1, 7), 32, 16)),
    ([1, 28, 28], 64, 32 * 64 * 4, RegisterTile((1, 1, 7), 32, 16)),
    ([1, 48, 48], 144, 1 << 10, RegisterTile((1, 1, 4), 48, 16)),
    # weights read from L2 on a map of 16-28 pixels: the whole map by one vector reads them once
    ([1, 4, 4], 160, 887 << 10, RegisterTile((1, 4, 4), 16, 16)),
    ([1, 5, 5], 96, 300 << 10, RegisterTile((1, 5, 5), 16, 16)),
    ([1, 4, 4], 160, 200 << 10, RegisterTile((1, 2, 4), 32, 16)),   # weights that stay nearer
    ([2, 4, 4], 160, 887 << 10, RegisterTile((1, 2, 4), 32, 16)),   # 32 pixels: over the budget
    ([1, 2, 2], 160, 887 << 10, RegisterTile((1, 2, 2), 32, 16)),   # 4 pixels: 4 accumulators would not do
    ([1], 1024, 4 * MB, RegisterTile((1,), 64, 16)),                # batch-1 dense: four chains
    # no run of rows reaches 16 FMAs (a 7x7 map, 5 vectors of channels): a box across images
    ([8, 7, 7], 80, 217 << 10, RegisterTile((4, 1, 7), 16, 16)),
    ([8, 7, 7], 256, 0, RegisterTile((2, 1, 7), 32, 16)),
    ([8, 7, 7], 192, 608 << 10, RegisterTile((1, 1, 7), 48, 16)),   # 3 vectors x 7 rows: 21 FMAs
    ([1, 7, 7], 80, 217 << 10, RegisterTile((1, 1, 7), 16, 16)),   # one image, 7 is prime
    ([8], 1024, 16 * MB, RegisterTile((8,), 32, 16)),
])
def test_register_tile_avx512(pixels, channels, weight_bytes, tile):
    assert register_tile(pixels, channels, 16, 32, weight_bytes) == tile


@pytest.mark.parametrize("pixels,channels,lanes,registers,tile", [
    # narrower vectors keep the most FMAs per load: 4 vectors x 4 pixels (8 loads for 16 FMAs),
    # not 2 x 8 (10 loads), whether or not the weights stream
    ([1, 32, 32], 64, 4, 32, RegisterTile((1, 1, 4), 16, 4)),
    ([1, 4, 4], 512, 4, 32, RegisterTile((1, 1, 4), 16, 4)),
    ([1, 7, 7], 512, 4, 32, RegisterTile((1, 1, 7), 8, 4)),
    ([1, 56, 56], 64, 8, 16, RegisterTile((1, 1, 2), 32, 8)),   # AVX2: 4 vectors x 2 pixels
])
def test_register_tile_narrow_vectors(pixels, channels, lanes, registers, tile):
    for weight_bytes in (0, 9 * MB):
        assert register_tile(pixels, channels, lanes, registers, weight_bytes) == tile


@pytest.mark.parametrize("channels,hw", [(256, 4), (64, 16), (160, 4)])
def test_packed_weight_and_schedule_agree_and_match_torch(channels, hw, direct_convs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(1, channels, hw, hw)
    weight_bytes = channels * channels * 9 * 4
    tgt = get_target("cpu", threads=1).tvm()
    lanes = vector_lanes(tgt)
    expected = register_tile([1, hw, hw], channels, lanes, 32 if lanes >= 16 else 16, weight_bytes)
    with tgt:
        mod = tvm_build.cpu_pipeline(tgt, {})(tvm_build.import_relax(model, x))
    conv = next(f for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in g.name_hint)
    script = conv.script()
    # the packed weight (CO/T, 3, 3, CI, T) is blocked by the tile the schedule splits channels
    # by, or by one vector of it where the weights are streamed (a stream per vector)
    streamed = streams_weights(weight_bytes, lanes)
    packed = re.search(r"T\.Buffer\(\(T\.int64\((\d+)\), T\.int64\(3\), T\.int64\(3\), T\.int64\(\d+\), T\.int64\((\d+)\)\)", script)
    assert packed and int(packed.group(2)) == (expected.width if streamed else expected.channels)
    # ... and the schedule tiles by it: innermost the vectorised width, then the unrolled
    # channel vectors (when more than one), then the unrolled pixels
    from tvm import s_tir

    sch = s_tir.Schedule(conv)
    extents = [int(sch.get(l).extent) for l in sch.get_loops(sch.get_sblock("rw_conv2d_nhwc_packed_update"))]
    tail = extents[-3:] if expected.vectors > 1 else [1, *extents[-2:]]
    pixels = math.prod(expected.pixels)
    assert tail == ([pixels, expected.vectors, expected.width] if expected.vectors > 1
                    else [1, pixels, expected.width])
    # streamed weights: the innermost reduction as WEIGHT_STREAMS interleaved parts
    assert (extents[-4 if expected.vectors > 1 else -3] == WEIGHT_STREAMS) == streamed
    assert (weight_bytes > CACHED_WEIGHT_BYTES) == (channels == 256)
    # the padded copy of the input (a stage of its own for a non-depthwise conv) is vectorised
    assert re.search(r"T\.vectorized\(T\.int64\(\d+\)\):\s+with T\.sblock\(\"rw_pad\"\)", script)
    art = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_box_pixel_tile():
    assert pixel_box([8, 7, 7], 28) == [4, 1, 7]
    assert pixel_box([8, 4, 4], 14) == [1, 2, 4]     # 8 pixels either way: the longer inner runs
    assert pixel_box([1, 7, 7], 28) == [1, 1, 7]
    assert pixel_box([6, 5], 4) == [3, 1]
    assert pixel_box([3, 5], 2) == [1, 1]


def test_box_tiled_conv_with_residual_epilogue_matches_torch(direct_convs):
    """A 7x7 map at batch 8 with 80 channels is tiled 4 images x 1 row x 7 by one vector; the
    epilogue (bias, residual add, ReLU) is written per tile, across images."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(77, 77, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x) + x)

    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(8, 77, 7, 7)
    tgt = get_target("cpu", threads=1).tvm()
    if vector_lanes(tgt) < 16:
        pytest.skip("box tiles are chosen for 512-bit vectors only")
    assert register_tile([8, 7, 7], 80, 16, 32, 77 * 77 * 9 * 4).pixels == (4, 1, 7)
    with tgt:
        mod = tvm_build.cpu_pipeline(tgt, {})(tvm_build.import_relax(model, x))
    conv = next(f for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in g.name_hint)
    from tvm import s_tir

    sch = s_tir.Schedule(conv)
    extents = [int(sch.get(l).extent) for l in sch.get_loops(sch.get_sblock("rw_conv2d_nhwc_packed_update"))]
    assert extents[-2:] == [28, 16]   # the unrolled box's pixels, then the vector
    art = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_streamed_reduction_rounds_inputs_up_only_for_streamed_weights():
    assert streamed_reduction(358, 358 * 358 * 36, 16) == 360
    assert streamed_reduction(360, 360 * 360 * 36, 16) == 360
    assert streamed_reduction(179, 179 * 179 * 36, 16) == 180
    assert streamed_reduction(358, 512 << 10, 16) == 358   # cached weights: no streams to split into
    assert streamed_reduction(358, 9 * MB, 4) == 358         # NEON: weights are not streamed


@pytest.mark.parametrize("ci,co,kernel,hw", [(358, 358, 3, 4), (715, 1430, 1, 7)])
def test_unaligned_inputs_of_streamed_weights_are_padded_into_streams_and_match_torch(ci, co, kernel, hw):
    """358 inputs (slim VGG-16-BN 30 % with --align off) compute over 360, zero weights against
    zero input channels; a 1x1 conv gets its channel padding as its own copy of the input."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(ci, co, kernel, padding=kernel // 2), torch.nn.ReLU()).eval()
    x = torch.randn(1, ci, hw, hw)
    tgt = get_target("cpu", threads=1).tvm()
    lanes = vector_lanes(tgt)
    inputs = streamed_reduction(ci, ci * co * kernel * kernel * 4, lanes)
    with tgt:
        mod = tvm_build.cpu_pipeline(tgt, {})(tvm_build.import_relax(model, x))
    conv = next(f for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in g.name_hint)
    from tvm import s_tir

    sch = s_tir.Schedule(conv)
    extents = [int(sch.get(l).extent) for l in sch.get_loops(sch.get_sblock("rw_conv2d_nhwc_packed_update"))]
    if lanes >= 16:
        assert inputs % WEIGHT_STREAMS == 0 and inputs > ci
        assert WEIGHT_STREAMS in extents and inputs // WEIGHT_STREAMS in extents  # split into the streams
    art = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("padding", [(0, 0, 0, 0), (1, 1, 1, 1)])
def test_input_channel_padding_is_zero_and_keeps_the_data(padding):
    from tvm import te

    from rwdeploy.runtime.tvm_legalize import _pad_nhwc

    data = te.placeholder((1, 2, 3, 5), name="data")
    func = te.create_prim_func([data, _pad_nhwc(data, padding, channels=8)])
    kernel = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    x = np.arange(1, 31, dtype="float32").reshape(1, 2, 3, 5)  # no zero inside the data
    top, left, bottom, right = padding
    out = tvm.runtime.tensor(np.full((1, 2 + top + bottom, 3 + left + right, 8), np.nan, "float32"))
    kernel(tvm.runtime.tensor(x), out)
    want = np.zeros((1, 2 + top + bottom, 3 + left + right, 8), "float32")
    want[:, top:top + 2, left:left + 3, :5] = x
    np.testing.assert_array_equal(out.numpy(), want)


def test_padding_is_read_in_place_only_by_few_channel_convs_that_read_each_input_a_few_times():
    stem = ([1, 226, 226, 3], [1, 112, 112], 27)           # MobileNetV2: 3x3 stride 2, 2.2 reads an input
    assert inlines_padding(*stem, 16)
    assert inlines_padding(*stem, 8)                                         # AVX2 as AVX-512
    assert not inlines_padding(*stem, 4)                                     # NEON: not measured
    assert not inlines_padding([1, 34, 34, 3], [1, 32, 32], 27, 16)          # 3x3 stride 1: 8 reads
    assert not inlines_padding([1, 118, 118, 3], [1, 56, 56], 147, 16)       # 7x7 stride 2: 11 reads
    assert not inlines_padding([1, 226, 226, 16], [1, 112, 112], 144, 16)    # a whole vector of channels


@pytest.mark.parametrize("ci,co,kernel,stride,hw", [(3, 32, 3, 2, 23), (3, 16, 3, 2, 20), (3, 16, 7, 2, 20),
                                                     (3, 16, 3, 1, 9), (16, 16, 3, 2, 9)])
def test_few_channel_conv_reads_its_padding_in_place_and_matches_torch(ci, co, kernel, stride, hw):
    """A 3x3 stride-2 stem (3 input channels; odd and even maps, so that every border case
    occurs) has no padded copy of its input on a 256- or 512-bit target; 7x7 or stride-1 stems and a
    conv of 16 inputs keep it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(ci, co, kernel, stride, kernel // 2), torch.nn.ReLU6(),
                                torch.nn.Conv2d(co, co, 1)).eval()
    x = torch.randn(2, ci, hw, hw) + 1.0   # a positive mean: a border read as data, not zero, shows
    tgt = get_target("cpu", threads=1).tvm()
    with tgt:
        mod = tvm_build.cpu_pipeline(tgt, {})(tvm_build.import_relax(model, x))
    # the padded conv is the first (`fused_conv2d_add...`; the 1x1 after it is `fused_conv2d1_...`)
    conv = next(f for g, f in mod.functions.items()
                if isinstance(f, tvm.tirx.PrimFunc) and g.name_hint.startswith("fused_conv2d_add"))
    in_place = vector_lanes(tgt) >= 8 and ci == 3 and kernel == 3 and stride == 2
    assert ('sblock("rw_pad")' not in conv.script()) == in_place
    art = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
