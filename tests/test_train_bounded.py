"""The reweighted penalty bounded by the designated constraint, its proximal step, and gradual
hard pruning, on hand-made tensors."""
from __future__ import annotations

import math

import pytest
import torch

from rwdeploy.train import ReweightedPenalty, Recipe, hard_prune, parse_scheme, run_pruning, tensor_groups
from rwdeploy.train.gradual import GradualPruning, gradual_schedule

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _filters(w: torch.Tensor, rate: float):
    return tensor_groups(parse_scheme("filter")[0], "w", tuple(w.shape), rate)


# four filter groups (rows): norms 5, 0.2, 1, 3; rate 0.5 designates the two smallest (rows 1, 2)
W = torch.tensor([[3.0, 4.0], [0.0, 0.2], [1.0, 0.0], [0.0, 3.0]])
EPS = 1e-3


def test_bounded_penalty_pushes_only_the_groups_the_constraint_removes():
    w = W.clone().requires_grad_(True)
    pen = ReweightedPenalty([_filters(w, 0.5)], lam=0.5, eps=EPS, bounded=True, bound_tol=1e-2)
    pen.update_alphas({"w": w})
    assert pen.designated[0].tolist() == [False, True, True, False]
    value = pen({"w": w})
    # lambda * sum over designated g of alpha_g ||W_g||, alpha_g = 1 / (||W_g|| + eps)
    assert math.isclose(float(value.detach()), 0.5 * (0.2 / 0.201 + 1 / 1.001), rel_tol=1e-6)
    value.backward()
    expect = torch.zeros_like(W)
    expect[1] = 0.5 / 0.201 * W[1] / 0.2
    expect[2] = 0.5 / 1.001 * W[2] / 1.0
    assert torch.allclose(w.grad, expect, rtol=1e-5)  # kept rows 0 and 3: no gradient at all
    # the unbounded penalty pushes every group
    free = ReweightedPenalty([_filters(w, 0.5)], lam=0.5, eps=EPS)
    free.update_alphas({"w": w})
    assert math.isclose(float(free({"w": w}).detach()), 0.5 * (5 / 5.001 + 0.2 / 0.201 + 1 / 1.001 + 3 / 3.001),
                        rel_tol=1e-6)


def test_bounded_penalty_stops_pushing_once_the_constraint_holds():
    w = W.clone()
    pen = ReweightedPenalty([_filters(w, 0.5)], lam=0.5, eps=EPS, bounded=True, bound_tol=1e-2)
    pen.update_alphas({"w": w})
    # kept rows 0 and 3 have mean norm 4: a designated row is satisfied at norm <= 0.04
    w[1] = torch.tensor([0.0, 0.03])  # satisfied
    w[2] = torch.tensor([0.05, 0.0])  # not yet
    assert pen.active({"w": w})[0].tolist() == [False, False, True, False]
    assert not pen.constraint_holds({"w": w})
    assert math.isclose(float(pen({"w": w})), 0.5 * 0.05 / 1.001, rel_tol=1e-6)  # alpha from the milestone
    w[2] = torch.tensor([0.04, 0.0])
    assert pen.constraint_holds({"w": w})
    wg = w.clone().requires_grad_(True)
    value = pen({"w": wg})
    value.backward()
    assert float(value.detach()) == 0.0 and torch.count_nonzero(wg.grad) == 0


def test_proximal_step_is_the_group_soft_threshold():
    w = W.clone()
    pen = ReweightedPenalty([_filters(w, 0.5)], lam=0.5, eps=EPS, bounded=True)
    pen.update_alphas({"w": w})
    lr = 0.1
    pen.proximal_({"w": w}, lr)
    # row 1: threshold lr*lam*alpha = 0.05/0.201 = 0.249 > its norm 0.2 -> exactly zero
    assert torch.equal(w[1], torch.zeros(2))
    # row 2: scaled by 1 - 0.05/1.001/1.0
    assert torch.allclose(w[2], W[2] * (1 - 0.05 / 1.001), rtol=1e-6)
    assert torch.equal(w[0], W[0]) and torch.equal(w[3], W[3])  # kept groups untouched
    # squared norm: the shrink 1 / (1 + 2 lr lam alpha), alpha = 1 / (||W_g||^2 + eps), for every group
    w2 = W.clone()
    sq = ReweightedPenalty([_filters(w2, 0.5)], lam=0.5, eps=EPS, squared=True)
    sq.update_alphas({"w": w2})
    sq.proximal_({"w": w2}, lr)
    norms2 = (W ** 2).sum(1)
    assert torch.allclose(w2, W / (1 + 2 * lr * 0.5 / (norms2 + EPS))[:, None], rtol=1e-6)


def test_proximal_step_on_patterns_shrinks_off_pattern_entries_then_kernels():
    spec = parse_scheme("pattern")[0]
    w = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    gs = tensor_groups(spec, "w", tuple(w.shape), 0.5)
    pen = ReweightedPenalty([gs], lam=0.1, eps=EPS)
    pen.update_alphas({"w": w})
    before = w.clone().view(-1, 9)
    norms = gs.penalty_sq_norms({"w": w}).sqrt()
    pen.proximal_({"w": w}, 1.0)
    keep = gs._keep_entries(torch.device("cpu"))
    thr = 0.1 * pen.alphas[0]
    off = (1 - thr[:2] / norms[:2]).clamp_min(0)
    after_off = before * torch.where(keep, torch.ones_like(before), off[:, None])
    # the kernel factor uses the whole-kernel norm from before the step, like every factor
    expect = after_off * (1 - thr[2:] / norms[2:]).clamp_min(0)[:, None]
    assert torch.allclose(w.view(-1, 9), expect, atol=1e-7)
    assert not torch.allclose(w.view(-1, 9), before)


def test_gradual_schedule_is_cubic_and_ends_at_the_rate():
    sched = gradual_schedule(3, 40)
    assert sorted(sched) == [10, 20, 30]
    assert [round(sched[s], 6) for s in (10, 20, 30)] == [round(1 - (2 / 3) ** 3, 6), round(1 - (1 / 3) ** 3, 6), 1.0]
    assert gradual_schedule(0, 40) == {}


def test_gradual_pruning_reaches_exactly_the_target_rate_with_nested_masks():
    torch.manual_seed(0)
    model = torch.nn.Linear(10, 20, bias=False)
    with torch.no_grad():
        model.weight[0, :5] = 0.0  # naturally zero weights tie with pruned ones at score 0
    gs = tensor_groups(parse_scheme("irregular")[0], "weight", (20, 10), 0.73)
    pruner = GradualPruning([gs], events=4)
    pruner.begin(steps_per_epoch=5, epochs=2)
    masks: dict = {}
    pruned_counts = []
    for step in range(10):
        new = pruner.masks_at(model, step, masks)
        if new is None:
            continue
        if masks:
            assert not bool((new["weight"] & ~masks["weight"]).any())  # pruned weights stay pruned
        masks = new
        with torch.no_grad():
            model.weight.mul_(masks["weight"])
            model.weight.add_(0.01 * torch.randn_like(model.weight) * masks["weight"])  # training moves the rest
        pruned_counts.append(int((~masks["weight"]).sum()))
    assert len(pruned_counts) == 4 and pruned_counts == sorted(pruned_counts)
    assert pruned_counts[-1] == round(0.73 * 200)
    # the final hard prune with these masks as prior changes nothing
    again = hard_prune({"weight": model.weight.detach()}, [gs], prior=masks)
    assert torch.equal(again["weight"], masks["weight"])


def test_prior_masks_count_first_even_when_other_groups_are_zero():
    # weights 0..9; the prior prunes 7, 8, 9 (large); weights 0 and 1 are exactly zero
    w = torch.tensor([0.0, 0.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    gs = tensor_groups(parse_scheme("irregular")[0], "w", (10,), 0.4)
    prior = {"w": torch.tensor([True] * 7 + [False] * 3)}
    m = hard_prune({"w": w * prior["w"]}, [gs], prior=prior)["w"]
    assert int((~m).sum()) == 4  # round(0.4 * 10): the three prior ones plus the smallest other (a zero)
    assert not m[7:].any() and int((~m[:2]).sum()) == 1


def test_a_gradual_bounded_run_reaches_the_rate(tmp_path):
    r = Recipe(model="lenet5", data="synthetic", method="reweighted", scheme="irregular", rate=0.8, device="cpu",
               gradual=3)
    r.penalty.lam, r.penalty.bounded, r.penalty.proximal = 1e-3, True, True
    r.pretrain.epochs, r.prune.epochs, r.retrain.epochs = 0, 2, 1
    res = run_pruning(r, tmp_path / "m.pt")
    for m in res.masks.values():
        assert int((~m).sum()) == round(0.8 * m.numel())
    # the sparsity rises inside the prune phase, then the hard prune adds nothing
    sp = [rec["sparsity"] for rec in res.log if rec["phase"] == "prune"]
    assert 0 < sp[0] < sp[-1] == pytest.approx(res.sparsity, abs=1e-6)
    assert res.final_acc > 0.5


def test_filter_groups_without_norm_scales():
    from rwdeploy.train.pipeline import PruneRun

    r = Recipe(model="resnet20", data="synthetic", method="magnitude", scheme="filter", rate=0.5, device="cpu",
               input_shape=[1, 3, 8, 8])
    tensors = {}
    for flag in (True, False):
        r.filter_norm_scales = flag
        run = PruneRun(r, "/dev/null")
        run._setup()
        tensors[flag] = set(run.targets.tensors)
    scales = {f"{n}.weight" for n, m in run.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert tensors[True] & scales and not tensors[False] & scales
    assert tensors[True] - scales == tensors[False]


@pytest.mark.parametrize("method, scheme, layers, lam, expected", [
    ("reweighted", "irregular", [], None, 1e-2),        # the study's choice for per-weight groups
    ("reweighted", "filter", [], None, 1.0),            # ... and for filter groups (ResNet-20, BN scales)
    ("reweighted", "filter:0.5+irregular:0.9", [], None, 1e-2),  # any finer scheme: the per-weight scale
    ("reweighted", "filter", [{"match": "fc*", "scheme": "irregular"}], None, 1e-2),
    ("reweighted", "filter", [], 0.3, 0.3),             # the recipe's own lambda always wins
    ("rw-admm", "filter", [], None, 1e-4),              # rw-admm keeps its scale (lambda / rho)
])
def test_default_lambda_follows_the_study(method, scheme, layers, lam, expected):
    from rwdeploy.train.dist import DistContext
    from rwdeploy.train.methods import create_method

    r = Recipe(method=method, scheme=scheme, layers=layers)
    r.penalty.lam = lam
    assert r.validate().penalty_lambda() == pytest.approx(expected, rel=0, abs=0)
    if method == "reweighted":  # and it is the lambda the penalty is built with
        assert create_method(method, [], r, DistContext()).reg.lam == pytest.approx(expected, rel=0, abs=0)
