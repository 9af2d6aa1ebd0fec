"""Property: random architectures built from the supported ops, with random zeroed filters
(and sometimes zeroed input columns), stay exact after remove_zero_channels."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from channel_helpers import randomize_norms, zero_filters
from nets import channel_shuffle
from rwdeploy.passes.channel_groups import analyze_channel_groups
from rwdeploy.passes.remove_zero_channels import remove_zero_channels
from rwdeploy.passes.trace import trace_model
from rwdeploy.passes.verify import first_diverging_node, verify_equivalence

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ACTS = [nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
        nn.LeakyReLU, nn.ELU, nn.Identity]
KINDS = ["conv", "depthwise", "grouped", "residual", "concat", "split", "se", "pool", "shuffle",
         "groupnorm", "prelu", "scale", "mlp_last", "upsample"]


class Block(nn.Module):
    """One randomly configured op on a [N, C, H, W] value; `cout` is its output width."""

    def __init__(self, kind: str, cin: int, width: int, act: int, k: int, bias: bool) -> None:
        super().__init__()
        self.kind, self.cin = kind, cin
        a = ACTS[act]
        if kind in ("grouped", "split", "shuffle") and cin % 2:
            kind = self.kind = "conv"
        if kind not in ("conv", "grouped", "concat"):
            width = cin
        self.cout = width
        if kind == "conv":
            self.f = nn.Sequential(nn.Conv2d(cin, width, k, padding=k // 2, bias=bias), nn.BatchNorm2d(width), a())
        elif kind == "depthwise":
            self.f = nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=bias), nn.BatchNorm2d(cin), a())
        elif kind == "grouped":
            self.cout = width = width + width % 2
            self.f = nn.Sequential(nn.Conv2d(cin, width, k, padding=k // 2, groups=2, bias=bias),
                                   nn.BatchNorm2d(width), a())
        elif kind == "residual":
            self.f = nn.Sequential(nn.Conv2d(cin, cin, 1, bias=bias), nn.BatchNorm2d(cin), a(),
                                   nn.Conv2d(cin, cin, 3, padding=1, bias=bias), nn.BatchNorm2d(cin))
        elif kind == "concat":
            self.f = nn.Conv2d(cin, width, 1, bias=bias)
            self.g = nn.Sequential(nn.Conv2d(cin, 2, 3, padding=1, bias=bias), nn.BatchNorm2d(2), a())
            self.cout = width + 2
        elif kind == "split":
            self.f = nn.Sequential(nn.Conv2d(cin // 2, cin // 2, 3, padding=1, bias=bias), nn.BatchNorm2d(cin // 2), a())
        elif kind == "se":
            self.f = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, 2, 1), nn.ReLU(), nn.Conv2d(2, cin, 1),
                                   nn.Hardsigmoid())
        elif kind == "pool":
            self.f = [nn.MaxPool2d(3, 1, 1), nn.AvgPool2d(3, 1, 1), nn.AvgPool2d(3, 1, 1, count_include_pad=False)][k % 3]
        elif kind == "groupnorm":
            self.f = nn.GroupNorm(1 if cin % 2 else 2, cin)
        elif kind == "prelu":
            self.f = nn.PReLU(cin)
        elif kind == "scale":
            self.gamma = nn.Parameter(torch.rand(cin, 1, 1) + 0.5)
        elif kind == "mlp_last":  # channels-last MLP with layer scale and a residual (ConvNeXt-like)
            self.f = nn.Sequential(nn.Linear(cin, width + 2, bias=bias), a(), nn.Linear(width + 2, cin))
            self.gamma = nn.Parameter(torch.rand(cin) + 0.5)
        elif kind == "upsample":
            self.f = nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(cin, cin, 3, 2, 1, bias=bias))

    def forward(self, x):
        kind = self.kind
        if kind == "residual":
            return F.relu(x + self.f(x))
        if kind == "concat":
            return torch.cat([self.f(x), self.g(x)], 1)
        if kind == "split":
            a, b = x.chunk(2, dim=1)
            return torch.cat([a, self.f(b)], 1)
        if kind == "se":
            return x * self.f(x)
        if kind == "shuffle":
            return channel_shuffle(x, 2)
        if kind == "scale":
            return x * self.gamma
        if kind == "mlp_last":
            return x + (self.gamma * self.f(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.f(x)


class RandomNet(nn.Module):
    def __init__(self, spec: list[tuple], head: int) -> None:
        super().__init__()
        blocks, c = [], 3
        blocks.append(Block("conv", 3, 4 + spec[0][1] % 5, 0, 3, True))  # stem
        c = blocks[0].cout
        for kind, width, act, k, bias in spec:
            blocks.append(Block(kind, c, width, act, k, bias))
            c = blocks[-1].cout
        self.blocks = nn.Sequential(*blocks)
        self.tail = nn.Conv2d(c, 4, 3, padding=1)  # a padded 3x3 conv after the pruned layers
        self.head = head
        self.fc = nn.Linear(4 * (36 if head else 1), 3)

    def forward(self, x):
        x = F.relu(self.tail(self.blocks(x)))
        x = torch.flatten(x, 1) if self.head else x.mean((2, 3))
        return self.fc(x)


block_spec = st.tuples(st.sampled_from(KINDS), st.integers(2, 7), st.integers(0, len(ACTS) - 1),
                       st.sampled_from([1, 3]), st.booleans())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.lists(block_spec, min_size=1, max_size=5), head=st.integers(0, 1),
       fraction=st.sampled_from([0.3, 0.5, 0.7]), seed=st.integers(0, 2**16), columns=st.booleans())
def test_random_architectures_stay_exact(spec, head, fraction, seed, columns):
    torch.manual_seed(seed)
    model = RandomNet(spec, head).eval()
    randomize_norms(model, seed)
    x = torch.randn(1, 3, 6, 6)
    gm = trace_model(model, x).gm
    analysis = analyze_channel_groups(gm, x)
    zero_filters(gm, analysis, fraction, seed)
    if columns:  # also zero some input columns of consumers ("channel" pruning)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for group in analysis.groups:
                for s in group.slices_with("consumer"):
                    if not group.pinned and torch.rand(1, generator=g) < 0.3:
                        c = int(torch.randint(group.size, (1,), generator=g))
                        gm.get_parameter(s.tensor).index_fill_(s.dim, torch.tensor(s.indices[c]), 0.0)
    res = remove_zero_channels(gm, x, analysis=analysis)
    v = verify_equivalence(gm, res.gm, [x, torch.randn(2, 3, 6, 6)], rtol=1e-4, record=res.record)
    assert v.passed, f"max_rel={v.max_rel} at {v.first_diverging_node}; spec={spec}"
    # node by node, on the kept channels, the slim graph agrees too (no false alarms)
    assert first_diverging_node(gm, res.gm, (x,), record=res.record) is None
    assert res.record.params_after <= res.record.params_before
