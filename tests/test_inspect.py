"""`rwdeploy inspect`: statistics against hand computations, table and JSON through the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rwdeploy import io, models
from rwdeploy.demo import example_pruned_lenet
from rwdeploy.passes.layer_stats import layer_stats, totals


def test_lenet_macs_and_params_by_hand():
    net = models.create("lenet5")
    stats = {s.name: s for s in layer_stats(net, torch.randn(1, 1, 28, 28))}
    # conv1: 20 maps of 24x24, each a 1x5x5 dot product; conv2: 50 maps of 8x8 over 20x5x5.
    assert stats["conv1"].macs == 20 * 24 * 24 * 25
    assert stats["conv2"].macs == 50 * 8 * 8 * 20 * 25
    assert stats["fc1"].macs == 800 * 500 and stats["fc2"].macs == 500 * 10
    assert stats["conv2"].params == 50 * 20 * 25 + 50
    assert totals(net, list(stats.values())).params == 431_080


def test_zero_counts_on_a_hand_made_layer():
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False)
    with torch.no_grad():
        conv.weight.normal_()
        conv.weight[1] = 0  # filter 1
        conv.weight[4] = 0  # filter 4
        conv.weight[:, 0] = 0  # input channel 0 of each group
    (s,) = layer_stats(nn.Sequential(conv), torch.randn(1, 4, 5, 5))
    assert s.zero_filters == 2 and s.zero_in_channels == 1
    assert s.zero_fraction == pytest.approx((2 * 18 + 4 * 9) / (6 * 2 * 9))
    # grouped conv: each output sums over in/groups=2 channels x 9 taps, at 5x5 positions.
    assert s.macs == 6 * 25 * 2 * 9


def test_graph_without_modules_counts_the_same(tmp_path):
    net = models.create("resnet20")
    x = torch.randn(1, 3, 32, 32)
    ep = torch.export.export(net, (x,))
    direct = layer_stats(net, x)
    via_export = layer_stats(ep.module(), x)
    assert [(s.name, s.macs, s.weight_shape) for s in direct] == [(s.name, s.macs, s.weight_shape) for s in via_export]


def test_cli_table_and_json(tmp_path, cli):
    io.save_checkpoint(example_pruned_lenet(), tmp_path / "m.pt")
    table = cli("inspect", str(tmp_path / "m.pt"))
    assert table.returncode == 0, table.stderr
    assert "conv2" in table.stdout and "25/50" in table.stdout and "250/500" in table.stdout
    res = cli("inspect", str(tmp_path / "m.pt"), "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    layers = {row["name"]: row for row in data["layers"]}
    assert layers["conv2"]["zero_filters"] == 25 and layers["fc1"]["zero_filters"] == 250
    assert data["input_shape"] == [1, 1, 28, 28]
    assert data["totals"]["macs"] == sum(row["macs"] for row in data["layers"])


def test_cli_state_dict_with_arch_and_shape(tmp_path, cli):
    torch.save(models.create("resnet20").state_dict(), tmp_path / "s.pt")
    res = cli("inspect", str(tmp_path / "s.pt"), "--arch", "resnet20", "--input-shape", "1,3,16,16", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["input_shape"] == [1, 3, 16, 16]
    assert data["layers"][0]["macs"] == 16 * 16 * 16 * 27  # conv1 at 16x16, 3x3x3 taps
