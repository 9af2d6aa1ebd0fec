"""The compile pipeline's TVM stages (target steps: a failure keeps the verified slim model).

`target_stages(name)` is `rwdeploy.compile.TARGET_STAGES[name]` for every registry target:
`tvm_build` (original and slim at every measured batch size; the first batch's builds ship as
`model.<target>.so` and `original.<target>.so`), then `tvm_measure` where the target runs in this
process (cpu, gpu: outputs checked with `verify.compare`, original and slim timed in
alternation with each other and with ONNX Runtime's files, whose rows these timings replace;
skipped with a note without a GPU), or `arm_measure` (arm: over TVM RPC, else on
the emulated aarch64 device).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from rwdeploy.context import CompileContext, Stage, measuring, require_close
from rwdeploy.passes.verify import compare
from rwdeploy.runtime import arm_emulator, tvm_build
from rwdeploy.runtime.arm_measure import arm_device
from rwdeploy.runtime.latency import LatencyRow
from rwdeploy.runtime.ort_runner import OrtRunner
from rwdeploy.runtime.rpc import measure_remote_all
from rwdeploy.runtime.targets import RUNS_LOCAL, TARGETS

SLIM_SO = "model.{target}.so"
ORT_KEY = "onnxruntime:"   # the ONNX Runtime calls among those `stage_tvm_measure` times
ORIGINAL_SO = "original.{target}.so"


def stage_tvm_build(ctx: CompileContext) -> None:
    opts = ctx.options
    target = opts.tvm_target()
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
    if any(b.get("cuda_binary") is False for b in section["builds"]):
        section["notes"].append("the CUDA kernels are source: the GPU machine needs TVM's compiler "
                                "to load them (with nvcc on the build host they are a cubin)")


def stage_tvm_measure(ctx: CompileContext) -> None:
    opts = ctx.options
    target = opts.tvm_target()
    section = ctx.sections["targets"][target.name]
    if not target.check("run"):
        missing = ", ".join(r.name for r in target.missing("run"))
        section["notes"].append(f"latency step skipped: {missing} not present on this machine")
        section["latency_skipped"] = True
        return
    ort_runners = {variant: OrtRunner(ctx.path(ctx.files[f"{variant}_onnx"]["path"]), threads=opts.threads)
                   for variant in ("original", "slim") if f"{variant}_onnx" in ctx.files}
    for batch in sorted({batch for _, batch in ctx.tvm_artifacts}):
        x = ctx.loaded.example_input(batch=batch, seed=opts.seed)
        runs, checks = {}, {}
        for variant, module in ctx.variants().items():
            runs[variant], output = tvm_build.bind_local(ctx.tvm_artifacts[(variant, batch)], x)
            checks[variant] = compare(module(x), output, tolerance=opts.tolerance)
            require_close(checks[variant], opts.tolerance, tail="",
                          what=f"TVM output of the {variant} model (target {target.name}, batch {batch}) differs "
                               "from torch", hint="a TVM build problem; compile with --target onnx to skip TVM, "
                                                  "and report it")
        # ONNX Runtime's files timed again, call by call with TVM's builds: this host's speed
        # drifts by tens of percent within minutes, and timed in separate stages the two
        # runtimes' ratio (which the report's verdict is) moved with it (dense ResNet-20 at
        # batch 1: TVM 0.86 or 0.56 ms against ONNX Runtime's 0.66, run to run)
        ort_runs = {variant: runner.bind(x.numpy()) for variant, runner in ort_runners.items() if variant in runs}
        stats = opts.time({**runs, **{ORT_KEY + v: run for v, run in ort_runs.items()}})
        ctx.latency.extend(LatencyRow("tvm", target.name, variant, batch, target.threads or opts.threads,
                                      stats[variant], max_abs_err=checks[variant].max_abs,
                                      max_rel_err=checks[variant].max_rel, with_other_runtime=bool(ort_runs))
                           for variant in runs)
        if ort_runs:  # these replace the ONNX Runtime stage's rows of the same variants and batch
            ctx.latency[:] = [row for row in ctx.latency if not (
                row.runtime == "onnxruntime" and row.batch == batch and row.variant in ort_runs)]
            ctx.latency.extend(LatencyRow("onnxruntime", opts.target, variant, batch, opts.threads,
                                          stats[ORT_KEY + variant], provider="CPUExecutionProvider",
                                          with_other_runtime=True) for variant in ort_runs)


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
    variants = {}  # variant -> (library, its torch model's output)
    for variant, module in ctx.variants().items():
        batch, art = shipped[variant]
        x = ctx.loaded.example_input(batch=batch, seed=opts.seed)
        variants[variant] = (Path(art.path), module(x).detach().numpy())
    x_np = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    with arm_device(opts.rpc, opts.tracker, opts.key, progress=_emulator_messages) as (device, threads):
        # timed in alternation, each output checked against its torch model (verify.compare)
        measured = measure_remote_all(variants, x_np, device, tolerance=opts.tolerance,
                                      repeat=max(5, min(opts.runs, 30)))
        # emulated latency is not ARM latency; instructions per inference reproduce across machines
        counts = {v: arm_emulator.count_instructions(lib, x_np).to_dict() for v, (lib, _) in variants.items()
                  if device.emulated}
    m = measured[next(iter(variants))]
    section["device"] = {"address": m.device, "emulated": m.emulated}
    if m.emulated:
        notes.append("measured on the emulated aarch64 device (no --rpc given): qemu-user on this machine, "
                     "so latency is emulated, not ARM latency; compare variants by aarch64 instructions per "
                     "inference")
    section["measurements"] = {v: {"variant": v, "target": opts.target, "batch": batch, "threads": threads,
                                   **measured[v].to_dict(), **({"instructions": counts[v]} if v in counts else {})}
                               for v in variants}
    if counts:
        section["instructions"] = {"per_variant": counts}
        base = counts.get("original", {}).get("insns_per_inference")
        if base:
            section["instructions"]["relative_to_original"] = {v: c["insns_per_inference"] / base
                                                               for v, c in counts.items()}
        for variant, c in counts.items():
            notes.append(f"{variant}: {c['insns_per_inference']:,} aarch64 instructions per inference "
                         f"(two measurements differ by {max(c['samples']) - min(c['samples']):,})")
    for v in variants:
        r = measured[v]
        ctx.latency.append(LatencyRow("tvm", opts.target, v, batch, threads, r.latency, emulated=r.emulated,
                                      device=r.device, max_abs_err=r.max_abs_err, max_rel_err=r.max_rel_err))


def target_stages(name: str) -> tuple[Stage, ...]:
    """The stages for registry target `name` (see the module docstring)."""
    entry = TARGETS[name]
    stages = [Stage("tvm_build", f"Build TVM module for {name}", stage_tvm_build, target_step=True)]
    if entry.runs_on == RUNS_LOCAL:
        stages.append(Stage("tvm_measure", f"Measure TVM latency on {name}", stage_tvm_measure, measuring,
                            target_step=True))
    if entry.family == "arm":
        stages.append(Stage("arm_measure", "Measure on the arm device (emulated without --rpc)", stage_arm_measure,
                            measuring, target_step=True))
    return tuple(stages)
