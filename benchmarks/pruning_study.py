"""Reweighted pruning against magnitude and ADMM, tested fairly (issue 14).

Protocol (README "Reweighted pruning results"):
  * a validation split (20% of the training images, stratified, fixed) is held out; every
    choice (lambda, rho, eps, milestones, rho growth) is made on it, from runs that never
    evaluate the test split; each final model is evaluated on the test split exactly once;
  * every method gets the same budget: the same dense start (per seed), the same prune-phase
    and retraining epochs, hence the same number of optimizer steps; each run records its
    optimizer steps, process CPU time and wall time, and `--part timing` measures per-step
    wall time per method under /tmp/rwdeploy-timing.lock, methods interleaved;
  * hyper-parameters are tuned at each prune-phase length on seed 0 at one target rate (a grid
    of four values of the method's main knob, then its secondary knobs at one length), and
    the chosen settings are used for every rate and for seeds 0, 1, 2;
  * a budget sweep: prune-phase length x rate, three seeds; ablations of the method's parts
    at one length.

    python benchmarks/pruning_study.py                      # everything at the digits scale (CPU)
    python benchmarks/pruning_study.py --part report        # tables and plots from the cached runs
    python benchmarks/pruning_study.py --part timing        # per-step wall time (takes the lock)
    python benchmarks/pruning_study.py --scale gpu --device cuda   # ResNet-56 / VGG-16 (a GPU machine)

Every run appends one JSON line to benchmarks/results/study/<scale>/runs.jsonl; a run already
there is never repeated, so the study resumes where it stopped. Dense checkpoints live in
--work (default ~/.cache/rwdeploy/study; re-trained if missing, deterministically).
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from rwdeploy.train import Recipe, run_pruning

RESULTS = Path(__file__).parent / "results" / "study"
TIMING_LOCK = "/tmp/rwdeploy-timing.lock"
TOLERANCE = 0.005  # "within 0.5 points of the dense model"
VAL_FRACTION = 0.2
SEEDS = (0, 1, 2)
TUNE_SEED = 0


# ----------------------------------------------------------------------------- what is compared
@dataclass(frozen=True)
class Variant:
    """A method with fixed settings (dotted recipe fields) and the knob tuned on validation."""

    name: str
    method: str
    settings: tuple[tuple[str, Any], ...] = ()
    knob: str | None = None  # e.g. "penalty.lam"; None: nothing to tune
    secondary: tuple[tuple[tuple[str, Any], ...], ...] = ()  # alternatives tried at the tuning length
    about: str = ""


RW_PAPER = (("penalty.bounded", True), ("penalty.proximal", True))
VARIANTS = {v.name: v for v in (
    Variant("magnitude", "magnitude", about="plain training in the prune phase, then the smallest groups go"),
    Variant("admm", "admm", knob="admm.rho",
            secondary=((("admm.rho_factor", 1.2),), (("admm.rho_factor", 2.0),), (("admm.rho_max", 10.0),)),
            about="ADMM (Zhang et al. ECCV'18): rho x rho_factor per epoch up to rho_max"),
    Variant("reweighted", "reweighted", RW_PAPER, knob="penalty.lam",
            secondary=((("penalty.eps", 1e-2),), (("penalty.updates", 2),), (("penalty.updates", 10),)),
            about="reweighted group penalty bounded by the constraint, proximal steps (this study's reading of DAC'21)"),
    Variant("reweighted-v0", "reweighted", (("penalty.bounded", False), ("penalty.proximal", False)), knob="penalty.lam",
            about="the implementation before this study: every group penalised, subgradient in the loss"),
    # ablations (at the ablation length only)
    Variant("rw-subgradient", "reweighted", (("penalty.bounded", True), ("penalty.proximal", False)), knob="penalty.lam",
            about="bounded, but the penalty's subgradient in the loss instead of proximal steps"),
    Variant("rw-unbounded", "reweighted", (("penalty.bounded", False), ("penalty.proximal", True)), knob="penalty.lam",
            about="proximal steps, but every group penalised (not bounded by the constraint)"),
    Variant("rw-squared", "reweighted", RW_PAPER + (("penalty.squared", True),), knob="penalty.lam",
            about="squared group norms, alpha = 1/(||W_g||^2 + eps)"),
    Variant("rw-gradual", "reweighted", RW_PAPER + (("gradual", 3),), knob="penalty.lam",
            about="hard pruning in 3 gradual steps inside the prune phase (cubic schedule)"),
    Variant("rw-no-bn", "reweighted", RW_PAPER + (("filter_norm_scales", False),), knob="penalty.lam",
            about="filter groups without the BatchNorm scales (conv weights only)"),
    Variant("magnitude-gradual", "magnitude", (("gradual", 3),), about="gradual magnitude pruning (3 steps, cubic)"),
    Variant("admm-gradual", "admm", (("gradual", 3),), knob="admm.rho", about="ADMM with 3 gradual hard-pruning steps"),
)}
MAIN = ("magnitude", "admm", "reweighted")


@dataclass
class Study:
    name: str
    model: str
    scheme: str
    rates: list[float]
    tune_rate: float
    prune_lengths: list[int]
    ablation_length: int
    dense_epochs: int
    retrain_epochs: int
    grids: dict[str, list[float]]  # variant -> values of its knob
    ablations: list[str]
    input_shape: list[int] | None = None
    # the longest prune phases only at the highest rates, where the methods differ (CPU budget)
    rates_by_length: dict[int, list[float]] = field(default_factory=dict)
    # lengths that reuse the settings tuned at a shorter one instead of their own grid (CPU budget)
    tuned_at: dict[int, int] = field(default_factory=dict)
    lr: float = 0.05
    retrain_lr: float = 0.01
    batch_size: int = 64

    def rates_at(self, length: int) -> list[float]:
        return self.rates_by_length.get(length, self.rates)

    def grid(self, variant: Variant) -> list[float | None]:
        if variant.knob is None:
            return [None]
        key = variant.name if variant.name in self.grids else variant.method
        return list(self.grids[key])


LAM_RW = {"lenet5": [1e-4, 1e-3, 1e-2, 1e-1], "resnet20": [0.1, 1.0, 10.0, 100.0]}
LAM_SMALL = {"lenet5": [1e-5, 1e-4, 1e-3, 1e-2], "resnet20": [1e-4, 1e-3, 1e-2, 1e-1]}
RHO = [1e-3, 1e-2, 1e-1, 1.0]


def _grids(name: str) -> dict[str, list[float]]:
    return {"admm": RHO, "reweighted": LAM_RW[name], "rw-squared": LAM_RW[name], "rw-gradual": LAM_RW[name],
            "rw-no-bn": LAM_RW[name], "reweighted-v0": LAM_SMALL[name], "rw-unbounded": LAM_SMALL[name],
            "rw-subgradient": [10 * v for v in LAM_SMALL[name]]}


SCALES: dict[str, dict[str, Study]] = {
    # digits: 1,006 training / 251 validation / 540 test images; one CPU thread per run
    "digits": {
        "lenet5": Study("lenet5", "lenet5", "irregular", [0.9, 0.95, 0.98, 0.99, 0.995], 0.99, [2, 6, 12, 24], 6,
                        dense_epochs=8, retrain_epochs=4, grids=_grids("lenet5"),
                        tuned_at={24: 12},
                        ablations=["rw-subgradient", "rw-unbounded", "rw-squared", "rw-gradual",
                                   "magnitude-gradual", "admm-gradual"]),
        # 3x16x16 rather than 3x32x32: a quarter of the compute; digits are 8x8 at source
        "resnet20": Study("resnet20", "resnet20", "filter", [0.5, 0.7, 0.8, 0.9], 0.8, [2, 6, 12, 24], 6,
                          dense_epochs=6, retrain_epochs=3, grids=_grids("resnet20"), input_shape=[1, 3, 16, 16],
                          rates_by_length={24: [0.8, 0.9]}, tuned_at={24: 12},
                          lr=0.1, ablations=["rw-subgradient", "rw-unbounded", "rw-squared", "rw-gradual",
                                             "rw-no-bn", "magnitude-gradual", "admm-gradual"]),
    },
    # a minute's check that the whole script works (not a result)
    "smoke": {
        "lenet5": Study("lenet5", "lenet5", "irregular", [0.9], 0.9, [1], 1, dense_epochs=1, retrain_epochs=1,
                        grids={k: v[:2] for k, v in _grids("lenet5").items()}, ablations=["rw-gradual"]),
    },
    # for a machine with a GPU (not run yet): deeper nets, full 32x32 input, longer phases
    "gpu": {
        "resnet56": Study("resnet56", "resnet56", "filter", [0.5, 0.7, 0.8, 0.9], 0.8, [10, 30, 60], 30,
                          dense_epochs=30, retrain_epochs=15, grids=_grids("resnet20"), lr=0.1,
                          ablations=["rw-subgradient", "rw-unbounded", "rw-gradual", "magnitude-gradual"]),
        "vgg16": Study("vgg16", "vgg16_bn", "filter", [0.5, 0.7, 0.8, 0.9], 0.8, [10, 30, 60], 30,
                       dense_epochs=30, retrain_epochs=15, grids=_grids("resnet20"), lr=0.05,
                       ablations=["rw-subgradient", "rw-unbounded", "rw-gradual", "magnitude-gradual"]),
    },
}


# ----------------------------------------------------------------------------- one run
@dataclass
class RunSpec:
    study: str
    variant: str
    purpose: str  # dense | tune | final
    prune_epochs: int
    rate: float
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        s = ",".join(f"{k}={v}" for k, v in sorted(self.settings.items()))
        return f"{self.study}|{self.variant}|{self.purpose}|P{self.prune_epochs}|r{self.rate}|s{self.seed}|{s}"


def _set(recipe: Recipe, dotted: str, value: Any) -> None:
    obj: Any = recipe
    *head, last = dotted.split(".")
    for part in head:
        obj = getattr(obj, part)
    if not hasattr(obj, last):
        raise KeyError(f"recipe has no setting {dotted}")
    setattr(obj, last, value)


def build_recipe(study: Study, spec: RunSpec, dense_path: Path | None, device: str) -> Recipe:
    variant = VARIANTS.get(spec.variant)
    r = Recipe(model=study.model if dense_path is None else str(dense_path), data="digits",
               method=variant.method if variant else "magnitude", scheme=study.scheme, rate=spec.rate,
               seed=spec.seed, device=device, batch_size=study.batch_size, input_shape=study.input_shape,
               val_fraction=VAL_FRACTION, final_test=spec.purpose != "tune")
    r.pretrain.epochs, r.pretrain.lr = (study.dense_epochs if spec.purpose == "dense" else 0), study.lr
    r.prune.epochs, r.prune.lr = (0 if spec.purpose == "dense" else spec.prune_epochs), study.lr
    r.retrain.epochs, r.retrain.lr = (0 if spec.purpose == "dense" else study.retrain_epochs), study.retrain_lr
    for k, v in spec.settings.items():
        _set(r, k, v)
    return r.validate()


def pick_threads(requested: str) -> int:
    """`auto`: two threads while the machine is otherwise idle (1-minute load under 0.5), else one."""
    if requested == "auto":
        return 2 if os.getloadavg()[0] < 0.5 else 1
    return int(requested)


def run_one(study: Study, spec: RunSpec, work: Path, device: str, threads: str = "1") -> dict[str, Any]:
    dense_path = None if spec.purpose == "dense" else dense_checkpoint(study, spec.seed, work, device)
    recipe = build_recipe(study, spec, dense_path, device)
    out = dense_path_for(study, spec.seed, work) if spec.purpose == "dense" else work / "run.pt"
    torch.set_num_threads(pick_threads(threads))
    load0 = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    res = run_pruning(recipe, out)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    meta = res.metadata["rwdeploy_prune"]
    hard = next((r for r in res.log if r["phase"] == "hard_prune"), {})
    last_prune = [r for r in res.log if r["phase"] == "prune"]
    row = {"key": spec.key, **spec.__dict__, "val_acc": res.val_acc, "test_acc": res.final_acc,
           "dense_val_acc": res.dense_acc, "val_acc_before_hard_prune": last_prune[-1]["val_acc"] if last_prune else None,
           "val_acc_after_hard_prune": hard.get("val_acc"), "prunable_sparsity": res.sparsity,
           "params_total": meta["params_total"], "params_nonzero": meta["params_nonzero"],
           "compression": meta["params_total"] / max(meta["params_nonzero"], 1),
           "optimizer_steps": meta["optimizer_steps"], "cpu_s": cpu, "wall_s": wall,
           "torch_threads": torch.get_num_threads(), "loadavg_start": [round(v, 2) for v in load0],
           "loadavg_end": [round(v, 2) for v in os.getloadavg()], "device": device}
    for leftover in (Path(f"{out}.state.pt"), Path(f"{out}.log.jsonl")):
        leftover.unlink(missing_ok=True)
    if spec.purpose != "dense":
        out.unlink(missing_ok=True)
    return row


def dense_path_for(study: Study, seed: int, work: Path) -> Path:
    return work / f"{study.name}-dense-{seed}.pt"


def dense_checkpoint(study: Study, seed: int, work: Path, device: str) -> Path:
    """The dense model every method of `seed` starts from (trained again, identically, if missing)."""
    path = dense_path_for(study, seed, work)
    if not path.exists():
        run_one(study, RunSpec(study.name, "dense", "dense", 0, 0.0, seed), work, device)
    return path


# ----------------------------------------------------------------------------- the cache of runs
class RunLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["key"]] = row

    def get(self, spec: RunSpec) -> dict[str, Any] | None:
        return self.rows.get(spec.key)

    def add(self, row: dict[str, Any]) -> None:
        self.rows[row["key"]] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def select(self, **match: Any) -> list[dict[str, Any]]:
        return [r for r in self.rows.values() if all(r.get(k) == v for k, v in match.items())]


THREADS = "1"  # set from --threads


def ensure(log: RunLog, study: Study, spec: RunSpec, work: Path, device: str) -> dict[str, Any]:
    row = log.get(spec)
    if row is None:
        row = run_one(study, spec, work, device, THREADS)
        log.add(row)
        acc = f"val {row['val_acc']:.4f}" + ("" if row["test_acc"] is None else f" test {row['test_acc']:.4f}")
        print(f"[{time.strftime('%H:%M:%S')}] {spec.key}: {acc}, after hard prune {row['val_acc_after_hard_prune']}, "
              f"{row['optimizer_steps']} steps, cpu {row['cpu_s']:.0f} s, wall {row['wall_s']:.0f} s, "
              f"load {row['loadavg_start'][0]}", flush=True)
    return row


# ----------------------------------------------------------------------------- tuning
def dense_rows(log: RunLog, study: Study, work: Path, device: str) -> dict[int, dict[str, Any]]:
    return {s: ensure(log, study, RunSpec(study.name, "dense", "dense", 0, 0.0, s), work, device) for s in SEEDS}


def tune_specs(study: Study, variant: Variant, length: int, extra: dict[str, Any] | None = None) -> list[RunSpec]:
    base = dict(variant.settings)
    out = []
    for value in study.grid(variant):
        settings = dict(base, **({variant.knob: value} if variant.knob else {}), **(extra or {}))
        out.append(RunSpec(study.name, variant.name, "tune", length, study.tune_rate, TUNE_SEED, settings))
    return out


def best_settings(log: RunLog, study: Study, variant: Variant, length: int, work: Path, device: str) -> dict[str, Any]:
    """Stage 1: the knob's grid at this length; stage 2 (secondary settings, tried at the
    ablation length with the stage-1 value there) applies to every length if it wins there.
    A length in `study.tuned_at` takes the stage-1 value of the length it names."""
    length = study.tuned_at.get(length, length)
    rows = [ensure(log, study, s, work, device) for s in tune_specs(study, variant, length)]
    best = max(rows, key=lambda r: r["val_acc"])  # first of equals: the grid's order
    chosen = dict(best["settings"])
    if variant.secondary and variant.name in MAIN:
        at = [ensure(log, study, s, work, device) for s in tune_specs(study, variant, study.ablation_length)]
        knob_there = max(at, key=lambda r: r["val_acc"])
        trials = [knob_there] + [ensure(log, study, RunSpec(study.name, variant.name, "tune", study.ablation_length,
                                                             study.tune_rate, TUNE_SEED, dict(knob_there["settings"], **dict(alt))),
                                        work, device) for alt in variant.secondary]
        winner = max(trials, key=lambda r: r["val_acc"])
        for k, v in winner["settings"].items():
            if k != variant.knob:
                chosen[k] = v
    return chosen


# ----------------------------------------------------------------------------- the plan
def plan(study: Study, log: RunLog, work: Path, device: str, parts: set[str], lengths: list[int]) -> Iterator[None]:
    """Runs in the order that gives useful partial results first (a generator: one step per run)."""
    dense_rows(log, study, work, device)
    for length in lengths:
        if "sweep" in parts:
            for vname in MAIN + ("reweighted-v0",):
                variant = VARIANTS[vname]
                chosen = best_settings(log, study, variant, length, work, device)
                rates = study.rates_at(length) if vname in MAIN else [study.tune_rate]
                for seed in SEEDS:
                    for rate in rates:
                        ensure(log, study, RunSpec(study.name, vname, "final", length, rate, seed, chosen), work, device)
                        yield
        if "ablation" in parts and length == study.ablation_length:
            for vname in study.ablations:
                variant = VARIANTS[vname]
                chosen = best_settings(log, study, variant, length, work, device)
                for seed in SEEDS:
                    ensure(log, study, RunSpec(study.name, vname, "final", length, study.tune_rate, seed, chosen),
                           work, device)
                    yield


def interleave(generators: list[Iterator[None]]) -> None:
    """Round-robin over the studies, one run at a time, so both fill in as the study goes."""
    live = list(generators)
    while live:
        for g in list(live):
            try:
                next(g)
            except StopIteration:
                live.remove(g)


# ----------------------------------------------------------------------------- timing
def timing(studies: list[Study], log: RunLog, work: Path, device: str, rounds: int, out: Path) -> dict[str, Any]:
    """Per-step wall and CPU time of one prune-phase epoch per method, methods interleaved,
    under the shared timing lock; the first round is a warm-up and is dropped."""
    report: dict[str, Any] = {"lock": TIMING_LOCK, "threads": torch.get_num_threads(), "studies": {}}
    with open(TIMING_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        report["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
        for study in studies:
            names = list(MAIN) + ["reweighted-v0"]
            chosen = {n: best_settings(log, study, VARIANTS[n], study.ablation_length, work, device) for n in names}
            samples: dict[str, list[dict[str, float]]] = {n: [] for n in names}
            for rnd in range(rounds + 1):
                order = names[rnd % len(names):] + names[: rnd % len(names)]
                for n in order:
                    spec = RunSpec(study.name, n, "timing", 1, study.tune_rate, TUNE_SEED, chosen[n])
                    recipe = build_recipe(study, spec, dense_checkpoint(study, TUNE_SEED, work, device), device)
                    recipe.retrain.epochs, recipe.final_test = 0, False
                    res = run_pruning(recipe, work / "timing.pt")
                    rec = next(r for r in res.log if r["phase"] == "prune")
                    if rnd:
                        samples[n].append({"wall_per_step_ms": 1e3 * rec["time_s"] / rec["steps"],
                                           "cpu_per_step_ms": 1e3 * rec["cpu_s"] / rec["steps"],
                                           "loadavg": os.getloadavg()[0]})
            report["studies"][study.name] = {
                n: {"rounds": len(v),
                    "wall_per_step_ms": statistics.median(s["wall_per_step_ms"] for s in v),
                    "cpu_per_step_ms": statistics.median(s["cpu_per_step_ms"] for s in v),
                    "samples": v} for n, v in samples.items()}
        report["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    out.write_text(json.dumps(report, indent=1))
    return report


# ----------------------------------------------------------------------------- summaries
def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(study: Study, log: RunLog) -> dict[str, Any]:
    dense = {r["seed"]: r for r in log.select(study=study.name, purpose="dense")}
    out: dict[str, Any] = {"dense": {s: {"val": r["val_acc"], "test": r["test_acc"]} for s, r in dense.items()},
                           "lengths": {}, "paired": {}, "tuning": {}, "ablation": {}}
    if not dense:
        return out
    dense_test = statistics.mean(r["test_acc"] for r in dense.values())
    out["dense_test_mean"] = dense_test
    for length in study.prune_lengths:
        per_method: dict[str, Any] = {}
        for vname in MAIN + ("reweighted-v0",):
            points = []
            for rate in study.rates:
                rows = [r for r in log.select(study=study.name, variant=vname, purpose="final", prune_epochs=length, rate=rate)]
                if not rows:
                    continue
                accs = [r["test_acc"] for r in rows]
                drops = [dense[r["seed"]]["test_acc"] - r["test_acc"] for r in rows if r["seed"] in dense]
                m, sd = _mean_sd(accs)
                points.append({"rate": rate, "n": len(rows), "acc_mean": m, "acc_sd": sd, "acc_min": min(accs),
                               "acc_max": max(accs), "drop_mean": statistics.mean(drops) if drops else None,
                               "compression": statistics.mean(r["compression"] for r in rows),
                               "after_hard_prune_val": statistics.mean(r["val_acc_after_hard_prune"] for r in rows),
                               "steps": sorted({r["optimizer_steps"] for r in rows}),
                               "cpu_s": statistics.mean(r["cpu_s"] for r in rows),
                               "wall_s": statistics.mean(r["wall_s"] for r in rows),
                               "settings": rows[0]["settings"]})
            ok = [p for p in points if p["n"] == len(SEEDS) and p["drop_mean"] is not None and p["drop_mean"] <= TOLERANCE]
            best = max(ok, key=lambda p: p["rate"]) if ok else None
            per_method[vname] = {"points": points, "best_rate": best and best["rate"],
                                 "best_compression": best and best["compression"]}
        out["lengths"][length] = per_method
        out["paired"][length] = paired_differences(study, log, length)
        out["tuning"][length] = tuning_cost(study, log, length)
    length = study.ablation_length
    for vname in [*MAIN, *study.ablations]:
        rows = log.select(study=study.name, variant=vname, purpose="final", prune_epochs=length, rate=study.tune_rate)
        if rows:
            accs = [r["test_acc"] for r in rows]
            m, sd = _mean_sd(accs)
            out["ablation"][vname] = {"n": len(rows), "acc_mean": m, "acc_sd": sd,
                                      "after_hard_prune_val": statistics.mean(r["val_acc_after_hard_prune"] for r in rows),
                                      "settings": rows[0]["settings"], "cpu_s": statistics.mean(r["cpu_s"] for r in rows)}
    return out


def paired_differences(study: Study, log: RunLog, length: int) -> dict[float, dict[str, dict[str, Any]]]:
    """Reweighted minus each baseline, seed by seed (both start from that seed's dense model),
    per rate: mean and sd of the differences, and on how many seeds reweighted was ahead."""
    out: dict[float, dict[str, dict[str, Any]]] = {}
    for rate in study.rates_at(length):
        acc = {v: {r["seed"]: r["test_acc"] for r in log.select(study=study.name, variant=v, purpose="final",
                                                                 prune_epochs=length, rate=rate)} for v in MAIN}
        for other in ("admm", "magnitude"):
            seeds = sorted(set(acc["reweighted"]) & set(acc[other]))
            if not seeds:
                continue
            diffs = [acc["reweighted"][s] - acc[other][s] for s in seeds]
            m, sd = _mean_sd(diffs)
            out.setdefault(rate, {})[other] = {"n": len(seeds), "mean": m, "sd": sd,
                                               "ahead": sum(d > 0 for d in diffs), "behind": sum(d < 0 for d in diffs)}
    return out


def tuning_cost(study: Study, log: RunLog, length: int) -> dict[str, Any]:
    """Per method: the grid's validation accuracies at the tuning rate, how many reach the dense
    model's validation accuracy minus 0.5 points, and the expected number of runs until the
    first such hit when the grid is tried in random order, (N + 1) / (hits + 1)."""
    dense_val = next((r["val_acc"] for r in log.select(study=study.name, purpose="dense", seed=TUNE_SEED)), None)
    out = {}
    for vname in MAIN + ("reweighted-v0",):
        rows = log.select(study=study.name, variant=vname, purpose="tune", prune_epochs=length)
        variant = VARIANTS[vname]
        grid_rows = [r for r in rows if set(r["settings"]) <= set(dict(variant.settings)) | {variant.knob}]
        if not grid_rows or dense_val is None:
            continue
        hits = [r for r in grid_rows if r["val_acc"] >= dense_val - TOLERANCE]
        n = len(grid_rows)
        out[vname] = {"grid": {str(r["settings"].get(variant.knob)): r["val_acc"] for r in grid_rows},
                      "runs": n, "hits": len(hits), "expected_runs_to_hit": (n + 1) / (len(hits) + 1) if hits else None,
                      "cpu_s_per_run": statistics.mean(r["cpu_s"] for r in grid_rows),
                      "secondary": {json.dumps({k: v for k, v in r["settings"].items() if k != variant.knob and
                                                k not in dict(variant.settings)}): r["val_acc"]
                                    for r in rows if r not in grid_rows}}
    return out


# ----------------------------------------------------------------------------- report
COLORS = {"magnitude": "tab:blue", "admm": "tab:orange", "reweighted": "tab:green", "reweighted-v0": "tab:grey"}


def plot(study: Study, summary: dict[str, Any], path: Path) -> bool:
    """Accuracy against rate per method, one column per prune-phase length: the full range on
    top, the band near the dense model (where the 0.5-point criterion lives) below."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install '.[bench]'); no plots", file=sys.stderr)
        return False
    lengths = [L for L in study.prune_lengths if any(d["points"] for d in summary["lengths"].get(L, {}).values())]
    if not lengths or "dense_test_mean" not in summary:
        return False
    fig, axes = plt.subplots(2, len(lengths), figsize=(4 * len(lengths), 6.4), sharey="row", sharex=True, squeeze=False)
    dense = 100 * summary["dense_test_mean"]
    lo = min(100 * p["acc_min"] for L in lengths for d in summary["lengths"][L].values() for p in d["points"])
    for col, length in enumerate(lengths):
        for row in (0, 1):
            ax = axes[row][col]
            for vname in MAIN:
                data = summary["lengths"][length].get(vname)
                pts = data["points"] if data else []
                if not pts:
                    continue
                x = [study.rates.index(p["rate"]) for p in pts]  # evenly spaced: 0.98 / 0.99 / 0.995 apart
                ax.errorbar(x, [100 * p["acc_mean"] for p in pts], yerr=[100 * p["acc_sd"] for p in pts],
                            marker="o", capsize=3, color=COLORS[vname], label=vname)
                ax.fill_between(x, [100 * p["acc_min"] for p in pts], [100 * p["acc_max"] for p in pts],
                                color=COLORS[vname], alpha=0.12)
            ax.axhline(dense, color="grey", ls="--", lw=1, label="dense (mean)")
            ax.axhline(dense - 100 * TOLERANCE, color="grey", ls=":", lw=1, label="dense - 0.5 pt")
            ax.set_xticks(range(len(study.rates)), [str(r) for r in study.rates])
            ax.set_xlim(-0.3, len(study.rates) - 0.7)
            ax.grid(alpha=0.3)
        axes[0][col].set_title(f"prune phase P = {length} epochs")
        axes[1][col].set_xlabel("rate (fraction of groups pruned; evenly spaced)")
    axes[0][0].set_ylim(max(lo - 2, 0), dense + 1.5)
    axes[1][0].set_ylim(dense - 5, dense + 1.5)
    axes[0][0].set_ylabel("test accuracy %")
    axes[1][0].set_ylabel("test accuracy % (near dense)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"{study.model} {study.scheme} pruning on digits: mean ± sd over 3 seeds, band min–max")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_budget(study: Study, summary: dict[str, Any], path: Path) -> bool:
    """Accuracy against the CPU time a run took, one line per method through its prune-phase
    lengths, one panel per rate: the equal-time reading of the sweep."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rates = [r for r in study.rates if any(p["rate"] == r for L in summary["lengths"].values()
                                           for d in L.values() for p in d["points"])]
    if not rates or "dense_test_mean" not in summary:
        return False
    fig, axes = plt.subplots(1, len(rates), figsize=(4 * len(rates), 3.6), squeeze=False)
    for ax, rate in zip(axes[0], rates):
        for vname in MAIN:
            pts = []
            for length in study.prune_lengths:
                data = summary["lengths"].get(length, {}).get(vname)
                p = next((q for q in data["points"] if q["rate"] == rate), None) if data else None
                if p is not None:
                    pts.append((p["cpu_s"], p, length))
            if not pts:
                continue
            ax.errorbar([c for c, _, _ in pts], [100 * p["acc_mean"] for _, p, _ in pts],
                        yerr=[100 * p["acc_sd"] for _, p, _ in pts], marker="o", capsize=3, color=COLORS[vname],
                        label=vname)
            for c, p, length in pts:
                ax.annotate(f"P{length}", (c, 100 * p["acc_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axhline(100 * summary["dense_test_mean"], color="grey", ls="--", lw=1)
        ax.set_title(f"rate {rate}")
        ax.set_xlabel("CPU seconds per run (prune phase + retraining)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy % (mean ± sd, 3 seeds)")
    for ax in axes[0]:
        ax.set_xlim(left=0)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"{study.model} {study.scheme}: accuracy against training time (P = prune-phase epochs)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt_point(p: dict[str, Any] | None) -> str:
    if p is None:
        return "–"
    return f"{100 * p['acc_mean']:.2f} ± {100 * p['acc_sd']:.2f}" + ("" if p["n"] == len(SEEDS) else f" (n={p['n']})")


def markdown(scale: str, studies: list[Study], summaries: dict[str, Any], timing_report: dict[str, Any] | None) -> str:
    lines = [f"# Reweighted vs magnitude vs ADMM at equal budget ({scale} scale)", "",
             "Test accuracy % as mean ± sd over seeds 0, 1, 2 (each final model evaluated on the test split once); "
             "hyper-parameters chosen on a held-out validation split. Generated by `benchmarks/pruning_study.py --part report`.", ""]
    for study in studies:
        s = summaries[study.name]
        if "dense_test_mean" not in s:
            continue
        shape = "x".join(map(str, study.input_shape[1:])) if study.input_shape else "default"
        dense_val = [round(100 * d["val"], 2) for d in s["dense"].values()]
        dense_test = [round(100 * d["test"], 2) for d in s["dense"].values()]
        lines += [f"## {study.model} ({shape} input), {study.scheme} pruning", "",
                  f"Dense ({study.dense_epochs} epochs): test {', '.join(map(str, dense_test))} (mean {100 * s['dense_test_mean']:.2f}), "
                  f"validation {', '.join(map(str, dense_val))}. Each method: prune phase P epochs + {study.retrain_epochs} "
                  f"retraining epochs from the same dense model (same optimizer steps).", ""]
        lines += ["| P | method | " + " | ".join(f"rate {r}" for r in study.rates) +
                  " | highest rate within 0.5 pt (compression) | val after hard prune | steps | CPU s/run | wall s/run | settings |",
                  "|---|---|" + "---|" * (len(study.rates) + 6)]
        for length in study.prune_lengths:
            for vname, data in s["lengths"].get(length, {}).items():
                if not data["points"]:
                    continue
                cells = [_fmt_point(next((p for p in data["points"] if p["rate"] == r), None)) for r in study.rates]
                best = "none" if data["best_rate"] is None else f"{data['best_rate']} ({data['best_compression']:.1f}x)"
                hp = " / ".join(f"{100 * p['after_hard_prune_val']:.0f}" for p in data["points"])
                steps = ",".join(str(x) for p in data["points"][:1] for x in p["steps"])
                cpu = statistics.mean(p["cpu_s"] for p in data["points"])
                wall = statistics.mean(p["wall_s"] for p in data["points"])
                knobs = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in data["points"][0]["settings"].items()
                                  if not isinstance(v, bool))
                lines.append(f"| {length} | {vname} | " + " | ".join(cells) + f" | {best} | {hp} | {steps} | {cpu:.0f} | {wall:.0f} | {knobs} |")
        lines += ["", "Reweighted minus each baseline, paired by seed (same dense start), test points: "
                  "mean ± sd (seeds ahead / behind).", "",
                  "| P | vs | " + " | ".join(f"rate {r}" for r in study.rates) + " |", "|---|---|" + "---|" * len(study.rates)]
        for length, per_rate in s["paired"].items():
            for other in ("admm", "magnitude"):
                cells = []
                for r in study.rates:
                    d = per_rate.get(r, {}).get(other)
                    cells.append("–" if d is None else f"{100 * d['mean']:+.2f} ± {100 * d['sd']:.2f} ({d['ahead']}/{d['behind']})"
                                 + ("" if d["n"] == len(SEEDS) else f" n={d['n']}"))
                if any(c != "–" for c in cells):
                    lines.append(f"| {length} | {other} | " + " | ".join(cells) + " |")
        lines += ["", f"Tuning at rate {study.tune_rate}, seed 0, validation accuracy % per grid value "
                  f"(hit = within 0.5 pt of the dense model's {100 * s['dense'][TUNE_SEED]['val']:.2f}); "
                  "expected runs to a hit in random order = (N+1)/(hits+1).", "",
                  "| P | method | grid (value: val %) | hits / runs | expected runs to hit | CPU s/run | secondary (val %) |",
                  "|---|---|---|---|---|---|---|"]
        for length, per in s["tuning"].items():
            for vname, t in per.items():
                grid = ", ".join(f"{k}: {100 * v:.1f}" for k, v in t["grid"].items())
                exp = "not reached" if t["expected_runs_to_hit"] is None else f"{t['expected_runs_to_hit']:.1f}"
                sec = ", ".join(f"{k}: {100 * v:.1f}" for k, v in t["secondary"].items()) or "–"
                lines.append(f"| {length} | {vname} | {grid} | {t['hits']} / {t['runs']} | {exp} | {t['cpu_s_per_run']:.0f} | {sec} |")
        if s["ablation"]:
            lines += ["", f"Ablations at P = {study.ablation_length}, rate {study.tune_rate} (each tuned on validation the same way):", "",
                      "| variant | test % | val after hard prune % | settings | what it is |", "|---|---|---|---|---|"]
            for vname, a in s["ablation"].items():
                knobs = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in a["settings"].items())
                lines.append(f"| {vname} | {100 * a['acc_mean']:.2f} ± {100 * a['acc_sd']:.2f} | "
                             f"{100 * a['after_hard_prune_val']:.1f} | {knobs} | {VARIANTS[vname].about} |")
        lines.append("")
    if timing_report:
        lines += ["## Per-step time (one prune-phase epoch per method, methods interleaved, median of rounds)", "",
                  f"Under {timing_report['lock']}, {timing_report['threads']} torch thread(s); load average "
                  f"{timing_report['loadavg_start']} → {timing_report['loadavg_end']}.", "",
                  "| model | method | wall ms/step | CPU ms/step | wall / magnitude's |", "|---|---|---|---|---|"]
        for name, per in timing_report["studies"].items():
            base = per.get("magnitude", {}).get("wall_per_step_ms")
            for vname, t in per.items():
                ratio = f"{t['wall_per_step_ms'] / base:.2f}" if base else "–"
                lines.append(f"| {name} | {vname} | {t['wall_per_step_ms']:.1f} | {t['cpu_per_step_ms']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def report(scale: str, studies: list[Study], log: RunLog, out_dir: Path) -> None:
    from rwdeploy.runtime.environment import environment

    summaries = {st.name: summarise(st, log) for st in studies}
    timing_path = out_dir / "timing.json"
    timing_report = json.loads(timing_path.read_text()) if timing_path.exists() else None
    for st in studies:
        if plot(st, summaries[st.name], out_dir / f"{st.name}.png"):
            summaries[st.name]["plot"] = f"{st.name}.png"
        if plot_budget(st, summaries[st.name], out_dir / f"{st.name}_time.png"):
            summaries[st.name]["plot_time"] = f"{st.name}_time.png"
    (out_dir / "summary.json").write_text(json.dumps({"scale": scale, "summaries": summaries,
                                                      "environment": environment()}, indent=1, default=str))
    md = markdown(scale, studies, summaries, timing_report)
    (out_dir / "summary.md").write_text(md)
    print(md)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", choices=sorted(SCALES), default="digits")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    ap.add_argument("--study", action="append", help="default: every study of the scale")
    ap.add_argument("--part", action="append", choices=["sweep", "ablation", "timing", "report"],
                    help="default: sweep, ablation, report")
    ap.add_argument("--lengths", type=lambda s: [int(v) for v in s.split(",")], help="prune-phase lengths to run now")
    ap.add_argument("--threads", default="1", help="torch threads per run: N, or auto (2 when the machine is idle)")
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "rwdeploy" / "study")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where runs.jsonl, summary.* and plots go")
    args = ap.parse_args(argv)
    global THREADS
    THREADS = args.threads
    torch.set_num_threads(pick_threads(args.threads))
    parts = set(args.part or ["sweep", "ablation", "report"])
    studies = [SCALES[args.scale][n] for n in (args.study or list(SCALES[args.scale]))]
    out_dir = args.results / args.scale
    out_dir.mkdir(parents=True, exist_ok=True)
    work = args.work / args.scale
    work.mkdir(parents=True, exist_ok=True)
    log = RunLog(out_dir / "runs.jsonl")
    if parts & {"sweep", "ablation"}:
        gens = []
        for st in studies:
            lengths = [L for L in (args.lengths or st.prune_lengths) if L in st.prune_lengths]
            gens.append(plan(st, log, work, args.device, parts, lengths))
        interleave(gens)
    if "timing" in parts:
        timing(studies, log, work, args.device, args.timing_rounds, out_dir / "timing.json")
    if "report" in parts:
        report(args.scale, studies, log, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
