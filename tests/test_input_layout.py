"""A conv reading the model's few-channel NCHW input in place of a transpose
(`runtime/tvm_input_layout.py`): the Relax rewrite, the built kernels, and outputs against torch."""
import numpy as np
import pytest
import torch
import tvm

from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.targets import get_target
from rwdeploy.runtime.tvm_input_layout import fold_input_transpose_pass, folds_transpose
from rwdeploy.runtime.tvm_schedule import vector_lanes


def _stem(ci: int, co: int, kernel: int, stride: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(ci, co, kernel, stride, kernel // 2), torch.nn.ReLU6(),
                               torch.nn.Conv2d(co, co, 1)).eval()


def _calls(mod: tvm.IRModule, op: str) -> list:
    found = []
    for func in mod.functions.values():
        if isinstance(func, tvm.relax.Function):
            tvm.relax.analysis.post_order_visit(
                func.body, lambda e: found.append(e) if isinstance(e, tvm.relax.Call)
                and getattr(e.op, "name", None) == op else None)
    return found


def test_only_inputs_of_fewer_channels_than_a_256_bit_or_wider_vector_fold():
    assert folds_transpose(3, 16) and folds_transpose(15, 16) and folds_transpose(3, 8)
    assert not folds_transpose(16, 16) and not folds_transpose(8, 8) and not folds_transpose(3, 4)


@pytest.mark.parametrize("ci,folded", [(3, True), (16, False)])
def test_the_pass_reads_the_nchw_input_in_place_of_its_transpose(ci, folded):
    from tvm import relax

    model, x = _stem(ci, 16, 3, 2), torch.randn(1, ci, 12, 12)
    mod = tvm_build.import_relax(model, x)
    mod = relax.transform.ConvertLayout({"relax.nn.conv2d": ["NHWC", "HWIO"]})(mod)
    first = _calls(mod, "relax.nn.conv2d")
    assert first and all(c.attrs.data_layout == "NHWC" for c in first)
    assert len(_calls(mod, "relax.permute_dims")) >= 2                         # in and out
    after = fold_input_transpose_pass(16)(mod)
    layouts = sorted(str(c.attrs.data_layout) for c in _calls(after, "relax.nn.conv2d"))
    assert layouts == (["NCHW", "NHWC"] if folded else ["NHWC", "NHWC"])
    nchw = [c for c in _calls(after, "relax.nn.conv2d") if c.attrs.data_layout == "NCHW"]
    assert all(c.attrs.out_layout == "NHWC" and c.attrs.kernel_layout == "HWIO" for c in nchw)
    # the input's transpose is gone (the output's stays)
    assert len(_calls(after, "relax.permute_dims")) == len(_calls(mod, "relax.permute_dims")) - folded


@pytest.mark.parametrize("ci,co,kernel,stride,hw,batch", [
    (3, 32, 3, 2, 23, 2),   # padding read in place by the conv
    (3, 16, 7, 2, 20, 1),   # padding copied: the view is inlined into the copy
    (1, 8, 3, 1, 9, 3),
    (16, 16, 3, 2, 9, 1),   # a whole vector of channels: the transpose stays
])
def test_built_stem_has_no_input_transpose_and_matches_torch(ci, co, kernel, stride, hw, batch):
    model = _stem(ci, co, kernel, stride)
    x = torch.randn(batch, ci, hw, hw) + 0.5
    tgt = get_target("cpu", threads=1).tvm()
    with tgt:
        mod = tvm_build.cpu_pipeline(tgt, {})(tvm_build.import_relax(model, x))
    kernels = [g.name_hint for g, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    folded = 8 <= vector_lanes(tgt) and ci < vector_lanes(tgt)
    # the output's NHWC -> NCHW transpose is the only one left where the input's was folded
    assert sum("transpose" in k for k in kernels) == (1 if folded else 2), kernels
    if folded:
        conv = next(f for g, f in mod.functions.items()
                    if isinstance(f, tvm.tirx.PrimFunc) and g.name_hint.startswith("fused_conv2d_add"))
        assert "rw_nchw_as_nhwc" not in conv.script()     # the view is inlined, not a stage
    art = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
