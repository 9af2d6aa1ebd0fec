"""A slim model's ONNX file has no BatchNormalization left behind the constant that removed
channels add after a convolution: folded into the convolution (and the constant), the file
computes the original function on ONNX Runtime at every batch size."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from channel_helpers import randomize_norms, zero_filters
from rwdeploy import models
from rwdeploy.passes.channel_groups import analyze_channel_groups
from rwdeploy.passes.remove_zero_channels import remove_zero_channels
from rwdeploy.passes.trace import trace_model
from rwdeploy.runtime.onnx_bn_fold import fold_batchnorm_through_constant_adds
from rwdeploy.runtime.onnx_export import export_onnx
from rwdeploy.runtime.ort_runner import OrtRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL = 1e-5


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.fixture(scope="module")
def slim_resnet20():
    torch.manual_seed(0)
    model = models.create("resnet20").eval()
    randomize_norms(model)
    x = torch.randn(models.input_shape("resnet20"))
    gm = trace_model(model, x).gm
    assert zero_filters(gm, analyze_channel_groups(gm, x), 0.7) > 0
    res = remove_zero_channels(gm, x)
    assert "border kernel" in [layer.folded for layer in res.record.layers]
    return gm, res.gm, x


def test_slim_file_has_no_batchnorm_and_matches_the_original(slim_resnet20, tmp_path):
    original, slim, x = slim_resnet20
    path = tmp_path / "slim.onnx"
    export_onnx(slim, x, path)
    assert "BatchNormalization" not in _ops(path)
    runner = OrtRunner(path)
    for batch in (1, 4):
        xb = torch.randn(batch, *x.shape[1:], generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = original(xb).numpy()
        got = runner.run(xb.numpy())
        assert float(np.abs(got - want).max()) <= RTOL * float(np.abs(want).max())


def test_onnx_runtime_runs_no_batchnorm_and_the_file_stays_small(slim_resnet20, tmp_path):
    _, slim, x = slim_resnet20
    path = tmp_path / "slim.onnx"
    info = export_onnx(slim, x, path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "running.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert "BatchNormalization" not in _ops(tmp_path / "running.onnx")
    kept = export_onnx(slim, x, tmp_path / "kept.onnx", fold_batchnorm=False)
    assert "BatchNormalization" in _ops(tmp_path / "kept.onnx")
    # the constants stay kernels convolved with a fill, scaled by a vector: no dense maps
    assert info.size_bytes <= 1.05 * kept.size_bytes


def _conv_add_bn(other_is_input: bool, conv_read_twice: bool = False) -> onnx.ModelProto:
    g = np.random.default_rng(0)
    c = 4
    inits = [numpy_helper.from_array(g.standard_normal((c, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(g.standard_normal((1, c, 6, 6)).astype(np.float32), "m"),
             numpy_helper.from_array((g.random(c) + 0.5).astype(np.float32), "scale"),
             numpy_helper.from_array(g.standard_normal(c).astype(np.float32), "shift"),
             numpy_helper.from_array(g.standard_normal(c).astype(np.float32), "mean"),
             numpy_helper.from_array((g.random(c) + 0.5).astype(np.float32), "var")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["y", "r" if other_is_input else "m"], ["z"]),
             helper.make_node("BatchNormalization", ["z", "scale", "shift", "mean", "var"], ["out"], epsilon=1e-3)]
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, c, 6, 6])]
    if conv_read_twice:
        outputs.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 6, 6]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 6, 6])]
    if other_is_input:
        inputs.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, c, 6, 6]))
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_hand_made_fold_matches_the_batchnorm_it_replaces():
    model = _conv_add_bn(other_is_input=False)
    x = np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)
    (want,) = _run(model, {"x": x})
    assert fold_batchnorm_through_constant_adds(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Conv", "Mul", "Add"]
    assert {t.name for t in model.graph.initializer}.isdisjoint({"w", "mean", "var"})
    (got,) = _run(model, {"x": x})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


@pytest.mark.parametrize("other_is_input,conv_read_twice", [(True, False), (False, True)])
def test_a_computed_addend_or_a_shared_conv_output_is_left_alone(other_is_input, conv_read_twice):
    model = _conv_add_bn(other_is_input, conv_read_twice)
    before = model.SerializeToString()
    assert fold_batchnorm_through_constant_adds(model) == 0
    assert model.SerializeToString() == before
