"""Masked retraining keeps pruned weights exactly zero; a leak is detected in debug mode."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rwdeploy.train import Masker, MaskLeakError


def _net_and_masks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    masks = {"0.weight": torch.rand(16, 8) > 0.7, "2.weight": torch.rand(4, 16) > 0.5}
    return net, masks


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_masked_weights_stay_zero_through_retraining(opt_name):
    net, masks = _net_and_masks()
    masker = Masker(net, masks, debug=True)
    masker.apply_()
    # optimiser state from earlier (dense) steps must not revive pruned weights either
    if opt_name == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    else:
        opt = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=1e-3)
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))
    for _ in range(2):  # dense steps fill momentum/Adam state everywhere
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    masker.apply_()
    masker.mask_optimizer_state_(opt)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        masker.mask_grads_()
        opt.step()
        masker.check("after step")  # the step itself left them at zero (no re-masking yet)
        masker.after_step()
    params = dict(net.named_parameters())
    for name, m in masks.items():
        assert torch.count_nonzero(params[name][~m]) == 0
        assert not torch.equal(params[name][m], before[name][m])  # the kept weights did train


def test_leak_is_reported_in_debug_mode():
    net, masks = _net_and_masks()
    masker = Masker(net, masks, debug=True)
    masker.apply_()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    nn.functional.cross_entropy(net(torch.randn(4, 8)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()  # gradients were not masked
    with pytest.raises(MaskLeakError, match="0.weight"):
        masker.after_step()
