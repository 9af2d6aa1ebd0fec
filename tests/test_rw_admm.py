"""Reweighted ADMM: the reweighted proximal Z-step against hand computations, and the ADMM loop."""
from __future__ import annotations

import pytest
import torch

from rwdeploy.errors import OptionError
from rwdeploy.train.rw_admm import (ReweightedADMM, broadcast_to_elements, reweighted_group_factors,
                                    reweighted_soft_threshold)


class _Rows:
    """Test fixture: each row of one 2-D tensor is a group (a "filter")."""

    def __init__(self, name: str, rows: int) -> None:
        self.tensors, self.num_groups = (name,), rows

    def sq_norms(self, params):
        return (params[self.tensors[0]] ** 2).sum(dim=1)


def test_elementwise_step_by_hand():
    v = torch.tensor([3.0, -0.5, 1.0, -2.0])
    z_prev = torch.tensor([1.0, 0.0, 2.0, -1.0])
    # eps = 1: alpha = [1/2, 1, 1/3, 1/2]; tau = 1 -> thresholds [0.5, 1, 1/3, 0.5].
    got = reweighted_soft_threshold(v, z_prev, tau=1.0, eps=1.0)
    torch.testing.assert_close(got, torch.tensor([2.5, 0.0, 2.0 / 3.0, -1.5]))


def test_group_step_by_hand():
    v = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])  # norms 5, 0.5, 0
    z_prev_norms = torch.tensor([1.0, 0.0, 3.0])
    # eps = 1: alpha = [1/2, 1, 1/4]; factor = max(0, 1 - alpha / ||v||) = [0.9, 0, 0 (zero group)]
    f = reweighted_group_factors(v.norm(dim=1), z_prev_norms, tau=1.0, eps=1.0)
    torch.testing.assert_close(f, torch.tensor([0.9, 0.0, 0.0]))
    per_elem = broadcast_to_elements(_Rows("w", 3), f, {"w": v.shape})["w"]
    torch.testing.assert_close(v * per_elem, torch.tensor([[2.7, 3.6], [0.0, 0.0], [0.0, 0.0]]))


def test_one_admm_update_by_hand():
    w = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    admm = ReweightedADMM({"w": w}, [_Rows("w", 2)], lam=0.5, rho=0.5, rho_growth=2.0, rho_max=4.0, eps=1.0)
    assert float(admm.penalty({"w": w})) == 0.0  # Z = W, U = 0 at the start
    log = admm.update({"w": w})
    # tau = lam / rho = 1; alpha from Z = W: norms 5, 0.5 -> alpha 1/6, 1/1.5.
    z = torch.stack([w[0] * (1 - (1 / 6) / 5), w[1] * 0.0])
    torch.testing.assert_close(admm.Z["w"], z)
    # U = W - Z, then rescaled by rho_old / rho_new = 0.5 / 1.0.
    torch.testing.assert_close(admm.U["w"], 0.5 * (w - z))
    assert admm.rho == 1.0 and log["rho"] == 1.0
    assert log["primal_residual"] == pytest.approx(float((w - z).norm()))
    w2 = w + 0.1
    expected = 0.5 * 1.0 * float(((w2 - admm.Z["w"] + admm.U["w"]) ** 2).sum())
    assert float(admm.penalty({"w": w2})) == pytest.approx(expected)


def test_tensors_outside_any_group_set_are_left_alone():
    class Half:  # groups only the first row; the second row is outside the set
        tensors, num_groups = ("w",), 1

        def sq_norms(self, params):
            return (params["w"][0] ** 2).sum().reshape(1)

    w = torch.tensor([[0.01, 0.02], [0.01, 0.02]])
    admm = ReweightedADMM({"w": w}, [Half()], lam=1.0, rho=1.0, rho_max=1.0)
    admm.update({"w": w})
    torch.testing.assert_close(admm.Z["w"], torch.tensor([[0.0, 0.0], [0.01, 0.02]]))


def test_admm_loop_converges_to_a_group_sparse_consensus():
    # f(W) = 1/2 ||W - A||^2 has an exact W-step: W = (A + rho (Z - U)) / (1 + rho).
    torch.manual_seed(0)
    a = torch.randn(8, 6) * torch.tensor([1.0, 1.0, 1.0, 0.05, 0.05, 0.05, 0.05, 1.0]).view(8, 1)
    w = a.clone()
    admm = ReweightedADMM({"w": w}, [_Rows("w", 8)], lam=0.02, rho=0.05, rho_growth=1.3, rho_max=5.0, eps=1e-3)
    for _ in range(60):
        w = (a + admm.rho * (admm.Z["w"] - admm.U["w"])) / (1 + admm.rho)
        log = admm.update({"w": w})
    assert log["primal_residual"] < 1e-3
    zero_rows = (admm.Z["w"].norm(dim=1) == 0).tolist()
    assert zero_rows == [False, False, False, True, True, True, True, False]
    # The strong groups are barely shrunk (the reweighting spares large groups).
    torch.testing.assert_close(admm.Z["w"][[0, 1, 2, 7]], a[[0, 1, 2, 7]], rtol=0.05, atol=0.05)


def test_bad_settings_are_option_errors():
    with pytest.raises(OptionError, match="lambda=-1"):
        ReweightedADMM({"w": torch.ones(2, 2)}, [_Rows("w", 2)], lam=-1)
    with pytest.raises(OptionError, match="no parameter named v"):
        ReweightedADMM({"w": torch.ones(2, 2)}, [_Rows("v", 2)], lam=1)


def test_z_step_on_the_frameworks_filter_groups_matches_the_formula():
    from rwdeploy.train.groups import tensor_groups
    from rwdeploy.train.schemes import SchemeSpec

    torch.manual_seed(1)
    w = torch.randn(6, 3, 3, 3) * torch.tensor([1.0, 0.01, 1.0, 0.02, 1.0, 1.0]).view(6, 1, 1, 1)
    gs = tensor_groups(SchemeSpec("filter"), "conv.weight", tuple(w.shape), 0.5)
    admm = ReweightedADMM({"conv.weight": w}, [gs], lam=1e-3, rho=1e-2, rho_growth=1.0, rho_max=1e-2, eps=1e-3)
    z = admm.z_step({"conv.weight": w})["conv.weight"]
    norms = w.flatten(1).norm(dim=1)
    factor = torch.clamp(1 - (1e-3 / 1e-2) / (norms + 1e-3) / norms, min=0)
    torch.testing.assert_close(z, w * factor.view(6, 1, 1, 1))
    assert (z.flatten(1).norm(dim=1) == 0).tolist() == [False, True, False, True, False, False]


def test_rw_admm_method_prunes_to_the_rate_in_a_short_run(tmp_path):
    from rwdeploy.train import Recipe, run_pruning

    torch.set_num_threads(1)
    r = Recipe(model="lenet5", data="digits", method="rw-admm", scheme="irregular", rate=0.8, device="cpu")
    r.penalty.lam = 1e-4
    r.pretrain.epochs, r.prune.epochs, r.retrain.epochs = 1, 2, 1
    res = run_pruning(r, tmp_path / "m.pt")
    for m in res.masks.values():
        assert int((~m).sum()) == round(0.8 * m.numel())
    log = [rec for rec in res.log if rec["phase"] == "prune"]
    assert log[-1]["admm_updates"] == 1 and log[-1]["z_zero_fraction"] > 0  # the Z-step zeroed weights
    assert res.final_acc > 0.8
