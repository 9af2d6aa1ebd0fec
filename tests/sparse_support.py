"""A small sparse network (conv -> ReLU -> flatten -> Linear on 6x6 inputs) shared by the tests
of the layer timers: both layers have irregular zeros, so each gets a format choice."""
import torch
from torch import nn


def small_sparse_net(channels: int, out_channels: int, features: int, sparsity: float) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(channels, out_channels, 3, padding=1), nn.ReLU(), nn.Flatten(),
                        nn.Linear(out_channels * 6 * 6, features))
    with torch.no_grad():
        for m in (net[0], net[3]):
            m.weight[torch.rand(m.weight.shape) < sparsity] = 0
    return net.eval()
