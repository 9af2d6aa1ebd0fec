"""Position-dependent constants of removed channels are stored as border kernels, not maps.

The slim model must stay exactly the original function AND be physically as small as its
parameters say: a dense C_out x H x W map per padded conv used to make ResNet-20's slim file
more than half the original's with a quarter of the parameters.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nets
from channel_helpers import randomize_norms, zero_filters
from rwdeploy import models
from rwdeploy.passes.channel_constants import ConvGeometry, border_kernel
from rwdeploy.passes.channel_groups import analyze_channel_groups
from rwdeploy.passes.remove_zero_channels import remove_zero_channels
from rwdeploy.passes.trace import trace_model
from rwdeploy.passes.verify import verify_equivalence
from rwdeploy.runtime.onnx_export import export_onnx
from rwdeploy.runtime.ort_runner import OrtRunner

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RTOL = 1e-4


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _dense_reference(w, groups, stride, padding, dilation, x_gone, keep_out):
    """The removed channels' contribution computed the plain way: the conv on their values."""
    full = F.conv2d(x_gone, w, None, stride, padding, dilation, groups)
    return full[:, keep_out.nonzero().flatten()]


@pytest.mark.parametrize("groups,stride,padding,dilation", [(1, 1, 1, 1), (2, 2, 1, 1), (4, 1, 2, 2)])
def test_border_kernel_reproduces_the_dense_map(groups, stride, padding, dilation):
    g = torch.Generator().manual_seed(groups)
    w = torch.randn(8, 8 // groups, 3, 3, generator=g, dtype=torch.float64)
    values = torch.randn(8, generator=g, dtype=torch.float64)
    values[[0, 3, 5]] = 0.0  # kept channels read nothing here
    x_gone = values.view(1, 8, 1, 1).expand(1, 8, 9, 10).contiguous()
    keep_out = torch.tensor([True, False, True, True, True, False, True, True])
    dense = _dense_reference(w, groups, stride, padding, dilation, x_gone, keep_out)
    bk = border_kernel(ConvGeometry(w, groups, stride, padding, dilation), x_gone, keep_out, dense)
    assert bk is not None and bk.patterns is None  # constant channels: only the ones image
    assert bk.kernel.shape == (6, 1, 3, 3)
    torch.testing.assert_close(bk.evaluate(), dense, rtol=0, atol=1e-12)


def test_pooled_channels_use_a_stored_pattern_and_too_many_patterns_fall_back():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, 3, 3, generator=g, dtype=torch.float64)
    keep_out = torch.ones(4, dtype=torch.bool)
    values = torch.randn(1, 6, 1, 1, generator=g, dtype=torch.float64)
    # an average pool counting zero padding shapes every constant channel the same way
    pooled = F.avg_pool2d(values.expand(1, 6, 8, 8), 3, 1, 1, count_include_pad=True)
    dense = _dense_reference(w, 1, 1, 1, 1, pooled, keep_out)
    bk = border_kernel(ConvGeometry(w, 1, 1, 1, 1), pooled, keep_out, dense)
    assert bk is not None and bk.patterns is not None and bk.patterns.shape == (1, 1, 8, 8)
    torch.testing.assert_close(bk.evaluate(), dense, rtol=0, atol=1e-12)
    # six channels, each shaped by its own depthwise kernel: six patterns, more than allowed
    shaped = F.conv2d(values.expand(1, 6, 8, 8), torch.randn(6, 1, 3, 3, generator=g, dtype=torch.float64),
                      padding=1, groups=6)
    dense = _dense_reference(w, 1, 1, 1, 1, shaped, keep_out)
    assert border_kernel(ConvGeometry(w, 1, 1, 1, 1), shaped, keep_out, dense) is None


class PooledThenConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nets.cbr(3, 8)
        self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=True)
        self.b = nets.cbr(8, 6)

    def forward(self, x):
        return self.b(self.pool(self.a(x)))


@pytest.mark.parametrize("net,expected", [(PooledThenConv, {"b.0": "border kernel"}),
                                          # depthwise filters are zeroed with the channel they read
                                          # (one segment), so the removed outputs are constant
                                          (nets.GroupedDepthwise, {"pw.0": "bias"})])
def test_record_says_how_each_constant_was_folded(net, expected):
    torch.manual_seed(0)
    model = net().eval()
    randomize_norms(model)
    x = torch.randn(1, 3, 12, 12)
    gm = trace_model(model, x).gm
    assert zero_filters(gm, analyze_channel_groups(gm, x), 0.5) > 0
    res = remove_zero_channels(gm, x)
    folded = {layer.name: layer.folded for layer in res.record.layers}
    assert {k: folded[k] for k in expected} == expected
    buffers = dict(res.gm.named_buffers())
    for layer, how in expected.items():
        node = layer.replace(".", "_")
        if how == "border kernel":
            assert f"_rw_const_kernel_{node}" in buffers and f"_rw_const_pattern_{node}" in buffers
        elif how == "constant map":
            assert f"_rw_const_{node}" in buffers
    assert verify_equivalence(gm, res.gm, [x, torch.randn(3, 3, 12, 12)], rtol=RTOL, record=res.record).passed


def test_resnet20_half_pruned_is_physically_small(tmp_path):
    torch.manual_seed(0)
    model = models.create("resnet20").eval()
    randomize_norms(model)
    x = torch.randn(models.input_shape("resnet20"))
    gm = trace_model(model, x).gm
    assert zero_filters(gm, analyze_channel_groups(gm, x), 0.5) > 0
    res = remove_zero_channels(gm, x)
    slim = res.gm
    probes = [x, torch.randn(4, *x.shape[1:])]
    assert verify_equivalence(gm, slim, probes, rtol=RTOL, record=res.record).passed
    folds = [layer.folded for layer in res.record.layers if layer.folded]
    assert "border kernel" in folds and "constant map" not in folds

    param_bytes = _bytes(slim.parameters())
    assert param_bytes <= 0.3 * _bytes(gm.parameters())  # about half the filters of each group
    # everything stored (buffers: BN statistics, border kernels) stays close to the parameters
    assert _bytes(slim.state_dict().values()) <= 1.15 * param_bytes

    original = export_onnx(gm, x, tmp_path / "original.onnx")
    small = export_onnx(slim, x, tmp_path / "slim.onnx")
    assert small.size_bytes <= 1.25 * param_bytes  # weights + graph, no dense maps or images
    assert small.size_bytes <= 0.35 * original.size_bytes
    big_constants = [n for n in onnx.load(small.path).graph.node if n.op_type == "Constant"
                     and n.attribute[0].t.ByteSize() > 4096]
    assert not big_constants
    # ONNX Runtime folds the border convs at session creation: the running graph has only the
    # model's own convs, as it had with dense maps
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(small.path, options, providers=["CPUExecutionProvider"])
    running = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert running.count("Conv") == sum(isinstance(m, nn.Conv2d) for m in slim.modules())
    assert "ConstantOfShape" not in running
    xb = probes[1].numpy()
    with torch.no_grad():
        ref = gm(probes[1]).numpy()
    got = OrtRunner(small.path).run(xb)
    assert float(np.abs(got - ref).max()) <= RTOL * float(np.abs(ref).max())
