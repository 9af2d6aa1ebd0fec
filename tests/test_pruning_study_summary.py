"""The statistics behind the pruning study's tables (benchmarks/pruning_study.py), on hand-made
runs: mean/sd per cell, the highest rate within 0.5 points of the dense model, the paired
differences by seed, and the expected number of tuning runs to a hit."""
from __future__ import annotations

import pytest
from conftest import benchmark_module


@pytest.fixture(scope="module")
def study_mod():
    with benchmark_module("pruning_study") as mod:
        yield mod


def _row(study, variant, purpose, length, rate, seed, test, val=0.9, settings=None):
    return {"key": f"{variant}|{purpose}|{length}|{rate}|{seed}|{settings}", "study": study, "variant": variant,
            "purpose": purpose, "prune_epochs": length, "rate": rate, "seed": seed, "settings": settings or {},
            "test_acc": test, "val_acc": val, "val_acc_after_hard_prune": 0.5, "compression": 1 / (1 - rate),
            "optimizer_steps": 10, "cpu_s": 1.0, "wall_s": 2.0}


def test_summary_cells_paired_differences_and_tuning_cost(study_mod, tmp_path):
    m = study_mod
    st = m.Study("toy", "lenet5", "irregular", [0.5, 0.9], 0.9, [2], 2, dense_epochs=1, retrain_epochs=1,
                 grids={"admm": [0.1, 1.0], "reweighted": [0.01, 0.1]}, ablations=[])
    log = m.RunLog(tmp_path / "runs.jsonl")
    dense = {0: 0.98, 1: 0.96, 2: 0.97}
    for seed, acc in dense.items():
        log.add(_row("toy", "dense", "dense", 0, 0.0, seed, acc, val=0.96))
    # rate 0.5: every method within 0.5 pt of its seed's dense model; rate 0.9: only reweighted
    accs = {("reweighted", 0.5): [0.98, 0.96, 0.97], ("reweighted", 0.9): [0.977, 0.958, 0.968],
            ("admm", 0.5): [0.979, 0.959, 0.969], ("admm", 0.9): [0.95, 0.96, 0.90],
            ("magnitude", 0.5): [0.978, 0.958, 0.968], ("magnitude", 0.9): [0.90, 0.91, 0.92]}
    for (v, rate), per_seed in accs.items():
        for seed, acc in enumerate(per_seed):
            log.add(_row("toy", v, "final", 2, rate, seed, acc))
    # tuning at rate 0.9, seed 0: dense val 0.96, a hit needs val >= 0.955
    for v, knob, vals in (("reweighted", "penalty.lam", {0.01: 0.956, 0.1: 0.95}), ("admm", "admm.rho", {0.1: 0.94, 1.0: 0.93})):
        base = dict(m.VARIANTS[v].settings)
        for value, val in vals.items():
            log.add(_row("toy", v, "tune", 2, 0.9, 0, None, val=val, settings=dict(base, **{knob: value})))

    s = m.summarise(st, log)
    cells = {v: {p["rate"]: p for p in d["points"]} for v, d in s["lengths"][2].items()}
    assert cells["admm"][0.9]["acc_mean"] == pytest.approx((0.95 + 0.96 + 0.90) / 3)
    assert cells["admm"][0.9]["acc_sd"] == pytest.approx(0.0321455, abs=1e-6)  # sample sd of 0.95, 0.96, 0.90
    assert s["lengths"][2]["reweighted"]["best_rate"] == 0.9
    assert s["lengths"][2]["admm"]["best_rate"] == 0.5
    assert s["lengths"][2]["magnitude"]["best_rate"] == 0.5
    d = s["paired"][2][0.9]["admm"]  # reweighted - admm per seed: +0.027, -0.002, +0.068
    assert d["mean"] == pytest.approx((0.027 - 0.002 + 0.068) / 3)
    assert (d["ahead"], d["behind"], d["n"]) == (2, 1, 3)
    t = s["tuning"][2]
    assert (t["reweighted"]["hits"], t["reweighted"]["runs"]) == (1, 2)
    assert t["reweighted"]["expected_runs_to_hit"] == pytest.approx(1.5)  # (N + 1) / (hits + 1)
    assert t["admm"]["hits"] == 0 and t["admm"]["expected_runs_to_hit"] is None
