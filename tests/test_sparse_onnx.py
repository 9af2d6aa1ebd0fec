"""Compact ONNX: CSR initializers densified by stock ops; stock ONNX Runtime, default options."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from rwdeploy.runtime.onnx_export import export_onnx
from rwdeploy.runtime.onnx_sparse import compact_onnx
from rwdeploy.sparse import CsrConv2d, CsrLinear


def _sparsify(layer, frac, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.weight[torch.rand(layer.weight.shape, generator=g) < frac] = 0
    return layer.eval()


class ConvNet(nn.Module):
    def __init__(self, frac):
        super().__init__()
        self.conv = _sparsify(nn.Conv2d(16, 32, 3, padding=1, groups=2), frac, 1)
        self.fc1 = _sparsify(nn.Linear(32 * 8 * 8, 256), frac, 2)
        self.fc2 = _sparsify(nn.Linear(256, 10), frac, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # default options
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_packed_model_exports_compact_and_matches(tmp_path):
    net = ConvNet(0.9).eval()
    x = torch.randn(2, 16, 8, 8)
    ref = net(x).detach().numpy()
    dense_path = tmp_path / "dense.onnx"
    torch.onnx.export(net, (x,), str(dense_path), opset_version=17, dynamo=False)
    packed = ConvNet(0.9).eval()
    packed.load_state_dict(net.state_dict())
    packed.conv = CsrConv2d.from_dense(net.conv, (4, 1))
    packed.fc1 = CsrLinear.from_dense(net.fc1)
    path = tmp_path / "packed.onnx"
    info = export_onnx(packed, x, path)              # the pipeline's exporter
    assert info.size_bytes == path.stat().st_size
    model = onnx.load(str(path))
    assert {i.name for i in model.graph.initializer} >= {"fc1.weight__csr_values", "fc1.weight__csr_indices"}
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)          # stock ops only
    assert all(i.data_type != TensorProto.FLOAT or numpy_helper.to_array(i).size < 4096
               or i.name.endswith("__csr_values") for i in model.graph.initializer)
    ratio = path.stat().st_size / dense_path.stat().st_size
    assert ratio <= 1 / 5, ratio
    np.testing.assert_allclose(_run(path, x), ref, rtol=1e-5, atol=1e-5)


def _single_weight_model(w: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[1]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[0]])
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)], "g", [x], [y],
                          [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("case", ["all_zero", "one_row", "single_nonzero", "empty_rows", "wide"])
def test_compact_edge_cases_match(case):
    rng = np.random.default_rng(0)
    w = {"all_zero": np.zeros((32, 40)), "one_row": np.zeros((1, 600)),
         "single_nonzero": np.zeros((30, 30)), "empty_rows": rng.standard_normal((64, 20)),
         "wide": rng.standard_normal((20, 40000))}[case].astype(np.float32)
    if case == "one_row":
        w[0, [3, 500]] = [1.5, -2.0]
    if case == "single_nonzero":
        w[29, 0] = 3.0
    if case == "empty_rows":
        w[1:40] = 0
    if case == "wide":
        w[rng.random(w.shape) < 0.95] = 0                  # int32 indices (40000 columns)
    compact, done = compact_onnx(_single_weight_model(w), min_sparsity=0.5, min_elements=1)
    assert [d.name for d in done] == ["W"]
    x = rng.standard_normal((1, w.shape[1])).astype(np.float32)
    sess = ort.InferenceSession(compact.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"x": x})[0], x @ w.T, rtol=1e-5, atol=1e-5)


def test_dense_weights_are_left_alone():
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    compact, done = compact_onnx(_single_weight_model(w))
    assert done == [] and compact.graph.initializer[0].name == "W"
