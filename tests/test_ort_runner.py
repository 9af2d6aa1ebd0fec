"""The ORT call that latency tables time computes the model: inputs and outputs bound once,
each call writes the model's output (for another input too) into the bound buffer."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from rwdeploy.runtime.onnx_export import export_onnx
from rwdeploy.runtime.ort_runner import OrtRunner, bound_call


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc(y.mean((2, 3)))


def test_bound_call_writes_the_model_output_each_call(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    x = torch.randn(2, 3, 8, 8)
    path = tmp_path / "m.onnx"
    export_onnx(model, x, path)
    runner = OrtRunner(path)
    feed = {runner.input_name: x.numpy().copy()}
    bound = bound_call(runner.session, feed)
    assert bound is not None
    call, outs = bound
    # the bound input shares the feed's memory: a new image written there is what the next
    # call computes (the first result was checked against session.run by bound_call)
    x2 = torch.randn(2, 3, 8, 8)
    feed[runner.input_name][...] = x2.numpy()
    call()
    with torch.no_grad():
        want = model(x2).numpy()
    np.testing.assert_allclose(outs[0].numpy(), want, rtol=1e-5, atol=1e-6)
    timed = runner.bind(x.numpy())
    assert timed() is None  # the bound call, not session.run (which returns the outputs)
