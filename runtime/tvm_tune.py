"""MetaSchedule tuning for cpu/arm builds (`--tune TRIALS --tuning-db DIR`).

The kernels are extracted from the same prepared and fused module that `cpu_pipeline`
builds, so the records in DIR match the PrimFuncs `MetaScheduleApplyDatabase` looks up;
DIR is reused across runs (tuning again adds records, building applies the best).
Kernels without a record keep the hand schedules of `tvm_schedule`.
"""
from __future__ import annotations

import os
from typing import Any

BUILD_TIMEOUT_S = 120  # MetaSchedule's default (30 s) is too short on a busy 2-core machine
RUN_TIMEOUT_S = 60
EVOLUTION_MIN_TRIALS = 32  # per kernel; below it, replay-trace sampling


def tuning_module(mod: Any, target: Any) -> Any:
    """The prepared, legalised and fused module whose PrimFuncs are the tuning tasks."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from rwdeploy.runtime.tvm_legalize import legalize_passes
    from rwdeploy.runtime.tvm_schedule import channel_unit, prepare_passes, vector_lanes

    with target:
        return tvm.transform.Sequential([*prepare_passes(vector_lanes(target), None, channel_unit(target)),
                                         *cpu.library_dispatch_passes(target),
                                         *legalize_passes(target)])(mod)


def tune_cpu(mod: Any, target: Any, work_dir: str, trials: int) -> None:
    """Run `trials` MetaSchedule trials (spread over the kernels) into `work_dir`."""
    from tvm.s_tir import meta_schedule as ms

    os.makedirs(work_dir, exist_ok=True)
    fused = tuning_module(mod, target)
    n_tasks = max(1, len(ms.relax_integration.extract_tasks(fused, target)))
    per_task = max(1, -(-trials // n_tasks))
    # Few trials per kernel: sample the design space directly; the evolutionary search's
    # population (512 by default) would cost minutes of CPU before the first trial.
    strategy = (ms.search_strategy.EvolutionarySearch(population_size=128, init_min_unmeasured=16)
                if per_task >= EVOLUTION_MIN_TRIALS else "replay-trace")
    ms.relax_integration.tune_relax(
        mod=fused, params={}, target=target, work_dir=work_dir,
        max_trials_global=trials, max_trials_per_task=per_task,
        num_trials_per_iter=min(64, per_task), strategy=strategy,
        builder=ms.builder.LocalBuilder(timeout_sec=BUILD_TIMEOUT_S),
        runner=ms.runner.LocalRunner(timeout_sec=RUN_TIMEOUT_S),
        cost_model="random",  # the xgb model needs xgboost; random search still finds wins
    )
