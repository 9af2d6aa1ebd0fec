"""Property: random architectures built from the supported ops, with random zeroed filters
(sometimes zeroed input columns, sometimes single producers of a channel only: a depthwise
filter without its input), stay exact after remove_zero_channels.

Besides the CNN blocks, the generator draws the patterns the timm conformance suite exposed:
GhostNet's depthwise features concatenated to their input, fused attention over the positions (SDPA), global response norm (norm, mean over channels,
addcmul), an affine by addcmul, normalize, an expand_as gate, BatchNorm over flattened values
back by reshape_as, a weight-standardised conv, one conv called twice, a class token
concatenated to the positions, a Linear mixing positions, a channels-last pad; and attention
spelled with einsum, im2col windows folded back (VOLO), a variance over positions (EvoNorm),
rows gathered by an index tensor (relative positions), a maximum over positions, and an LSTM
along each row of the map (Sequencer; both directions when the width is even).
CI runs 200 examples; `RWDEPLOY_PROPERTY_EXAMPLES=1000` runs more.
"""
from __future__ import annotations

import os

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
         "groupnorm", "prelu", "scale", "mlp_last", "upsample",
         # patterns of the conformance suite
         "ghost", "sdpa", "grn", "affine", "normalize", "gate_expand_as", "bn_reshape_as", "std_conv", "shared", "cls_token",
         "token_linear", "pad_last", "einsum_heads", "fold_windows", "var_norm", "gather_rows", "max_positions",
         "lstm_rows"]


class Block(nn.Module):
    """One randomly configured op on a [N, C, H, W] value; `cout` is its output width."""

    def __init__(self, kind: str, cin: int, width: int, act: int, k: int, bias: bool) -> None:
        super().__init__()
        self.kind, self.cin = kind, cin
        a = ACTS[act]
        if kind in ("grouped", "split", "shuffle") and cin % 2:
            kind = self.kind = "conv"
        if kind in ("sdpa", "einsum_heads") and cin % 2:
            kind = self.kind = "depthwise"
        if kind not in ("conv", "grouped", "concat", "std_conv"):
            width = cin
        self.cout = 2 * cin if kind == "ghost" else width
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
        elif kind == "ghost":  # depthwise features of x, concatenated to x itself
            self.f = nn.Sequential(nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=bias), nn.BatchNorm2d(cin), a())
        elif kind in ("sdpa", "einsum_heads"):  # heads of width 2 over the positions, residual
            self.qkv, self.proj = nn.Linear(cin, 3 * cin, bias=bias), nn.Linear(cin, cin)
        elif kind == "fold_windows":
            self.f = nn.Sequential(nn.Conv2d(cin, cin, 1, bias=bias), a())
        elif kind == "gather_rows":
            self.register_buffer("rows", torch.randperm(6))
        elif kind == "grn":
            self.gamma, self.beta = nn.Parameter(torch.rand(cin) + 0.2), nn.Parameter(torch.randn(cin) * 0.5)
        elif kind == "affine":
            self.alpha, self.beta = nn.Parameter(torch.rand(cin) + 0.5), nn.Parameter(torch.randn(cin) * 0.5)
        elif kind == "normalize":
            self.f = nn.Sequential(nn.Conv2d(cin, cin, 1, bias=bias), a())
            self.dim = (1, 2, 3)[k % 3]  # over channels (couples them) or over a spatial dim
        elif kind == "gate_expand_as":
            self.f = nn.Conv2d(cin, cin, 1)
        elif kind == "bn_reshape_as":
            self.f, self.bn = nn.Linear(cin, cin, bias=bias), nn.BatchNorm1d(cin)
        elif kind == "std_conv":
            self.f = nn.Conv2d(cin, width, k, padding=k // 2, bias=bias)
            self.gain = nn.Parameter(torch.rand(width, 1, 1, 1) + 0.5)
        elif kind == "shared":
            self.f = nn.Conv2d(cin, cin, k, padding=k // 2, bias=bias)
        elif kind == "cls_token":
            self.cls = nn.Parameter(torch.randn(1, 1, cin))
            self.f = nn.Linear(cin, cin, bias=bias)
        elif kind == "token_linear":
            self.f = nn.Linear(6, 6, bias=bias)
        elif kind == "pad_last":
            self.f = nn.Sequential(nn.Linear(cin, cin, bias=bias), a())
        elif kind == "lstm_rows":  # units of both directions side by side make the cin outputs
            two = cin % 2 == 0
            self.f = nn.LSTM(cin, cin // 2 if two else cin, batch_first=True, bidirectional=two, bias=bias)

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
        if kind in SUITE_FORWARD:
            return SUITE_FORWARD[kind](self, x)
        return self.f(x)


def _sdpa(blk: Block, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    t = x.flatten(2).transpose(1, 2)
    q, k, v = blk.qkv(t).reshape(b, h * w, 3, c // 2, 2).permute(2, 0, 3, 1, 4).unbind(0)
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
    return x + blk.proj(y).transpose(1, 2).reshape(b, c, h, w)


def _grn(blk: Block, x: torch.Tensor) -> torch.Tensor:
    g = x.norm(p=2, dim=(2, 3), keepdim=True)
    n = g / (g.mean(dim=1, keepdim=True) + 1e-6)
    return x + torch.addcmul(blk.beta.view(1, -1, 1, 1), blk.gamma.view(1, -1, 1, 1), x * n)


def _std_conv(blk: Block, x: torch.Tensor) -> torch.Tensor:
    w = F.batch_norm(blk.f.weight.reshape(1, blk.f.out_channels, -1), None, None,
                     weight=(blk.gain * blk.f.weight[0].numel() ** -0.5).view(-1), training=True, eps=1e-6)
    return F.conv2d(x, w.reshape_as(blk.f.weight), blk.f.bias, 1, blk.f.padding)


def _bn_reshape_as(blk: Block, x: torch.Tensor) -> torch.Tensor:
    y = blk.f(x.permute(0, 2, 3, 1))
    return blk.bn(y.flatten(0, 2)).reshape_as(y).permute(0, 3, 1, 2)


def _cls_token(blk: Block, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    t = torch.cat([blk.cls.expand(b, -1, -1), x.flatten(2).transpose(1, 2)], 1)
    return F.gelu(blk.f(t))[:, 1:].transpose(1, 2).reshape(b, c, h, w)


def _einsum_heads(blk: Block, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    q, k, v = blk.qkv(x.flatten(2).transpose(1, 2)).reshape(b, h * w, 3, c // 2, 2).unbind(2)
    a = torch.einsum("bqhd,bkhd->bhqk", q, k).softmax(dim=-1)
    y = torch.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, h * w, c)
    return x + blk.proj(y).transpose(1, 2).reshape(b, c, h, w)


def _fold_windows(blk: Block, x: torch.Tensor) -> torch.Tensor:
    cols = torch.relu(F.unfold(blk.f(x), 3, padding=1) - 0.1)
    return F.fold(cols, x.shape[-2:], 3, padding=1) / 9


def _lstm_rows(blk: Block, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    y, _ = blk.f(x.permute(0, 2, 3, 1).reshape(b * h, w, c))
    return y.reshape(b, h, w, c).permute(0, 3, 1, 2)


SUITE_FORWARD = {
    "ghost": lambda blk, x: torch.cat([x, blk.f(x)], 1),
    "sdpa": _sdpa,
    "grn": _grn,
    "affine": lambda blk, x: torch.addcmul(blk.beta.view(1, -1, 1, 1), blk.alpha.view(1, -1, 1, 1), x),
    "normalize": lambda blk, x: F.normalize(blk.f(x), dim=blk.dim),
    "gate_expand_as": lambda blk, x: x * torch.sigmoid(blk.f(x.mean((2, 3), keepdim=True))).expand_as(x),
    "bn_reshape_as": _bn_reshape_as,
    "std_conv": _std_conv,
    "shared": lambda blk, x: blk.f(F.relu(blk.f(x))),
    "cls_token": _cls_token,
    "token_linear": lambda blk, x: blk.f(x),  # mixes the 6 positions along W, per channel
    "einsum_heads": _einsum_heads,
    "fold_windows": _fold_windows,
    "var_norm": lambda blk, x: x / (torch.var(x, (2, 3), False, True) + 1).sqrt(),
    "gather_rows": lambda blk, x: x[:, :, blk.rows % x.shape[2]],
    "max_positions": lambda blk, x: x + x.max(dim=2, keepdim=True)[0],
    "lstm_rows": _lstm_rows,
    "pad_last": lambda blk, x: blk.f(F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, 1, 0, 1)))[:, :-1, :-1].permute(0, 3, 1, 2),
}


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


EXAMPLES = int(os.environ.get("RWDEPLOY_PROPERTY_EXAMPLES", "200"))


def zero_single_producers(gm, analysis, seed: int) -> None:
    """Zero, for some channels, one producer slice alone (a depthwise filter, one of the
    convs summed by a residual): removal must then judge the channel part by part."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for group in analysis.groups:
            producers = group.slices_with("producer")
            if group.pinned or len(producers) < 2:
                continue
            for c in range(group.size):
                if torch.rand(1, generator=g) < 0.4:
                    s = producers[int(torch.randint(len(producers), (1,), generator=g))]
                    gm.get_parameter(s.tensor).index_fill_(s.dim, torch.tensor(s.indices[c]), 0.0)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=st.lists(block_spec, min_size=1, max_size=5), head=st.integers(0, 1),
       fraction=st.sampled_from([0.3, 0.5, 0.7]), seed=st.integers(0, 2**16), columns=st.booleans(),
       singles=st.booleans())
def test_random_architectures_stay_exact(spec, head, fraction, seed, columns, singles):
    torch.manual_seed(seed)
    model = RandomNet(spec, head).eval()
    randomize_norms(model, seed)
    x = torch.randn(1, 3, 6, 6)
    gm = trace_model(model, x).gm
    analysis = analyze_channel_groups(gm, x)
    if singles:
        zero_single_producers(gm, analysis, seed)
    else:
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
