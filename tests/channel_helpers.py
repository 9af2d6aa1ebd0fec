"""Shared helpers of the channel-removal tests: make a model 'filter pruned', count work."""
from __future__ import annotations

import torch
from torch import nn

from rwdeploy.passes.channel_groups import ChannelAnalysis


def randomize_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine params, so removed channels carry real constants."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.5)
            elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
            elif isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.3)


def zero_filters(model: nn.Module, analysis: ChannelAnalysis, fraction: float = 0.5, seed: int = 0) -> int:
    """Zero about `fraction` of the channels of every removable group, in the producing conv /
    linear weights only (BN, biases untouched). Returns how many channels were zeroed."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    zeroed = 0
    with torch.no_grad():
        for group in analysis.groups:
            producers = group.slices_with("producer")
            if group.pinned or not producers or group.size < 2:
                continue
            k = max(1, int(round(group.size * fraction)))
            for c in torch.randperm(group.size, generator=g)[:k].tolist():
                for s in producers:
                    params[s.tensor].index_fill_(s.dim, torch.tensor(s.indices[c]), 0.0)
                zeroed += 1
    return zeroed


def conv_linear_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of all conv / linear layers at input x (an independent count)."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            total += out.numel() * mod.weight[0].numel()
        elif isinstance(mod, nn.ConvTranspose2d):
            total += inp[0].numel() * mod.weight[0].numel()
        elif isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total or _aten_conv_linear_macs(model, x)


def _aten_conv_linear_macs(model: nn.Module, x: torch.Tensor) -> int:
    """The same count for a graph of ATen calls (a torch.export fallback has no layer modules),
    by torch's own FLOP counter: convolutions and the matrix products of linear layers."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    aten = torch.ops.aten
    counted = {aten.convolution, aten._convolution, aten.addmm, aten.mm}
    return sum(n for op, n in counter.get_flop_counts()["Global"].items() if op in counted) // 2
