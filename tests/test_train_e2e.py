"""Short end-to-end pruning runs: the loss falls, the rate is reached, runs reproduce and resume,
the checkpoint loads with its masks, the CLI writes it."""
from __future__ import annotations

import json

import pytest
import torch

from rwdeploy.cli import main
from rwdeploy.io import load_model
from rwdeploy.train import Recipe, TrainHooks, run_pruning

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recipe(method: str = "reweighted", scheme: str = "irregular", rate: float = 0.8, data: str = "synthetic",
            **kw) -> Recipe:
    r = Recipe(model="lenet5", data=data, method=method, scheme=scheme, rate=rate, device="cpu", **kw)
    r.penalty.lam = 1e-5
    r.pretrain.epochs, r.prune.epochs, r.retrain.epochs = 1, 1, 1
    return r


def test_end_to_end_lowers_loss_reaches_rate_and_saves_masks(tmp_path):
    out = tmp_path / "m.pt"
    res = run_pruning(_recipe(data="digits", debug_masks=True), out)
    losses = [r["loss"] for r in res.log if r["phase"] in ("pretrain", "prune", "retrain")]
    assert losses[-1] < 0.5 * losses[0]
    assert res.final_acc > 0.85  # 10 classes: chance is 0.1
    # exactly 80% of each pruned tensor (conv2, fc1; conv1 and the classifier stay dense)
    assert set(res.masks) == {"conv2.weight", "fc1.weight"}
    for name, m in res.masks.items():
        assert int((~m).sum()) == round(0.8 * m.numel())
    loaded = load_model(out)
    assert loaded.arch == "lenet5" and set(loaded.masks) == set(res.masks)
    for name, m in loaded.masks.items():
        w = dict(loaded.module.named_parameters())[name]
        assert torch.count_nonzero(w[~m]) == 0 and torch.equal(m, res.masks[name].cpu())
    assert loaded.metadata["rwdeploy_prune"]["prunable_sparsity"] == pytest.approx(0.8, abs=1e-6)
    log = [json.loads(line) for line in (tmp_path / "m.pt.log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["pretrain", "prune", "hard_prune", "retrain", "final"]


@pytest.mark.parametrize("method", ["magnitude", "admm"])
def test_baselines_reach_the_rate(tmp_path, method):
    res = run_pruning(_recipe(method=method, rate=0.6), tmp_path / "m.pt")
    for m in res.masks.values():
        assert int((~m).sum()) == round(0.6 * m.numel())
    assert res.final_acc > 0.8


def test_fixed_seed_reproduces_and_resume_continues_identically(tmp_path):
    full = run_pruning(_recipe(), tmp_path / "a.pt")

    class Crash(Exception):
        pass

    def crash_in_retrain(record):
        if record["phase"] == "retrain":
            raise Crash

    with pytest.raises(Crash):
        run_pruning(_recipe(), tmp_path / "b.pt", hooks=TrainHooks(on_epoch_end=[crash_in_retrain]))
    resumed = run_pruning(_recipe(), tmp_path / "b.pt", resume=True)
    again = run_pruning(_recipe(), tmp_path / "c.pt")
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_resume_refuses_a_different_recipe(tmp_path):
    run_pruning(_recipe(), tmp_path / "a.pt")
    from rwdeploy.errors import OptionError

    with pytest.raises(OptionError, match="different recipe.*rate"):
        run_pruning(_recipe(rate=0.5), tmp_path / "a.pt", resume=True)


def test_cli_with_recipe_and_overrides(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model: lenet5\ndata: synthetic\nscheme: irregular\nrate: 0.5\n"
        "layers:\n  - {match: fc1, scheme: 'block1x4:0.75'}\n"
        "penalty: {lam: 1e-5, eps: 1e-3}\n"
        "pretrain: {epochs: 1}\nprune: {epochs: 1, lr: 0.05}\nretrain: {epochs: 1, lr: 0.01, schedule: constant}\n")
    out = tmp_path / "m.pt"
    rc = main(["prune", "--recipe", str(recipe), "--out", str(out), "--device", "cpu", "--quiet",
               "--method", "magnitude", "--threads", "1"])
    assert rc == 0
    meta = load_model(out).metadata["rwdeploy_prune"]
    assert meta["method"] == "magnitude" and meta["recipe"]["layers"][0]["match"] == "fc1"
    masks = load_model(out).masks
    blocks = (~masks["fc1.weight"]).reshape(500, 200, 4)
    assert blocks.all(-1).sum() == round(0.75 * 500 * 200) and (blocks.any(-1) == blocks.all(-1)).all()
    assert int((~masks["conv2.weight"]).sum()) == round(0.5 * masks["conv2.weight"].numel())

    recipe.write_text("model: lenet5\nrat: 0.5\n")
    assert main(["prune", "--recipe", str(recipe), "--out", str(tmp_path / "x.pt")]) == 2
    assert "unknown setting 'rat'" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_input_shape_override_is_trained_and_recorded(tmp_path):
    r = Recipe(model="resnet20", data="synthetic", scheme="kernel", rate=0.5, device="cpu", input_shape=[1, 3, 8, 8])
    r.pretrain.epochs, r.prune.epochs, r.retrain.epochs = 0, 1, 0
    res = run_pruning(r, tmp_path / "r.pt")
    loaded = load_model(tmp_path / "r.pt")
    assert loaded.input_shape == (1, 3, 8, 8)
    w = res.masks["layer1.0.conv1.weight"]
    assert int((~w).all(-1).all(-1).sum()) == 16 * 16 // 2  # half of the 3x3 kernels
