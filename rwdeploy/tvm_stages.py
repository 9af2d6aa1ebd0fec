"""The compile pipeline's TVM stages (target steps: a failure keeps the verified slim model).

`target_stages(name)` is `rwdeploy.compile.TARGET_STAGES[name]` for every registry target:
`tvm_build` (original and slim at every measured batch size; the first batch's builds ship as
`model.<target>.so` and `original.<target>.so`), then `tvm_measure` where the target runs in this
process (cpu, gpu: outputs checked with `verify.compare`, original and slim timed in
alternation; skipped with a note without a GPU), or `DEVICE_STAGES[family]` (arm: over TVM RPC,
else on the emulated aarch64 device).
"""
from __future__ import annotations

import sys
from pathlib import Path


from rwdeploy.context import CompileContext, CompileOptions, Stage
from rwdeploy.errors import VerificationError
from rwdeploy.passes.verify import compare
from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.arm_measure import ArmVariant, instruction_section, measure_arm
from rwdeploy.runtime.latency import LatencyRow, time_interleaved
from rwdeploy.runtime.targets import RUNS_LOCAL, TARGETS, Target, get_target

SLIM_SO = "model.{target}.so"
ORIGINAL_SO = "original.{target}.so"


def _target(opts: CompileOptions) -> Target:
    return get_target(opts.target, gpu_arch=opts.gpu_arch, threads=opts.threads, rpc=opts.rpc)


def stage_tvm_build(ctx: CompileContext) -> None:
    opts = ctx.options
    target = _target(opts)
    batches = ctx.batches or (1,)
    section = {"target": target.to_dict(), "builds": [], "notes": list(target.notes)}
    ctx.sections.setdefault("targets", {})[target.name] = section
    ctx.tvm_artifacts.clear()
    for variant, module in ctx.variants().items():
        for batch in batches:
            x = ctx.loaded.example_input(batch=batch, seed=opts.seed)
            ship = batch == batches[0]
            name = (SLIM_SO if variant == "slim" else ORIGINAL_SO).format(target=target.name)
            art = tvm_build.build(module, x, target, tune=opts.tune, tuning_db=opts.tuning_db)
            if ship:
                tvm_build.export(art, ctx.path(name))
                role = "tvm_module" if variant == "slim" else "tvm_module_original"
                ctx.files[role] = {"path": name, "bytes": art.size_bytes}
            ctx.tvm_artifacts[(variant, batch)] = art
            section["builds"].append({"variant": variant, "batch": batch, **art.to_dict(),
                                      "path": name if ship else None})


def stage_tvm_measure(ctx: CompileContext) -> None:
    opts = ctx.options
    target = _target(opts)
    section = ctx.sections["targets"][target.name]
    if not target.check("run"):
        missing = ", ".join(r.name for r in target.missing("run"))
        section["notes"].append(f"latency step skipped: {missing} not present on this machine")
        section["latency_skipped"] = True
        return
    for batch in sorted({batch for _, batch in ctx.tvm_artifacts}):
        x = ctx.loaded.example_input(batch=batch, seed=opts.seed)
        runs, checks = {}, {}
        for variant, module in ctx.variants().items():
            runs[variant], output = tvm_build.bind_local(ctx.tvm_artifacts[(variant, batch)], x)
            checks[variant] = compare(module(x), output, tolerance=opts.tolerance)
            if not checks[variant].passed:
                raise VerificationError(
                    f"TVM output of the {variant} model (target {target.name}, batch {batch}) differs from torch: "
                    f"max relative error {checks[variant].max_rel:.3g} > tolerance {opts.tolerance:g}",
                    hint="a TVM build problem; compile with --target onnx to skip TVM, and report it")
        stats = time_interleaved(runs, warmup=opts.warmup, min_runs=opts.runs, max_runs=max(opts.runs, 1000),
                                 min_time_s=opts.min_time_s)
        ctx.latency.extend(LatencyRow("tvm", target.name, variant, batch, target.threads or opts.threads, st,
                                      max_abs_err=checks[variant].max_abs, max_rel_err=checks[variant].max_rel)
                           for variant, st in stats.items())


def _emulator_messages(message: str) -> None:
    """Provisioning (first use, about a minute) and start-up messages, on stderr."""
    if message.startswith(("downloading", "fetching", "installing", "cross-building", "starting", "stopped")):
        print(f"arm-emulator: {message}", file=sys.stderr, flush=True)


def stage_arm_measure(ctx: CompileContext) -> None:
    """The arm targets' measurement (after `tvm_build`): the shipped original and slim libraries on
    the device given by --rpc/--tracker/--key, else on the emulated aarch64 device; latency rows
    plus `device`, `measurements`, `instructions` and notes in `targets[<target>]`. Only the
    shipped batch size is measured: at emulated speed a batch-8 resnet takes a minute."""
    opts = ctx.options
    section = ctx.sections["targets"][opts.target]
    notes = section["notes"]
    shipped = {variant: (batch, art) for (variant, batch), art in ctx.tvm_artifacts.items() if art.path is not None}
    variants = []
    for variant, module in ctx.variants().items():
        batch, art = shipped[variant]
        x = ctx.loaded.example_input(batch=batch, seed=opts.seed)
        variants.append(ArmVariant(variant, Path(art.path), module(x).detach().numpy()))
    results = measure_arm(variants, x.numpy(), target=opts.target, rpc=opts.rpc, tracker=opts.tracker,
                          key=opts.key, tolerance=opts.tolerance, repeat=max(5, min(opts.runs, 30)),
                          progress=_emulator_messages)
    m = results[0].measurement
    section["device"] = {"address": m.device, "emulated": m.emulated}
    if m.emulated:
        notes.append("measured on the emulated aarch64 device (no --rpc given): qemu-user on this machine, "
                     "so latency is emulated, not ARM latency; compare variants by aarch64 instructions per "
                     "inference")
    section["measurements"] = {r.variant: r.to_dict() for r in results}
    if any(r.instructions is not None for r in results):
        section["instructions"] = instruction_section(results)
        for variant, c in section["instructions"]["per_variant"].items():
            notes.append(f"{variant}: {c['insns_per_inference']:,} aarch64 instructions per inference "
                         f"(two measurements differ by {max(c['samples']) - min(c['samples']):,})")
    ctx.latency.extend(r.latency_row() for r in results)


def _measuring(options: CompileOptions) -> bool:
    return options.measure


# family -> the stages measuring on a device. arm: over TVM RPC (--rpc / --tracker --key), else
# on the emulated aarch64 device.
DEVICE_STAGES: dict[str, tuple[Stage, ...]] = {
    "arm": (Stage("arm_measure", "Measure on the arm device (emulated without --rpc)", stage_arm_measure,
                  _measuring, target_step=True),),
}


def target_stages(name: str) -> tuple[Stage, ...]:
    """The stages for registry target `name`."""
    entry = TARGETS[name]
    stages = [Stage("tvm_build", f"Build TVM module for {name}", stage_tvm_build, target_step=True)]
    if entry.runs_on == RUNS_LOCAL:
        stages.append(Stage("tvm_measure", f"Measure TVM latency on {name}", stage_tvm_measure, _measuring,
                            target_step=True))
    return (*stages, *DEVICE_STAGES.get(entry.family, ()))
