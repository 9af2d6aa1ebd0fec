"""What training zeroes, compile removes: pruned checkpoints through `rwdeploy compile`."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("rwdeploy.passes.channel_groups")

from rwdeploy import models  # noqa: E402
from rwdeploy.compile import CompileOptions, compile_model  # noqa: E402
from rwdeploy.io import Checkpoint, load_model, save_checkpoint  # noqa: E402
from rwdeploy.train import Masker, Recipe, build_prune_targets, hard_prune, parse_scheme, run_pruning  # noqa: E402
from rwdeploy.train.pipeline import channel_analysis  # noqa: E402
from rwdeploy.train.prune import LayerRule  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _layers(report):
    return {row["name"]: row for row in report["layers"]}


def test_short_filter_run_compiles_with_channels_removed(tmp_path):
    r = Recipe(model="lenet5", data="digits", scheme="filter:0.5+irregular:0.8", rate=0.8, device="cpu")
    r.penalty.lam = 1e-4
    r.pretrain.epochs, r.prune.epochs, r.retrain.epochs = 1, 1, 1
    res = run_pruning(r, tmp_path / "m.pt")
    losses = [x["loss"] for x in res.log if "loss" in x]
    assert losses[-1] < losses[0]
    report = compile_model(load_model(tmp_path / "m.pt"), CompileOptions(out=tmp_path / "c", measure=False)).report
    layers = _layers(report)
    assert layers["conv2"]["shape_after"] == [25, 20, 5, 5]  # half of the 50 filters removed
    assert layers["fc1"]["shape_after"] == [250, 400]  # half of fc1's rows and conv2's 25 x 16 columns
    assert layers["fc2"]["shape_after"] == [10, 250]
    assert report["verification"]["max_rel"] <= 1e-4


def test_resnet_filter_groups_prune_whole_residual_stages_that_compile_removes(tmp_path):
    torch.manual_seed(0)
    net = models.create("resnet20")
    x = torch.randn(models.input_shape("resnet20"))
    targets = build_prune_targets(net, [LayerRule("*", parse_scheme("filter"))], default_rate=0.5,
                                  analysis=channel_analysis(net, x))
    stage = [g for g in targets.group_sets if "layer2.0.shortcut.0.weight" in g.tensors]
    assert len(stage) == 1 and {"layer2.0.conv2.weight", "layer2.1.conv2.weight", "layer2.2.conv2.weight"} <= set(stage[0].tensors)
    params = {n: p.detach() for n, p in net.named_parameters()}
    masks = hard_prune(params, targets.group_sets)
    Masker(net, masks).apply_()
    save_checkpoint(Checkpoint("resnet20", net.state_dict(), models.input_shape("resnet20"), {"num_classes": 10}, masks),
                    tmp_path / "r.pt")
    report = compile_model(load_model(tmp_path / "r.pt"), CompileOptions(out=tmp_path / "c", measure=False)).report
    layers = _layers(report)
    for name in ("layer2.0.conv2", "layer2.1.conv2", "layer2.2.conv2", "layer2.0.shortcut.0"):
        assert layers[name]["shape_after"][0] == 16, name  # the stage's 32 channels -> 16, in every producer
    assert layers["layer3.1.conv1"]["shape_after"][0] == 32
    assert layers["layer1.0.conv2"]["shape_after"][0] == 16  # stage 1 touches the excluded stem: kept
    assert report["verification"]["max_rel"] <= 1e-4


def test_demo_prunes_and_compiles(tmp_path):
    from rich.console import Console

    from rwdeploy.demo import run_demo

    out = run_demo(tmp_path / "demo", Console(file=open(tmp_path / "log.txt", "w"), width=120),
                   epochs=(1, 1, 1), measure=False)
    assert (out / "report.json").is_file() and (out / "slim.onnx").is_file()
    ckpt = load_model(tmp_path / "demo" / "lenet5-pruned.pt")
    assert ckpt.metadata["rwdeploy_prune"]["scheme"] == "filter:0.5+irregular:0.9"
    import json

    layers = _layers(json.loads((out / "report.json").read_text()))
    assert layers["conv2"]["shape_after"][0] == 25 and layers["fc1"]["shape_after"][0] == 250
