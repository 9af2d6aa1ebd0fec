"""Fixed-point weight quantization, quantization-aware retraining with masks, QDQ ONNX export."""
from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from rwdeploy.errors import OptionError, VerificationError
from rwdeploy.quant import convert, dequantize, fake_quantize, model_size, power_of_two_scale, prepare_qat, qrange, quantize
from rwdeploy.quant.onnx_qdq import to_qdq


def test_hand_computed_4bit_example():
    w = torch.tensor([0.3, -1.0, 0.26, 0.0])
    s = power_of_two_scale(w, 4)
    # qmax = 7; 1.0 / 7 = 0.143 -> next power of two 0.25.
    assert s.item() == 0.25
    q = quantize(w, s, 4)
    assert q.tolist() == [1, -4, 1, 0]
    assert dequantize(q, s).tolist() == [0.25, -1.0, 0.25, 0.0]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("axis", [None, 0])
def test_error_bound_range_and_minimal_scale(bits, axis):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 8, 3, 3, generator=g) * torch.logspace(-3, 0, 16).reshape(16, 1, 1, 1)
    w[3] = 0.0  # a pruned filter
    qmin, qmax = qrange(bits)
    s = power_of_two_scale(w, bits, axis)
    sb = s if axis is None else s.reshape(-1, 1, 1, 1)
    # Power-of-two scales, no clipping, and the smallest such scale.
    assert torch.equal(torch.log2(s), torch.round(torch.log2(s)))
    amax = w.abs().amax() if axis is None else w.abs().amax(dim=(1, 2, 3))
    assert bool((amax <= qmax * s).all())
    nonzero = amax > 0
    assert bool((amax[nonzero] > qmax * s[nonzero] / 2).all()) if axis == 0 else amax > qmax * s / 2
    q = quantize(w, s, bits, axis)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (w - dequantize(q, s, axis)).abs()
    assert bool((err <= sb / 2 + 1e-12).all())
    # Idempotent: the scale of the dequantized weights is the same scale, the integers the same.
    deq = dequantize(q, s, axis)
    assert torch.equal(power_of_two_scale(deq, bits, axis), s)
    assert torch.equal(quantize(deq, s, bits, axis), q)
    assert torch.equal(fake_quantize(w, bits, axis), deq)


def test_straight_through_gradient_is_identity():
    w = torch.randn(5, 4, requires_grad=True)
    upstream = torch.randn(5, 4)
    (fake_quantize(w, 4, 0) * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_bad_bit_width_is_an_option_error():
    with pytest.raises(OptionError, match="--quantize 3"):
        power_of_two_scale(torch.ones(3), 3)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3)
        self.fc = nn.Linear(6 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def _masks(model: nn.Module, keep: float, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < keep for n, p in model.named_parameters() if n.endswith("weight")}


def test_masks_survive_quantization_aware_retraining():
    torch.manual_seed(0)
    model = _Net()
    masks = _masks(model, 0.3)
    x = torch.rand(64, 1, 8, 8)
    y = (x.flatten(1)[:, :10] > 0.5).sum(1)  # a learnable target: a count of bright pixels
    names = prepare_qat(model, 4, per_channel=True, masks=masks)
    assert names == ["conv", "fc"]
    # Momentum and weight decay move masked float weights; the mask must still hold in every forward.
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        for layer in (model.conv, model.fc):
            eff = layer.qat_weight().detach()
            assert bool((eff[~layer.qat_mask.bool()] == 0).all())
    assert losses[-1] < 0.8 * losses[0]
    with torch.no_grad():
        before = model(x)
    spec = convert(model)
    assert type(model.conv) is nn.Conv2d and type(model.fc) is nn.Linear
    for name in ("conv.weight", "fc.weight"):
        w = dict(model.named_parameters())[name].detach()
        assert bool((w[~masks[name]] == 0).all())
        s = torch.tensor(spec.layers[name]).reshape(-1, *([1] * (w.dim() - 1)))
        assert torch.equal(torch.round(w / s) * s, w)  # exactly on the grid
    torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    size = model_size(model, spec)
    nnz = sum(int(masks[n].sum()) for n in masks)
    n_all = sum(m.numel() for m in masks.values())
    assert size["quantized_weights"] == n_all and size["quantized_weights_nonzero"] <= nnz
    assert size["sparse_quantized_bytes"] < size["dense_quantized_bytes"] < size["float32_bytes"]


def _export(model: nn.Module, x: torch.Tensor) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, opset_version=17, dynamo=False, input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("bits,per_channel", [(8, False), (8, True), (4, False), (4, True)])
def test_qdq_onnx_matches_fake_quantized_torch_model(bits, per_channel):
    torch.manual_seed(1)
    model = _Net().eval()
    masks = _masks(model, 0.5, seed=1)
    x = torch.rand(4, 1, 8, 8)
    prepare_qat(model, bits, per_channel=per_channel, masks=masks)
    with torch.no_grad():
        expected = model(x).numpy()  # the fake-quantized model, before baking
    convert(model)
    qdq, record = to_qdq(_export(model, x), bits, per_channel=per_channel)
    assert [r["weight"] for r in record.layers] == ["conv.weight", "fc.weight"]
    ops = [n.op_type for n in qdq.graph.node]
    assert ops.count("DequantizeLinear") == 2
    elem = {t.name: t.data_type for t in qdq.graph.initializer}
    want = onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8
    assert record.storage == ("int4" if bits == 4 else "int8")
    assert elem["conv.weight_quantized"] == want and elem["fc.weight_quantized"] == want
    assert "conv.weight" not in elem  # no float copy of the weight left in the file
    stored = {t.name: len(t.raw_data) for t in qdq.graph.initializer}
    for name, numel in (("conv.weight", 6 * 9), ("fc.weight", 10 * 216)):  # b bits per weight, packed
        assert stored[f"{name}_quantized"] == -(-numel * bits // 8)
    sess = ort.InferenceSession(qdq.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_qdq_refuses_float_weights_off_the_grid():
    torch.manual_seed(2)
    model = _Net().eval()
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(VerificationError, match="conv.weight .* not on the 8-bit"):
        to_qdq(_export(model, x), 8)


def test_qdq_file_keeps_batchnorm_separate_and_matches_torch(tmp_path):
    from rwdeploy.quant.export import export_qdq_onnx

    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    with torch.no_grad():  # non-trivial BN statistics: folding them would move weights off the grid
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.uniform_(0.5, 1.5)
    model.eval()
    x = torch.rand(2, 3, 8, 8)
    prepare_qat(model, 8, per_channel=True)
    with torch.no_grad():
        expected = model(x).numpy()
    convert(model)
    info = export_qdq_onnx(model, x[:1], tmp_path / "m.qdq.onnx", bits=8, per_channel=True)
    loaded = onnx.load(str(tmp_path / "m.qdq.onnx"))
    assert "BatchNormalization" in [n.op_type for n in loaded.graph.node]
    assert info.size_bytes == (tmp_path / "m.qdq.onnx").stat().st_size and len(info.record.layers) == 2
    sess = ort.InferenceSession(str(tmp_path / "m.qdq.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]  # dynamic batch: 2 works
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_tvm_build_keeps_int8_weights_and_matches_torch():
    from rwdeploy.models import create
    from rwdeploy.quant import quantize_model
    from rwdeploy.quant.tvm_qdq import build_onnx

    torch.manual_seed(5)
    model = create("lenet5")
    x = torch.rand(2, 1, 28, 28)
    quantize_model(model, 4, per_channel=True)
    float_onnx = _export(model, x)
    qdq, record = to_qdq(float_onnx, 4, per_channel=True, int4_storage=False)
    assert record.storage == "int8"  # TVM 0.27 cannot import INT4 initializers
    qbuild, qrun = build_onnx(qdq)
    fbuild, _ = build_onnx(float_onnx)
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(qrun(x.numpy()), expected, rtol=1e-4, atol=1e-5)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    # 3 bytes saved per weight (int8 instead of float32), less a little code for the dequantize kernels.
    assert fbuild.library_bytes - qbuild.library_bytes > 0.9 * 3 * weights
