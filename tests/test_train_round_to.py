"""`round_to` N: hard pruning keeps a multiple of N filters/channels in every trained channel
group (rounded up, the extras next by score), and the trained model's groups are that wide."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

pytest.importorskip("rwdeploy.passes.channel_groups")

from rwdeploy.cli import main  # noqa: E402
from rwdeploy.errors import OptionError  # noqa: E402
from rwdeploy.io import load_model  # noqa: E402
from rwdeploy.train import Recipe, build_prune_targets, hard_prune, parse_scheme  # noqa: E402
from rwdeploy.train.gradual import GradualPruning  # noqa: E402
from rwdeploy.train.pipeline import channel_analysis  # noqa: E402
from rwdeploy.train.prune import LayerRule  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 4
# filters per convolution; `stem` is the first conv (left dense by default), conv_c has fewer than N
WIDTHS = {"stem": 4, "conv_a": 10, "conv_b": 7, "conv_c": 3, "conv_d": 6}


class _Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        names, c_in = list(WIDTHS), 1
        for name in names:
            setattr(self, name, nn.Conv2d(c_in, WIDTHS[name], 3, padding=1))
            c_in = WIDTHS[name]
        self.fc = nn.Linear(c_in, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in WIDTHS:
            x = torch.relu(getattr(self, name)(x))
        return self.fc(x.mean((2, 3)))


def _net_with_known_norms() -> tuple[nn.Module, dict[str, list[float]]]:
    """Every filter of a pruned conv is a constant tensor whose L2 norm is a distinct, known value."""
    torch.manual_seed(0)
    net = _Chain()
    gen = torch.Generator().manual_seed(1)
    norms = {}
    with torch.no_grad():
        for name in list(WIDTHS)[1:]:
            w = getattr(net, name).weight
            values = (torch.randperm(w.shape[0], generator=gen) + 1).double().mul(0.37).tolist()
            for f, v in enumerate(values):
                w[f] = v / math.sqrt(w[f].numel())
            norms[name] = values
    return net, norms


def _targets(net: nn.Module, scheme: str, round_to: int):
    return build_prune_targets(net, [LayerRule("*", parse_scheme(scheme))], default_rate=0.5,
                               analysis=channel_analysis(net.eval(), torch.randn(1, 1, 6, 6)), round_to=round_to)


def _kept_filters(mask: torch.Tensor) -> list[int]:
    keep = mask.flatten(1).all(1)
    assert torch.equal(keep, mask.flatten(1).any(1))  # whole filters only
    return keep.nonzero().flatten().tolist()


def _top(values: list[float], k: int) -> list[int]:
    return sorted(sorted(range(len(values)), key=lambda i: -values[i])[:k])


def test_per_layer_rate_rounds_kept_filters_up_to_a_multiple_of_n_keeping_the_top_scored():
    net, norms = _net_with_known_norms()
    params = {n: p.detach() for n, p in net.named_parameters()}
    # rate 0.5 keeps n - round(n / 2): 5, 3, 1 (round(1.5) = 2 pruned), 3; rounded up to 4s (all 3 of conv_c)
    plain = {"conv_a": 5, "conv_b": 3, "conv_c": 1, "conv_d": 3}
    expected = {"conv_a": 8, "conv_b": 4, "conv_c": 3, "conv_d": 4}
    masks = hard_prune(params, _targets(net, "filter", 1).group_sets)
    assert {n: len(_kept_filters(masks[f"{n}.weight"])) for n in plain} == plain  # without rounding: unaligned
    targets = _targets(net, "filter", N)
    assert sorted(g.tensors[0] for g in targets.group_sets) == [f"{n}.weight" for n in sorted(expected)]
    assert all(g.round_to == N and g.describe()["round_to"] == N for g in targets.group_sets)
    masks = hard_prune(params, targets.group_sets)
    for name, k in expected.items():
        kept = _kept_filters(masks[f"{name}.weight"])
        assert kept == _top(norms[name], k), name
        assert len(kept) % N == 0 or len(kept) == WIDTHS[name]


def test_global_rate_rounds_each_layer_after_the_pooled_allocation():
    net, norms = _net_with_known_norms()
    params = {n: p.detach() for n, p in net.named_parameters()}
    masks = hard_prune(params, _targets(net, "filter", N).group_sets, global_rate=0.5)
    # independent: pool every filter by norm / sqrt(filter size), drop the lowest half, then per
    # layer round the survivors up to a multiple of N with the layer's next-largest filters
    pool = [(v / math.sqrt(params[f"{n}.weight"][0].numel()), n, i) for n in norms for i, v in enumerate(norms[n])]
    dropped = sorted(pool)[: round(0.5 * len(pool))]
    for name, values in norms.items():
        survivors = len(values) - sum(1 for _, n, _ in dropped if n == name)
        k = min(-(-survivors // N) * N, len(values))
        assert _kept_filters(masks[f"{name}.weight"]) == _top(values, k), name


def test_gradual_events_keep_multiples_and_end_at_the_one_shot_masks():
    net, norms = _net_with_known_norms()
    params = {n: p.detach() for n, p in net.named_parameters()}
    targets = _targets(net, "filter", N)
    pruner = GradualPruning(targets.group_sets, events=3)
    pruner.begin(steps_per_epoch=8, epochs=1)
    masks: dict = {}
    for step in range(8):
        new = pruner.masks_at(net, step, masks)
        if new is None:
            continue
        masks = new
        for name in norms:
            kept = len(_kept_filters(masks[f"{name}.weight"]))
            assert kept % N == 0 or kept == WIDTHS[name], (step, name, kept)
    assert len(pruner.done) == 3
    one_shot = hard_prune(params, targets.group_sets)
    assert set(masks) == set(one_shot) and all(torch.equal(masks[k], one_shot[k]) for k in masks)


def test_channel_scheme_rounds_kept_input_channels():
    net, _ = _net_with_known_norms()
    params = {n: p.detach() for n, p in net.named_parameters()}

    def kept(round_to: int) -> dict[str, int]:
        masks = hard_prune(params, _targets(net, "channel", round_to).group_sets)
        return {n: int(masks[f"{n}.weight"].transpose(0, 1).flatten(1).all(1).sum()) for n in list(WIDTHS)[1:]}

    # in-channels of conv_a..conv_d (4, 10, 7, 3): half kept is 2, 5, 3, 1 -> 4, 8, 4, 3 (all of conv_d's 3)
    assert kept(1) == {"conv_a": 2, "conv_b": 5, "conv_c": 3, "conv_d": 1}
    assert kept(N) == {"conv_a": 4, "conv_b": 8, "conv_c": 4, "conv_d": 3}


def test_coupled_residual_stage_is_one_group_whose_every_producer_keeps_the_rounded_count():
    from rwdeploy import models

    torch.manual_seed(0)
    net = models.create("resnet20")
    x = torch.randn(models.input_shape("resnet20"))
    targets = build_prune_targets(net, [LayerRule("*", parse_scheme("filter"))], default_rate=0.6,
                                  analysis=channel_analysis(net.eval(), x), round_to=N)
    masks = hard_prune({n: p.detach() for n, p in net.named_parameters()}, targets.group_sets)
    convs = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    seen = set()
    for gs in targets.group_sets:
        n = gs.num_groups  # 16, 32 or 64 channels: 0.4 of them is 6, 13, 26 -> 8, 16, 28
        expected = {16: 8, 32: 16, 64: 28}[n]
        producers = [t for t in gs.tensors if t.rsplit(".", 1)[0] in convs]
        for t in producers:
            assert len(_kept_filters(masks[t])) == expected, (gs.label, t)
        seen.add(len(producers))
    assert max(seen) == 4  # a residual stage (3 block outputs + the shortcut) shares one count


def test_recipe_key_and_errors(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("model: lenet5\nscheme: 'filter:0.5+irregular:0.9'\nround_to: 8\n")
    assert Recipe.from_yaml(path).round_to == 8  # a combination: rounds the filter part
    for bad in (0, -4, 2.5, True):
        with pytest.raises(OptionError, match=r"--round-to .*: must be a positive integer"):
            Recipe(scheme="filter", round_to=bad).validate()
    with pytest.raises(OptionError, match="--round-to 4: needs a filter or channel scheme"):
        Recipe(scheme="irregular", round_to=4).validate()
    Recipe(scheme="irregular", round_to=1).validate()  # 1 = off, any scheme
    for args, needle in ((["--scheme", "filter", "--round-to", "0"], "--round-to 0: must be a positive integer"),
                         (["--scheme", "irregular", "--round-to", "4"], "--round-to 4: needs a filter or channel scheme")):
        out = tmp_path / "x.pt"
        assert main(["prune", "--model", "lenet5", "--data", "digits", *args, "--out", str(out), "--quiet"]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and needle in err[0], err
        assert not out.exists()


def test_cli_run_trains_groups_whose_nonzero_filters_are_multiples_of_n(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: lenet5\ndata: digits\nscheme: filter\nrate: 0.5\nround_to: 3\n"
                      "pretrain: {epochs: 1}\nprune: {epochs: 1}\nretrain: {epochs: 1}\n")
    out = tmp_path / "m.pt"
    assert main(["prune", "--recipe", str(recipe), "--round-to", "4", "--out", str(out), "--device", "cpu",
                 "--quiet", "--threads", "1"]) == 0
    loaded = load_model(out)
    meta = loaded.metadata["rwdeploy_prune"]
    assert meta["recipe"]["round_to"] == 4 and meta["round_to"] == 4  # the command line overrides the recipe
    weights = dict(loaded.module.named_parameters())
    trained = {t: weights[t] for g in meta["targets"]["group_sets"] for t in g["tensors"]}
    assert set(trained) == {"conv2.weight", "fc1.weight"}  # conv1 and the classifier stay dense
    for name, w in trained.items():
        n = w.shape[0]
        assert (n - round(0.5 * n)) % 4 != 0  # unrounded, 25 of 50 and 250 of 500 would be kept
        nonzero = int((w.detach().flatten(1) != 0).any(1).sum())  # from the weights, not the masks
        assert nonzero % 4 == 0 and n - round(0.5 * n) <= nonzero < n - round(0.5 * n) + 4, (name, nonzero)
    # compile's channel removal, from the weights alone, leaves those aligned widths
    from rwdeploy.passes.remove_zero_channels import remove_zero_channels
    from rwdeploy.passes.trace import trace_model

    x = torch.randn(loaded.input_shape)
    slim = remove_zero_channels(trace_model(loaded.module.eval(), x).gm, x).gm
    shapes = {n: tuple(p.shape) for n, p in slim.named_parameters()}
    assert shapes["conv2.weight"][0] == 28 and shapes["fc1.weight"] == (252, 28 * 4 * 4)
    with torch.no_grad():
        assert torch.allclose(slim(x), loaded.module(x), rtol=1e-4, atol=1e-5)
