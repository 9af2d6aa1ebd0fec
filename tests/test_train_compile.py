"""What training zeroes, compile removes: pruned checkpoints through `rwdeploy compile`."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("rwdeploy.passes.channel_groups")

from rwdeploy import models  # noqa: E402
from rwdeploy.io import load_model  # noqa: E402
from rwdeploy.train import Masker, build_prune_targets, hard_prune, parse_scheme  # noqa: E402
from rwdeploy.train.pipeline import channel_analysis  # noqa: E402
from rwdeploy.train.prune import LayerRule  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _layers(report):
    return {row["name"]: row for row in report["layers"]}


def test_resnet_filter_groups_prune_whole_residual_stages_that_compile_removes(tmp_path):
    torch.manual_seed(0)
    net = models.create("resnet20")
    x = torch.randn(models.input_shape("resnet20"))
    targets = build_prune_targets(net, [LayerRule("*", parse_scheme("filter"))], default_rate=0.5,
                                  analysis=channel_analysis(net, x))
    stage = [g for g in targets.group_sets if "layer2.0.shortcut.0.weight" in g.tensors]
    assert len(stage) == 1 and {"layer2.0.conv2.weight", "layer2.1.conv2.weight", "layer2.2.conv2.weight"} <= set(stage[0].tensors)
    # the BatchNorm scales after the producers join the group (a conv before BN is scale-invariant)
    assert {"layer2.0.bn2.weight", "layer2.0.shortcut.1.weight"} <= set(stage[0].tensors)
    params = {n: p.detach() for n, p in net.named_parameters()}
    ref = sum((params[t].reshape(32, -1) ** 2).sum(1) for t in stage[0].tensors)
    assert torch.allclose(stage[0].sq_norms(params), ref)
    params = {n: p.detach() for n, p in net.named_parameters()}
    masks = hard_prune(params, targets.group_sets)
    Masker(net, masks).apply_()
    from rwdeploy.passes.remove_zero_channels import remove_zero_channels
    from rwdeploy.passes.trace import trace_model

    gm = trace_model(net.eval(), x).gm
    slim = remove_zero_channels(gm, x, masks=masks).gm
    shapes = {n: tuple(p.shape) for n, p in slim.named_parameters()}
    for name in ("layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2", "layer2.0.shortcut.0"):
        assert shapes[f"{name}.weight"][0] == 16, name  # the stage's 32 channels -> 16, in every producer
    assert shapes["layer3.1.conv1.weight"][0] == 32
    assert shapes["layer1.0.conv2.weight"][0] == 16  # stage 1 touches the excluded stem: kept
    dead = (~masks["layer2.0.conv2.weight"]).flatten(1).all(1)
    assert torch.equal(dead, ~masks["layer2.0.bn2.weight"])  # the same channels, conv and BN scale
    with torch.no_grad():
        assert torch.allclose(slim(x), net(x), rtol=1e-4, atol=1e-5)

def test_demo_prunes_and_compiles_with_channels_removed(tmp_path):
    """The main job, shortened: a short reweighted run lowers the loss, reaches the rate, and its
    checkpoint compiles with the pruned channels physically removed."""
    import json

    from rich.console import Console

    from rwdeploy.demo import run_demo

    out = run_demo(tmp_path / "demo", Console(file=open(tmp_path / "log.txt", "w"), width=120),
                   epochs=(1, 1, 1), measure=False)
    log = [json.loads(line) for line in (tmp_path / "demo" / "lenet5-pruned.pt.log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]
    ckpt = load_model(tmp_path / "demo" / "lenet5-pruned.pt")
    assert ckpt.metadata["rwdeploy_prune"]["scheme"] == "filter:0.5+irregular:0.9"
    for name, rows in (("conv2.weight", 50), ("fc1.weight", 500)):
        m = ckpt.masks[name]
        assert int((~m).sum()) == round(0.9 * m.numel())
        assert int((~m).reshape(rows, -1).all(1).sum()) == rows // 2
    report = json.loads((out / "report.json").read_text())
    layers = _layers(report)
    assert layers["conv2"]["shape_after"] == [25, 20, 5, 5]  # half of the 50 filters removed
    assert layers["fc1"]["shape_after"] == [250, 400]  # half of fc1's rows, conv2's 25 x 16 columns
    assert layers["fc2"]["shape_after"] == [10, 250]
    assert report["verification"]["max_rel"] <= 1e-4
    assert (out / "slim.onnx").is_file()
