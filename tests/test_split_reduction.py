"""A batch-1 dense layer with one or two output vectors sums its reduction in independent slices
(`tvm_split_reduction`), so that several FMA chains are in flight; the function is unchanged."""
import re

import numpy as np
import pytest
import torch
import tvm

from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.targets import get_target
from rwdeploy.runtime.tvm_split_reduction import reduction_parts

nn = torch.nn


@pytest.mark.parametrize("length,vectors,parts", [
    (500, 1, 5),      # 8 would not divide 500; 5 slices of 100
    (2048, 1, 8),
    (1280, 2, 4),     # two output vectors: 4 slices make 8 chains
    (64, 1, 4),       # slices of at least 16 steps
    (30, 1, 1),       # 2 slices would be 15 steps each
    (97, 1, 1),       # prime: no even split
    (240, 4, 2),
    (4096, 8, 1),     # eight vectors are eight chains already
])
def test_reduction_parts(length, vectors, parts):
    assert reduction_parts(length, vectors) == parts


def _scheduled_dense(model: nn.Module, x: torch.Tensor) -> str:
    target = get_target("cpu", threads=1).tvm()
    with target:
        mod = tvm_build.cpu_pipeline(target, {})(tvm_build.import_relax(model, x))
    scripts = [f.script() for g, f in mod.functions.items()
               if isinstance(f, tvm.tirx.PrimFunc) and "dense" in g.name_hint]
    assert len(scripts) == 1
    return scripts[0]


def _partial_sums(script: str) -> tuple[int, int] | None:
    """(slices, channels) of the partial-sum block, or None where the reduction is not split;
    asserts its loops: the slices unrolled, then the channels in unrolled vectors."""
    match = re.search(r"T\.sblock_alloc_buffer\(\(T\.int64\((\d+)\), T\.int64\(1\), T\.int64\((\d+)\)\)\)", script)
    if match is None:
        return None
    slices, channels = int(match.group(1)), int(match.group(2))
    update = script[:script.index('T.sblock("rw_dense_packed_rf_update")')]
    loops = re.findall(r"in T\.(unroll|vectorized)\(T\.int64\((\d+)\)\)", update)
    vectors = [] if channels == int(loops[-1][1]) else [("unroll", str(channels // int(loops[-1][1])))]
    assert loops[-2 - len(vectors):] == [("unroll", str(slices)), *vectors, ("vectorized", loops[-1][1])]
    return slices, channels


@pytest.mark.parametrize("inputs,outputs,batch,split", [
    # by the host's lanes: slim LeNet-5's classifier, 10 outputs computed as 16 (two vectors of 8)
    (500, 10, 1, {16: (5, 16), 8: (4, 16)}),
    (1280, 32, 1, {16: (4, 32), 8: (2, 32)}),   # two vectors of 16 (four of 8) per slice
    (500, 10, 2, None),       # two pixels: a register tile of two chains already
    (19, 10, 1, None),        # too short to split
])
def test_one_pixel_dense_split_and_matches_torch(inputs, outputs, batch, split):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(inputs, outputs), nn.ReLU()).eval()
    x = torch.randn(batch, inputs)
    script = _scheduled_dense(model, x)
    got = _partial_sums(script)
    from rwdeploy.runtime.targets import get_target
    from rwdeploy.runtime.tvm_schedule import vector_lanes
    if split is None:
        assert got is None
    else:
        assert got == split[vector_lanes(get_target("cpu", threads=1).tvm())]
    art = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model.double()(x.double()).numpy()
    out = tvm_build.run_local(art, x)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6 * np.abs(ref).max())
