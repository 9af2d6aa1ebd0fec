"""Streamed weights are prefetched: a kernel whose weights exceed the caches gets one prefetch
per weight stream, `PREFETCH_AHEAD_BYTES` ahead of the stream's load, and still matches torch;
a kernel with cached weights gets none."""
import numpy as np
import pytest
import torch
import tvm
from torch import nn
from tvm import tirx

from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.targets import get_target
from rwdeploy.runtime.tvm_schedule import streams_weights, vector_lanes
from rwdeploy.runtime.tvm_weight_prefetch import ANNOTATION, weight_prefetch_pass, weight_streams, with_prefetches

I32 = "int32"


def _ramp(base, lanes: int = 16):
    return tirx.Ramp(base, tirx.IntImm(I32, 1), lanes)


def _tile_loop(nested: bool = False):
    """A hand-made innermost reduction loop, as an unrolled register tile lowers to: two weight
    streams 1024 floats apart (the second through a bound name, as CSE leaves it), a broadcast
    input, accumulators at constant offsets."""
    w = tirx.decl_buffer((8192,), "float32", name="w")
    x = tirx.decl_buffer((64,), "float32", name="x")
    acc = tirx.decl_buffer((32,), "float32", name="acc")
    i = tirx.Var("i", I32)
    second = tirx.Var("second", I32)
    i16 = i * tirx.IntImm(I32, 16)

    def fma(offset, weight_base):
        lanes = _ramp(tirx.IntImm(I32, offset))
        value = (tirx.BufferLoad(acc, [lanes])
                 + tirx.Broadcast(tirx.BufferLoad(x, [i]), 16) * tirx.BufferLoad(w, [_ramp(weight_base)]))
        return tirx.BufferStore(acc, value, [lanes])

    body = [fma(0, i16), tirx.Bind(second, i16 + tirx.IntImm(I32, 1024)), fma(16, second)]
    if nested:
        j = tirx.Var("j", I32)
        body.append(tirx.For(j, tirx.IntImm(I32, 0), tirx.IntImm(I32, 2), tirx.ForKind.SERIAL, fma(0, i16 + j)))
    loop = tirx.For(i, tirx.IntImm(I32, 0), tirx.IntImm(I32, 64), tirx.ForKind.SERIAL, tirx.SeqStmt(body),
                    None, {ANNOTATION: tirx.IntImm(I32, 1)})
    return loop, i


def _prefetched_indices(loop) -> list:
    body = loop.body.seq if isinstance(loop.body, tirx.SeqStmt) else [loop.body]
    indices = []
    for stmt in body:
        call = getattr(stmt, "value", None)
        if isinstance(stmt, tirx.Evaluate) and "llvm.prefetch" in str(call):
            indices.append(call.args[1].args[0].indices[0])  # (intrinsic id, address_of(load), ...)
    return indices


def test_each_moving_vector_load_is_one_stream():
    loop, i = _tile_loop()
    streams = weight_streams(loop)
    assert [s[2] for s in streams] == [16, 16]  # the accumulators (stride 0) and x (scalar) are not streams
    assert all(s[0].name == "w" for s in streams)
    bases = [tvm.sym.detect_linear_equation(s[1], [i]) for s in streams]
    assert [[int(c) for c in b] for b in bases] == [[16, 0], [16, 1024]]


def test_prefetch_lands_the_set_distance_ahead_of_each_stream():
    loop, i = _tile_loop()
    out = with_prefetches(loop, ahead_bytes=512)
    indices = _prefetched_indices(out)
    # 512 bytes = 128 floats ahead of each stream's current load
    assert [[int(c) for c in tvm.sym.detect_linear_equation(ix, [i])] for ix in indices] == [[16, 128], [16, 1152]]
    assert len(out.body.seq) == len(loop.body.seq) + 2  # appended after the original statements
    assert with_prefetches(loop, ahead_bytes=0).same_as(loop)


def test_a_body_with_a_nested_loop_is_left_alone():
    loop, _ = _tile_loop(nested=True)
    assert weight_streams(loop) == []
    assert with_prefetches(loop).same_as(loop)


def test_the_pass_only_touches_annotated_loops():
    loop, i = _tile_loop()
    plain = tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind, loop.body)
    for stmt, expected in ((loop, 2), (plain, 0)):
        func = tirx.PrimFunc([], stmt)
        out = weight_prefetch_pass()(tvm.IRModule({"main": func}))["main"]
        assert len(_prefetched_indices(out.body)) == expected


def _kernel_ir(executable) -> str:
    return executable.mod.imports[0].inspect_source("ll")


@pytest.mark.parametrize("channels,streamed", [(256, True), (64, False)])
def test_built_conv_prefetches_only_streamed_weights_and_matches_torch(channels, streamed, direct_convs):
    torch.manual_seed(0)
    # 256 -> 256 3x3: 2.4 MB of weights, above CACHED_WEIGHT_BYTES; 64 -> 64: 147 KB, cached
    model = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, channels, 7, 7)
    art = tvm_build.build(model, x, "cpu", threads=1)
    _, got = tvm_build.bind_local(art, x)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    lanes = vector_lanes(get_target("cpu", threads=1).tvm())
    # streams (and so prefetches) need 512-bit vectors: on a narrower host none is expected
    expected = streams_weights(channels * channels * 9 * 4, lanes)
    assert expected == (streamed and lanes >= 16)
    assert ("call void @llvm.prefetch" in _kernel_ir(art.executable)) == expected


def test_benchmark_builds_without_prefetch_at_distance_zero_and_restores_the_default(direct_convs):
    import importlib.util
    import sys
    from pathlib import Path

    from rwdeploy.runtime import tvm_weight_prefetch

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "streamed_weights.py"
    spec = importlib.util.spec_from_file_location("streamed_weights_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    default = tvm_weight_prefetch.PREFETCH_AHEAD_BYTES
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()).eval()
    x = torch.randn(1, 256, 7, 7)
    streamed = streams_weights(256 * 256 * 9 * 4, vector_lanes(get_target("cpu", threads=1).tvm()))
    for ahead, expected in ((0, False), (default, streamed)):
        art = bench.build_with_distance(model, x, ahead, threads=1)
        assert tvm_weight_prefetch.PREFETCH_AHEAD_BYTES == default
        assert ("call void @llvm.prefetch" in _kernel_ir(art.executable)) == expected


def test_batch1_dense_layer_streams_without_prefetch_and_matches_torch():
    """A one-pixel tile (a batch-1 Linear) feeds one FMA per weight vector: its streams get no
    prefetch (measured slower there), though its weights (5 MB) are streamed."""
    torch.manual_seed(0)
    model = nn.Linear(1280, 1000).eval()
    x = torch.randn(1, 1280)
    art = tvm_build.build(model, x, "cpu", threads=1)
    _, got = tvm_build.bind_local(art, x)
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
    assert "call void @llvm.prefetch" not in _kernel_ir(art.executable)
