"""The compile pipeline's TVM stages: build `model.<target>.so`, measure it where it runs.

`target_stages(name)` is what `rwdeploy.compile.TARGET_STAGES[name]` holds for every entry of
the target registry:

* `tvm_build`: builds the original and the slim model for the target at every measured batch
  size; the slim build at the first batch size is shipped as `model.<target>.so` (and the
  original as `original.<target>.so`, for on-device comparisons). The report's `targets`
  section gets build times, artifact sizes, device modules and kernel schedule counts.
* `tvm_measure` (targets that run in this process: cpu, gpu): output checked against the
  torch model, then latency rows `runtime="tvm"` beside ONNX Runtime's. Without a GPU the
  gpu measurement is skipped and the report says so.
* targets measured on a device over RPC (arm and its presets) append their device stages
  from `DEVICE_STAGES[family]`.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from rwdeploy.errors import VerificationError
from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.arm_measure import stage_arm_measure
from rwdeploy.runtime.targets import RUNS_LOCAL, TARGETS, get_target

SLIM_SO = "model.{target}.so"
ORIGINAL_SO = "original.{target}.so"

# family -> extra stages measuring on a device, as (name, title, run, when) for `Stage`.
# arm: over TVM RPC (--rpc / --tracker --key), else on the emulated aarch64 device.
DEVICE_STAGES: dict[str, tuple[tuple[Any, ...], ...]] = {
    "arm": (("arm_measure", "Measure on the arm device (emulated without --rpc)", stage_arm_measure,
             lambda options: bool(options.measure)),),
}


def _target(ctx: Any) -> Any:
    opts = ctx.options
    return get_target(opts.target, gpu_arch=getattr(opts, "gpu_arch", None), threads=opts.threads,
                      rpc=getattr(opts, "rpc", None))


def validate_tvm_options(options: Any) -> None:
    """Check --gpu-arch/--tune/--tuning-db against --target before any slow stage runs."""
    target = get_target(options.target, gpu_arch=options.gpu_arch, threads=options.threads,
                        rpc=getattr(options, "rpc", None))
    tvm_build.check_tuning_options(target, options.tune, options.tuning_db)


def _variants(ctx: Any) -> dict[str, torch.nn.Module]:
    return {"original": ctx.original, "slim": ctx.slim}


def stage_tvm_build(ctx: Any) -> None:
    opts = ctx.options
    target = _target(ctx)
    batches = tuple(ctx.batches) or (1,)
    section: dict[str, Any] = {"target": target.to_dict(), "builds": [], "notes": list(target.notes)}
    ctx.tvm_artifacts.clear()
    for variant, module in _variants(ctx).items():
        for batch in batches:
            x = ctx.loaded.example_input(batch=batch, seed=opts.seed)
            ship = batch == batches[0]
            name = (SLIM_SO if variant == "slim" else ORIGINAL_SO).format(target=target.name)
            art = tvm_build.build(module, x, target, out_dir=None, tune=getattr(opts, "tune", 0),
                                  tuning_db=getattr(opts, "tuning_db", None))
            if ship:
                tvm_build.export(art, ctx.path(name))
                role = "tvm_module" if variant == "slim" else "tvm_module_original"
                ctx.files[role] = {"path": name, "bytes": art.size_bytes}
            ctx.tvm_artifacts[(variant, batch)] = art
            section["builds"].append({"variant": variant, "batch": batch, **art.to_dict(),
                                      "path": name if ship else None})
    ctx.sections.setdefault("targets", {})[target.name] = section


def stage_tvm_measure(ctx: Any) -> None:
    opts = ctx.options
    target = _target(ctx)
    section = ctx.sections["targets"][target.name]
    if not target.check("run"):
        missing = ", ".join(r.name for r in target.missing("run"))
        section["notes"].append(f"latency step skipped: {missing} not present on this machine")
        section["latency_skipped"] = True
        return
    for (variant, batch), art in ctx.tvm_artifacts.items():
        module = _variants(ctx)[variant]
        x = ctx.loaded.example_input(batch=batch, seed=opts.seed)
        with torch.no_grad():
            ref = module(x)
        stats, err = tvm_build.measure_local(art, x, ref, warmup=opts.warmup, min_runs=opts.runs,
                                             min_time_s=opts.min_time_s)
        scale = float(ref.abs().max()) or 1.0
        if err / scale > max(opts.tolerance, 1e-4):
            raise VerificationError(
                f"TVM output of the {variant} model (target {target.name}, batch {batch}) differs "
                f"from torch: max relative error {err / scale:.3g} > {max(opts.tolerance, 1e-4):g}",
                hint="a TVM build problem; build with --target cpu to compare, and report it")
        ctx.latency.append({
            "runtime": "tvm", "target": target.name, "variant": variant, "batch": batch,
            "median_ms": stats.median_ms, "p90_ms": stats.p90_ms, "n": stats.n,
            "warmup": stats.warmup, "threads": target.threads or opts.threads, "emulated": False,
            "max_abs_err": err,
        })


def _measuring(options: Any) -> bool:
    return bool(options.measure)


def target_stages(name: str, stage: Callable[..., Any]) -> tuple[Any, ...]:
    """The stages for registry target `name`; `stage` is `rwdeploy.compile.Stage`."""
    entry = TARGETS[name]
    stages = [stage("tvm_build", f"Build TVM module for {name}", stage_tvm_build)]
    if entry.runs_on == RUNS_LOCAL:
        stages.append(stage("tvm_measure", f"Measure TVM latency on {name}", stage_tvm_measure,
                            _measuring))
    stages.extend(stage(*spec) for spec in DEVICE_STAGES.get(entry.family, ()))
    return tuple(stages)
