"""Disabled autocast regions of torch.export graphs are inlined, so the channel analysis sees
into them (EfficientViT turns autocast off around its linear attention)."""
from __future__ import annotations

import io

import pytest
import torch
from torch import fx, nn

from rwdeploy.passes.channel_groups import analyze_channel_groups
from rwdeploy.passes.inline_autocast import inline_inactive_autocast
from rwdeploy.passes.remove_zero_channels import remove_zero_channels
from rwdeploy.passes.trace import trace_model
from rwdeploy.passes.verify import compare


class AutocastOff(nn.Module):
    """Shape-dependent Python control flow (symbolic tracing fails, torch.export works) around an
    autocast region: off, or for a device type the model does not run on."""

    def __init__(self, device_type: str, enabled: bool) -> None:
        super().__init__()
        self.device_type, self.enabled = device_type, enabled
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        if x.shape[-1] > 2:
            y = y + 1
        with torch.autocast(device_type=self.device_type, enabled=self.enabled):
            y = torch.relu(y.float()) * 2
        return self.b(y)


def _zeroed(net: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        net.a.weight[::2] = 0
        net.a.bias[::2] = 0.5  # removed channels carry a constant through relu * 2 into b
    return net.eval()


def _from_pt2(net: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    buf = io.BytesIO()
    torch.export.save(torch.export.export(net, (x,)), buf)
    buf.seek(0)
    program = torch.export.load(buf).module()
    return fx.GraphModule(program, program.graph)


@pytest.mark.parametrize("form", ["fallback", "pt2"])
@pytest.mark.parametrize("device_type,enabled", [("cpu", False), ("cuda", True)])
def test_inactive_autocast_is_inlined_and_its_channels_removed(form, device_type, enabled):
    net, x = _zeroed(AutocastOff(device_type, enabled)), torch.randn(2, 3, 6, 6)
    source = net if form == "fallback" else _from_pt2(net, x)
    traced = trace_model(source, x)
    assert traced.method == ("torch.export" if form == "fallback" else "symbolic_trace")
    assert not [n for n in traced.gm.graph.nodes if "wrap_with_autocast" in str(n.target)]
    analysis = analyze_channel_groups(traced.gm, x)
    assert {r for g in analysis.groups for r in g.pinned} <= {"model input x", "model output"}
    res = remove_zero_channels(traced.gm, x)
    assert res.record.params_after < res.record.params_before
    with torch.no_grad():
        assert compare(net(x), res.gm(x), tolerance=1e-5).passed


def test_active_autocast_stays():
    net, x = _zeroed(AutocastOff("cpu", True)), torch.randn(2, 3, 6, 6)
    gm = torch.export.export(net, (x,)).module()
    gm = fx.GraphModule(gm, gm.graph)
    assert inline_inactive_autocast(gm, "cpu") == 0
    assert [n for n in gm.graph.nodes if "wrap_with_autocast" in str(n.target)]
