"""Schemes, group norms, alphas, hard pruning and the ADMM projection on hand-made tensors."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from rwdeploy.errors import OptionError
from rwdeploy.train import (ReweightedPenalty, build_prune_targets, coupled_groups, hard_prune, parse_scheme,
                            pattern_library, tensor_groups)
from rwdeploy.train.admm import project
from rwdeploy.train.prune import LayerRule, default_exclusions
from rwdeploy.train.schemes import SchemeSpec


def _gs(scheme: str, w: torch.Tensor, rate: float = 0.5):
    spec = parse_scheme(scheme)[0]
    return tensor_groups(spec, "w", tuple(w.shape), rate)


def test_alpha_matches_hand_computation():
    # filter groups of a 3x2 matrix: rows (3, 4) -> norm 5, (0, 0) -> 0, (1, 0) -> 1
    w = torch.tensor([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    gs = _gs("filter", w)
    pen = ReweightedPenalty([gs], lam=0.5, eps=1e-3)
    (alpha,) = pen.update_alphas({"w": w})
    assert torch.allclose(alpha, torch.tensor([1 / 5.001, 1 / 0.001, 1 / 1.001]), rtol=1e-6)
    value = pen({"w": w})
    assert math.isclose(float(value.detach()), 0.5 * (5 / 5.001 + 0 + 1 / 1.001), rel_tol=1e-6)
    value.backward()
    # d/dw lambda*alpha*||w|| = lambda*alpha*w/||w||; zero group gets a zero (not NaN) gradient
    expect = torch.tensor([[0.5 / 5.001 * 3 / 5, 0.5 / 5.001 * 4 / 5], [0.0, 0.0], [0.5 / 1.001, 0.0]])
    assert torch.allclose(w.grad, expect, rtol=1e-5)


def test_squared_alpha():
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    pen = ReweightedPenalty([_gs("filter", w)], lam=1.0, eps=1e-3, squared=True)
    (alpha,) = pen.update_alphas({"w": w})
    assert torch.allclose(alpha, torch.tensor([1 / 25.001, 1 / 1.001]))
    assert math.isclose(float(pen({"w": w})), 25 / 25.001 + 1 / 1.001, rel_tol=1e-6)


def test_alpha_is_constant_between_updates():
    w = torch.tensor([[3.0, 4.0]])
    pen = ReweightedPenalty([_gs("filter", w)], lam=1.0, eps=0.0 + 1e-3)
    pen.update_alphas({"w": w})
    w2 = w * 2
    assert math.isclose(float(pen({"w": w2})), 10 / 5.001, rel_tol=1e-6)  # old alpha, new norm
    pen.update_alphas({"w": w2})
    assert math.isclose(float(pen({"w": w2})), 10 / 10.001, rel_tol=1e-6)


CONV = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2) + 1.0


@pytest.mark.parametrize("scheme, expected_groups", [
    ("irregular", 24), ("filter", 2), ("channel", 3), ("column", 12), ("kernel", 6), ("block1x4", 6), ("block4x1", 12),
    ("block2x2", 6),
])
def test_group_counts_and_norms_against_slicing(scheme, expected_groups):
    gs = _gs(scheme, CONV)
    assert gs.num_groups == expected_groups
    sq = gs.sq_norms({"w": CONV})
    g2 = CONV.reshape(2, 12)
    if scheme == "filter":
        ref = torch.stack([(CONV[o] ** 2).sum() for o in range(2)])
    elif scheme == "channel":
        ref = torch.stack([(CONV[:, i] ** 2).sum() for i in range(3)])
    elif scheme == "column":
        ref = (g2 ** 2).sum(0)
    elif scheme == "kernel":
        ref = torch.stack([(CONV[o, i] ** 2).sum() for o in range(2) for i in range(3)])
    elif scheme == "irregular":
        ref = CONV.reshape(-1) ** 2
    elif scheme == "block1x4":
        ref = torch.stack([(g2[o, 4 * b: 4 * b + 4] ** 2).sum() for o in range(2) for b in range(3)])
    elif scheme == "block4x1":  # 2 rows padded to one block row of 4
        ref = (g2 ** 2).sum(0)
    else:  # block2x2
        ref = torch.stack([(g2[:, 2 * b: 2 * b + 2] ** 2).sum() for b in range(6)])
    assert torch.allclose(sq, ref)
    assert int(gs.sizes().sum()) == CONV.numel()


def test_masks_from_keep_zero_exactly_the_slices():
    w = CONV
    keep = torch.tensor([True, False, True])
    m = _gs("channel", w).masks_from_keep(keep)["w"]
    assert m[:, 1].sum() == 0 and m[:, [0, 2]].all()
    keep = torch.ones(6, dtype=torch.bool)
    keep[4] = False  # kernel (o=1, i=1)
    m = _gs("kernel", w).masks_from_keep(keep)["w"]
    assert (~m).sum() == 4 and not m[1, 1].any()
    m = _gs("column", w).masks_from_keep(torch.arange(12) != 5)["w"]
    assert (~m.reshape(2, 12))[:, 5].all() and (~m).sum() == 2
    m = _gs("block1x4", w).masks_from_keep(torch.tensor([True, True, True, True, False, True]))["w"]
    assert not m.reshape(2, 12)[1, 4:8].any() and (~m).sum() == 4


def test_linear_gemm_view():
    w = torch.randn(4, 6)
    assert _gs("column", w).num_groups == 6
    assert _gs("kernel", w) is None  # kernels need a conv weight
    assert tensor_groups(SchemeSpec("pattern", None, (8,)), "w", (4, 6), 0.5) is None


def test_pattern_library_and_projection():
    lib = pattern_library()
    assert lib.shape == (8, 9) and (lib.sum(1) == 4).all() and lib[:, 4].all()  # centre always kept
    assert len({tuple(r.tolist()) for r in lib}) == 8
    w = torch.zeros(1, 2, 3, 3)
    w[0, 0] = torch.tensor([[0.1, 5, 0.1], [5, 5, 0.2], [0.1, 5, 0.1]])  # "+" without the right arm
    w[0, 1] = torch.tensor([[0.0, 0, 0], [0, 0.01, 0], [0, 0, 0.01]])  # weak kernel
    gs = tensor_groups(SchemeSpec("pattern", 0.5, (8,)), "w", (1, 2, 3, 3), 0.5)
    masks = hard_prune({"w": w}, [gs])
    m = masks["w"]
    assert m[0, 0].reshape(9).nonzero().squeeze(1).tolist() == [1, 3, 4, 7]
    assert not m[0, 1].any()  # connectivity pruning removed the weak kernel (rate 0.5 of 2 kernels)


def test_hard_prune_exact_per_layer_rate():
    torch.manual_seed(0)
    params = {"a": torch.randn(16, 8, 3, 3), "b": torch.randn(10, 37)}
    sets = [tensor_groups(SchemeSpec("irregular"), "a", (16, 8, 3, 3), 0.73),
            tensor_groups(SchemeSpec("filter"), "b", (10, 37), 0.3)]
    masks = hard_prune(params, sets)
    assert int((~masks["a"]).sum()) == round(0.73 * 16 * 8 * 9)
    assert int((~masks["b"]).all(1).sum()) == 3
    # the kept weights are the largest ones
    kept_min = params["a"].abs()[masks["a"]].min()
    assert kept_min >= params["a"].abs()[~masks["a"]].max()


def test_hard_prune_global_rate_counts_all_layers():
    torch.manual_seed(1)
    params = {"a": torch.randn(20, 10), "b": torch.randn(30, 10) * 0.1}
    sets = [tensor_groups(SchemeSpec("irregular"), n, tuple(p.shape), 0.0) for n, p in params.items()]
    masks = hard_prune(params, sets, global_rate=0.5)
    pruned = sum(int((~m).sum()) for m in masks.values())
    assert pruned == 250
    assert (~masks["b"]).sum() > (~masks["a"]).sum()  # the small layer loses more


def test_combined_schemes_count_earlier_pruning():
    torch.manual_seed(2)
    w = torch.randn(8, 16)
    specs = parse_scheme("irregular:0.75+filter:0.5")
    assert [s.name for s in specs] == ["filter", "irregular"]  # coarse first
    sets = [tensor_groups(s, "w", (8, 16), s.rate) for s in specs]
    m = hard_prune({"w": w}, sets)["w"]
    assert int((~m).all(1).sum()) == 4
    assert int((~m).sum()) == 96  # 75% of the weights in total, filters included


def test_parse_scheme_errors():
    with pytest.raises(OptionError, match="unknown scheme"):
        parse_scheme("filtre")
    with pytest.raises(OptionError, match="outside"):
        parse_scheme("filter:1.5")
    assert parse_scheme("block")[0].args == (1, 4)


def test_admm_projection_is_nearest_point_of_the_sparsity_set():
    torch.manual_seed(3)
    w = torch.randn(6, 5)
    gs = tensor_groups(SchemeSpec("filter"), "w", (6, 5), 0.5)
    z = project({"w": w}, [gs])["w"]
    norms = w.norm(dim=1)
    keep = norms.argsort(descending=True)[:3]
    ref = torch.zeros_like(w)
    ref[keep] = w[keep]
    assert torch.equal(z, ref)
    # no other choice of 3 rows is closer to w
    import itertools

    best = min(float(((w - w * torch.tensor([[float(i in c)] for i in range(6)])) ** 2).sum())
               for c in itertools.combinations(range(6), 3))
    assert math.isclose(float(((w - z) ** 2).sum()), best, rel_tol=1e-6)


# ---------------------------------------------------------------- coupled channel groups
class _TwoBranch(nn.Module):
    """conv_a and conv_b both write the channels a residual add joins; conv_c reads them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3)
        self.conv_a = nn.Conv2d(4, 4, 3)
        self.conv_b = nn.Conv2d(4, 4, 1)
        self.conv_c = nn.Conv2d(4, 2, 1)
        self.fc = nn.Linear(2, 3)


def _stage_analysis():
    slc = lambda t, d, role: SimpleNamespace(tensor=t, dim=d, indices=[[c] for c in range(4)], role=role)  # noqa: E731
    stage = SimpleNamespace(id=1, size=4, unit=1, pinned=[], slices=[
        slc("conv_a.weight", 0, "producer"), slc("conv_b.weight", 0, "producer"),
        slc("conv_a.bias", 0, "follower"), slc("conv_c.weight", 1, "consumer")])
    return SimpleNamespace(groups=[stage])


def test_coupled_filter_group_spans_every_producer():
    net = _TwoBranch()
    shapes = {n: tuple(p.shape) for n, p in net.named_parameters()}
    gs = coupled_groups(_stage_analysis().groups[0], "producer", "filter", shapes, 0.5)
    params = dict(net.named_parameters())
    ref = torch.stack([(params["conv_a.weight"][c] ** 2).sum() + (params["conv_b.weight"][c] ** 2).sum()
                       for c in range(4)])
    assert torch.allclose(gs.sq_norms(params), ref)
    masks = hard_prune({k: v.detach() for k, v in params.items()}, [gs])
    assert set(masks) == {"conv_a.weight", "conv_b.weight"}
    dead_a = (~masks["conv_a.weight"]).flatten(1).all(1)
    dead_b = (~masks["conv_b.weight"]).flatten(1).all(1)
    assert torch.equal(dead_a, dead_b) and int(dead_a.sum()) == 2  # same channels in both producers


def test_targets_use_analysis_and_default_exclusions():
    net = _TwoBranch()
    assert default_exclusions(net) == ["stem.weight", "fc.weight"]
    t = build_prune_targets(net, [LayerRule("*", parse_scheme("filter"))], default_rate=0.5,
                            analysis=_stage_analysis())
    assert [g.tensors for g in t.group_sets] == [("conv_a.weight", "conv_b.weight")]
    t = build_prune_targets(net, [LayerRule("*", parse_scheme("channel"))], default_rate=0.5,
                            analysis=_stage_analysis())
    assert [g.tensors for g in t.group_sets] == [("conv_c.weight",)]
    t = build_prune_targets(net, [LayerRule("*", parse_scheme("irregular"))], default_rate=0.5, include=["fc"])
    assert "fc.weight" in t.tensors and "stem.weight" not in t.tensors
    with pytest.raises(OptionError, match="matches no prunable"):
        build_prune_targets(net, [LayerRule("*", parse_scheme("irregular"))], default_rate=0.5, exclude=["nope*"])
