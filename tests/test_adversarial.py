"""PGD-Linf attack, the adversarial-training hook, robustness evaluation and checkpoint selection."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rwdeploy.errors import OptionError
from rwdeploy.train.adversarial import (AdversarialTraining, Normalize, PGDConfig, RobustnessResult,
                                        RobustSelection, evaluate_robustness, pgd_attack)


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))


def test_defaults_are_the_standard_threat_model():
    cfg = PGDConfig()
    assert (cfg.eps, cfg.step, cfg.steps, cfg.random_start) == (8 / 255, 2 / 255, 10, True)
    with pytest.raises(OptionError):
        PGDConfig(eps=2.0)


def test_pgd_stays_in_the_ball_and_the_box_and_raises_the_loss():
    model = _conv_net().train()
    x = torch.rand(32, 3, 8, 8)
    x[:, 0] = 0.0  # pixels on the box edges must stay inside it
    x[:, 1] = 1.0
    y = torch.randint(0, 5, (32,))
    bn_mean = model[1].running_mean.clone()
    cfg = PGDConfig()
    adv = pgd_attack(model, x, y, cfg, generator=torch.Generator().manual_seed(1))
    assert float((adv - x).abs().max()) <= cfg.eps + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    model.eval()
    with torch.no_grad():
        loss_nat = F.cross_entropy(model(x), y, reduction="none")
        loss_adv = F.cross_entropy(model(adv), y, reduction="none")
        noise = (x + cfg.eps * (2 * torch.rand_like(x) - 1)).clamp(0, 1)
        loss_noise = F.cross_entropy(model(noise), y, reduction="none")
    assert bool((loss_adv >= loss_nat - 1e-5).all())
    assert float(loss_adv.mean()) > float(loss_noise.mean()) + 0.01
    # The attack leaves the model as it found it: train mode, BN statistics, no parameter gradients.
    assert model.training is False  # (set to eval above for the loss comparison)
    assert torch.equal(model[1].running_mean, bn_mean)
    assert all(p.grad is None for p in model.parameters())


def test_pgd_reaches_the_analytic_optimum_of_a_linear_model():
    # Two classes, logits [0, w.x + b], true class 0: the loss grows with w.x, so the best
    # Linf attack is x + eps * sign(w), clipped to [0, 1].
    torch.manual_seed(3)
    lin = nn.Linear(12, 1)
    model = nn.Sequential(nn.Flatten(), lin)
    two_class = lambda out, y: F.cross_entropy(torch.cat([torch.zeros_like(out), out], 1), y)  # noqa: E731
    x = torch.rand(6, 3, 2, 2)
    y = torch.zeros(6, dtype=torch.long)
    cfg = PGDConfig()
    adv = pgd_attack(model, x, y, cfg, loss_fn=two_class, generator=torch.Generator().manual_seed(0))
    expected = (x + cfg.eps * torch.sign(lin.weight.detach()).view(1, 3, 2, 2)).clamp(0, 1)
    torch.testing.assert_close(adv, expected, rtol=0, atol=1e-6)


def test_training_hook_perturbs_pixels_not_normalised_values():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    norm = Normalize(mean, std)
    pixels = torch.rand(8, 3, 8, 8)
    x = norm(pixels)
    hook = AdversarialTraining(PGDConfig(), mean, std, seed=0)
    net = _conv_net().train()
    x_adv = hook(net, x, torch.randint(0, 5, (8,)))
    assert net.training  # the training loop's mode is restored
    adv_pixels = norm.inverse(x_adv)
    assert float((adv_pixels - pixels).abs().max()) <= 8 / 255 + 1e-5
    assert float(adv_pixels.min()) >= -1e-6 and float(adv_pixels.max()) <= 1 + 1e-6
    assert float((adv_pixels - pixels).abs().max()) > 4 / 255  # it did move


def test_evaluation_counts_natural_and_adversarial_accuracy():
    model = _conv_net().eval()
    x = torch.rand(40, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)  # labels the model gets right by construction
    y[:10] = (y[:10] + 1) % 5  # ... except ten
    batches = [(x[:25], y[:25]), (x[25:], y[25:])]
    res = evaluate_robustness(model, batches, cfg=PGDConfig(eps=0.0), strong_steps=3)
    assert res.n == 40 and res.natural_acc == pytest.approx(0.75)
    assert res.pgd_acc == pytest.approx(0.75) and res.pgd_strong_acc == pytest.approx(0.75)  # eps 0: no change
    res = evaluate_robustness(model, batches, cfg=PGDConfig(eps=0.3, step=0.1, steps=3), strong_steps=8)
    assert res.natural_acc == pytest.approx(0.75)
    assert res.pgd_acc < 0.75 and res.pgd_strong_acc <= res.pgd_acc + 0.05
    assert res.score == pytest.approx((res.natural_acc + res.pgd_acc) / 2)
    assert res.to_dict()["selection"] == "(natural_acc + pgd_acc) / 2"


def test_selection_keeps_the_best_mean_of_natural_and_pgd_accuracy():
    model = nn.Linear(2, 2)
    sel = RobustSelection()
    cfg = PGDConfig()
    scores = [(0.9, 0.1), (0.7, 0.5), (0.95, 0.2)]  # means 0.5, 0.6, 0.575
    states = []
    for epoch, (nat, pgd) in enumerate(scores):
        with torch.no_grad():
            model.weight.fill_(epoch)
        states.append(model.weight.detach().clone())
        sel.update(epoch, RobustnessResult(nat, pgd, None, 10, cfg, None), model)
    assert sel.best_epoch == 1
    sel.restore(model)
    assert torch.equal(model.weight, states[1])


@pytest.fixture(scope="module")
def extended_checkpoint(tmp_path_factory):
    """One short `rwdeploy prune` run with all three extensions: rw-admm, PGD training, 4-bit QAT.

    The attack settings come from the recipe file, the method and quantization from options."""
    from rwdeploy.cli import main

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("ext")
    out = folder / "m.pt"
    (folder / "r.yaml").write_text(
        "model: lenet5\ndata: digits\nscheme: irregular\nrate: 0.75\n"
        "pretrain: {epochs: 0}\nprune: {epochs: 1}\nretrain: {epochs: 1, lr: 0.01}\n"
        "extra:\n  adversarial: {method: pgd, steps: 2, eval_steps: 5, eval_samples: 64}\n")
    rc = main(["prune", "--recipe", str(folder / "r.yaml"), "--method", "rw-admm", "--quantize", "4", "--per-channel",
               "--quantize-epochs", "1", "--out", str(out), "--quiet"])
    torch.set_num_threads(old)
    assert rc == 0
    return out


def test_prune_cli_with_pgd_rw_admm_and_4bit_quantization(extended_checkpoint):
    import json

    from rwdeploy.io import load_model
    from rwdeploy.quant import QuantSpec

    loaded = load_model(extended_checkpoint)
    meta = loaded.metadata
    assert meta["rwdeploy_prune"]["method"] == "rw-admm"
    assert meta["adversarial"]["training"]["steps"] == 2 and meta["adversarial"]["final"]["strong_steps"] == 5
    assert meta["robust_selection"]["criterion"] == "(natural_acc + pgd_acc) / 2"
    spec = QuantSpec.from_dict(meta["quantization"])
    assert spec.bits == 4 and spec.per_channel
    params = dict(loaded.module.named_parameters())
    for name, mask in loaded.masks.items():  # masks held through quantization-aware retraining
        assert int(torch.count_nonzero(params[name][~mask])) == 0
    for name, scales in spec.layers.items():  # weights are integers times power-of-two scales
        w = params[name].detach()
        s = torch.tensor(scales).view(-1, *([1] * (w.dim() - 1)))
        q = w / s
        assert torch.equal(q, torch.round(q)) and float(q.abs().max()) <= 8
    log_path = extended_checkpoint.parent / "m.pt.log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["phase"] for r in log] == ["prune", "hard_prune", "retrain", "quantize", "final"]
    assert 0 <= log[2]["pgd_acc"] <= log[2]["natural_acc"] + 0.05 and log[2]["selected"]


def test_bad_extension_settings_are_one_line_errors(tmp_path, capsys):
    from rwdeploy.cli import main

    (tmp_path / "r.yaml").write_text("model: lenet5\nextra:\n  quantize: {bits: 8, per_chanel: true}\n")
    assert main(["prune", "--recipe", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "m.pt")]) == 2
    assert "extra.quantize: unknown setting 'per_chanel'" in capsys.readouterr().err
    assert main(["prune", "--model", "lenet5", "--pgd-eps", "0.1", "--out", str(tmp_path / "m.pt")]) == 2
    assert "need --adversarial pgd" in capsys.readouterr().err
    assert main(["prune", "--model", "lenet5", "--adversarial", "pgd", "--pgd-eps", "3", "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert "eps=3" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.pt").exists()


def test_compile_exports_the_quantized_checkpoint_as_qdq_onnx(extended_checkpoint, tmp_path):
    import json

    import onnx

    pytest.importorskip("rwdeploy.passes.remove_zero_channels")  # the channel passes (compile pipeline)
    from rwdeploy.cli import main

    rc = main(["compile", str(extended_checkpoint), "--out", str(tmp_path / "c"), "--no-measure", "--sparse", "off"])
    assert rc == 0
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    q = report["quantization"]
    assert q["bits"] == 4 and q["onnx"]["storage"] == "int4" and q["onnx"]["check"]["max_rel"] <= 1e-4
    assert q["tvm"]["weights"] == "int8" and q["tvm"]["check"]["max_rel"] <= 1e-4
    qdq = tmp_path / "c" / "slim.qdq.onnx"
    # dense int4 weights: about 1/8 of the float file (irregular pruning removes no channels)
    assert qdq.stat().st_size < 0.2 * (tmp_path / "c" / "original.onnx").stat().st_size
    assert sum(n.op_type == "DequantizeLinear" for n in onnx.load(str(qdq)).graph.node) == 4


def test_compile_for_arm_ships_the_quantized_weights_for_the_device(extended_checkpoint, tmp_path):
    import json

    pytest.importorskip("rwdeploy.passes.remove_zero_channels")
    from rwdeploy.cli import main
    from rwdeploy.runtime.targets import get_target

    if not get_target("arm").check("build"):
        pytest.skip("aarch64 cross compiler missing (scripts/setup.sh test installs it)")
    out = tmp_path / "c"
    assert main(["compile", str(extended_checkpoint), "--target", "arm", "--out", str(out),
                 "--no-measure", "--sparse", "off"]) == 0
    device = json.loads((out / "report.json").read_text())["quantization"]["tvm"]["device_build"]
    lib = out / "slim.qdq.arm.so"
    assert device["target"] == "arm" and device["path"] == lib.name
    head = lib.read_bytes()[:20]
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == 183  # EM_AARCH64
    assert device["library_bytes"] == lib.stat().st_size
