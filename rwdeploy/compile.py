"""The compile pipeline: a loaded model in, one folder of verified, measured artifacts out.

Stages run in order over one `CompileContext` (rwdeploy/context.py): trace -> analyze -> remove
zero channels -> verify -> [pack sparse] -> export .pt2, ONNX -> ONNX Runtime check ->
[quantized ONNX] -> measure -> [target steps: TVM build, measurement here or on a device] -> report.
A stage is a function `stage(ctx) -> None` that reads what earlier stages left in the context and
adds its own results. A model-transforming stage is one `SLIM_STAGES` entry (with a `when=` on
the options); a target is one `TARGET_STAGES[name]` entry (the CLI's `--target` choices).

Everything is written into a temporary folder, renamed to `options.out` at the end. A failure
before the target steps (a failed verification above all) leaves nothing behind; a failed target
step (TVM cannot import or build the model, a missing cross compiler, an unreachable device)
keeps the verified slim.pt2, slim.onnx and the report, which records it (`result.target_failure`;
the CLI exits with status 4).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import fx, nn

from rwdeploy import report as report_mod
from rwdeploy.context import (COMPILE_TARGETS, ONNX_TARGET, CompileContext, CompileOptions, CompileResult,
                              Progress, Stage, TargetFailure, measuring, require_close)
from rwdeploy.errors import ExportError, OptionError, VerificationError
from rwdeploy.io import LoadedModel, atomic_dir
from rwdeploy.passes.layer_stats import layer_stats, totals
from rwdeploy.quant.compile_stage import stage_export_quantized, stage_tvm_quantized
from rwdeploy.quant.program import quant_extra_files
from rwdeploy.runtime.environment import environment
from rwdeploy.runtime.latency import LatencyRow
from rwdeploy.runtime.onnx_export import OnnxExportError, export_onnx
from rwdeploy.runtime.ort_runner import OrtRunner
from rwdeploy.runtime.targets import TARGETS
from rwdeploy.tvm_stages import target_stages

__all__ = ["COMPILE_TARGETS", "CompileContext", "CompileOptions", "CompileResult", "LoadedModel", "Progress",
           "Stage", "TARGET_STAGES", "compile_model", "pipeline", "probe_inputs"]

SLIM_PT2 = "slim.pt2"
ONNX_FILES = {"original": "original.onnx", "slim": "slim.onnx"}  # variant -> file


def _plain(module: nn.Module) -> nn.Module:
    """A module loaded from a `.pt2` (`ExportedProgram.module()`) refuses train()/eval(); the
    same graph over the same parameters as a plain GraphModule behaves like any module."""
    if isinstance(module, fx.GraphModule):
        return fx.GraphModule(module, module.graph)
    return module


def _accepts_other_batch(module: nn.Module, example: torch.Tensor) -> bool:
    other = torch.cat([example, example])[: example.shape[0] + 1]
    try:
        module(other)
    except Exception:  # a guard (a .pt2 exported at a static batch) or a hard-coded view
        return False
    return True


# The channel passes are imported where they run: extensions (targets, packing) can import and
# register with this module without loading the whole channel analysis.
def stage_trace(ctx: CompileContext) -> None:
    from rwdeploy.passes.trace import trace_model

    traced = trace_model(_plain(ctx.loaded.module), ctx.example_input)
    ctx.original = traced.gm
    ctx.sections["trace"] = traced.to_dict()
    if not _accepts_other_batch(ctx.original, ctx.example_input):
        # Probe and measure at the one batch size the model runs at, and say so.
        ctx.fixed_batch = int(ctx.example_input.shape[0])
        ctx.probe_inputs = probe_inputs(ctx.loaded, ctx.options, batch_size=ctx.fixed_batch)
        ctx.batches = (ctx.fixed_batch,)
        ctx.sections["trace"]["fixed_batch"] = ctx.fixed_batch


def stage_analyze(ctx: CompileContext) -> None:
    from rwdeploy.passes.channel_groups import analyze_channel_groups

    ctx.analysis = analyze_channel_groups(ctx.original, ctx.example_input)


# --align auto measures where the target's runtime runs: here, for these targets
ALIGN_MEASURED_TARGETS = (ONNX_TARGET, "cpu")
ALIGN_MIN_TIME_S = 0.5  # --align auto: seconds of interleaved whole-model calls per candidate, at most


def stage_remove_zero_channels(ctx: CompileContext) -> None:
    """`--align auto`, for the targets that run on this host (unless --no-measure): the slim model
    with align off, N = lanes / 2, N = lanes and the per-group plan, timed as whole models with the
    original on the runtime the target ships, at `--align-batch` (default: the first `--batch`; a
    model that fixes its batch size, at that one): ONNX Runtime for `onnx`
    (`runtime.align_timing.OrtModelTimer`), rwdeploy's TVM build for `cpu` (`TvmModelTimer`); the
    fastest kept (`passes.whole_model_alignment`); the per-group plan's groups timed by
    `OrtLayerTimer`. Elsewhere the per-group plan alone, decided by the cost model. The passes never
    measure by themselves."""
    from rwdeploy.passes.channel_alignment import parse_align
    from rwdeploy.passes.remove_zero_channels import remove_zero_channels
    from rwdeploy.passes.whole_model_alignment import choose_alignment
    from rwdeploy.runtime.align_timing import OrtLayerTimer, OrtModelTimer, TvmModelTimer, target_lanes

    opts = ctx.options
    auto = parse_align(opts.align) == "auto"
    masks = ctx.loaded.masks or None
    note = None
    if auto and opts.measure and opts.target in ALIGN_MEASURED_TARGETS:
        # the batch the model will run at: one it fixes, else --align-batch, else the first --batch
        batch = ctx.fixed_batch or opts.align_batch or opts.batches[0]
        model_timer = TvmModelTimer if opts.target == "cpu" else OrtModelTimer
        timer = model_timer(ctx.loaded.example_input(batch=batch, seed=opts.seed), opts.target,
                            threads=opts.threads, min_time_s=min(ALIGN_MIN_TIME_S, opts.min_time_s))
        result = choose_alignment(ctx.original, ctx.example_input, measurer=timer, lanes=target_lanes(opts.target),
                                  analysis=ctx.analysis, masks=masks,
                                  layer_measurer=OrtLayerTimer(opts.target, threads=opts.threads), batch=batch)
    else:
        if auto and not opts.measure:
            note = "--no-measure: no whole-model choice, every group decided by the cost model"
        elif auto:
            note = (f"--target {opts.target} is not measured on this host: no whole-model choice, every group "
                    "decided by the cost model")
        result = remove_zero_channels(ctx.original, ctx.example_input, analysis=ctx.analysis, masks=masks,
                                      align=opts.align, lanes=target_lanes(opts.target) if auto else 1)
    if result.record.alignment is not None and note is not None:
        result.record.alignment.note = note
    ctx.slim = result.gm
    ctx.records["remove_zero_channels"] = result.record


def stage_verify(ctx: CompileContext) -> None:
    """Slim against original on the probes. Where they differ by more than --tolerance, the
    same comparison in float64 decides: if the two agree there and their float32 difference is
    within NOISE_FACTOR times what float32 rounding alone moves either of them, the model is
    ill-conditioned in float32 at these probes, not wrongly rewritten; the report says so
    (`verification["float64"]`)."""
    from rwdeploy.passes.verify import float32_noise, float64_agreement, verify_equivalence

    opts = ctx.options
    result = verify_equivalence(ctx.original, ctx.slim, ctx.probe_inputs, rtol=opts.tolerance,
                                record=ctx.records.get("remove_zero_channels"))
    ctx.sections["verification"] = {**result.to_dict(), "probe_inputs": [list(x.shape) for x in ctx.probe_inputs],
                                    "tolerance_rel": opts.tolerance}
    if not result.passed:
        exact = float64_agreement(ctx.original, ctx.slim, ctx.probe_inputs, tolerance=opts.tolerance)
        floors = (float32_noise(ctx.original, ctx.probe_inputs), float32_noise(ctx.slim, ctx.probe_inputs))
        if exact is not None and exact.passed and None not in floors \
                and result.max_rel <= opts.tolerance_with(max(floors)):
            ctx.sections["verification"].update(passed=True, float64={
                **exact.to_dict(), "float32_noise_of_original": floors[0], "float32_noise_of_slim": floors[1],
                "note": "the model is ill-conditioned in float32 at these probes: slim and original agree in "
                        "float64, and differ in float32 by no more than float32 rounding moves each of them"})
            return
    where = result.first_diverging_node or "the output"
    require_close(result, opts.tolerance, "slim model differs from the original",
                  tail=f", first diverging at node {where!r}; nothing was written",
                  hint="this is a bug in channel removal for that layer, please report it "
                       "(or raise --tolerance if the difference is acceptable)")


def stage_pack_sparse(ctx: CompileContext) -> None:
    """Pack sparse layers as CSR/BSR where that measures faster (`--sparse`); checked on the probes."""
    from rwdeploy.passes.pack_sparse import pack_sparse
    from rwdeploy.sparse.timing import layer_timer

    opts = ctx.options  # the pass never measures: this stage gives it the target's layer timer
    if TARGETS.get(opts.target) is not None and TARGETS[opts.target].family == "gpu":
        # the packed kernels are CPU code: in a CUDA build they would run on the host over device
        # memory (measured: a segfault on an H200), so on a GPU every layer stays dense
        ctx.sections["sparse"] = {"mode": opts.sparse, "target": opts.target, "packed_layers": 0,
                                  "skipped": f"target {opts.target} has no packed (CSR/BSR) kernels: "
                                             "every layer stays dense"}
        return
    result = pack_sparse(ctx.slim, ctx.example_input, mode=opts.sparse, target=opts.target,
                         timer=layer_timer(opts.target, rpc=opts.rpc, tracker=opts.tracker, key=opts.key,
                                           threads=opts.threads))
    check = ctx.check(ctx.slim, result.gm, "packed model differs from the slim model",
                      hint="compile with --sparse off, and please report it")
    ctx.unpacked, ctx.slim = ctx.slim, result.gm
    ctx.sections["sparse"] = {**result.record.to_dict(), "max_rel_vs_slim": check.max_rel}


def stage_export_pt2(ctx: CompileContext) -> None:
    """The slim model as a `torch.export` program, batch dimension dynamic where possible (with
    the quantization spec of a quantized model, `rwdeploy.quant.program`)."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    # An example of batch 1 would specialise the batch dimension to 1; probe with 2.
    example = torch.cat([ctx.example_input, ctx.example_input])[:2]
    try:
        if ctx.fixed_batch is not None:
            raise ValueError("the model fixes its batch size")
        program = torch.export.export(ctx.slim, (example,), dynamic_shapes=({0: batch},))
        dynamic = True
    except Exception:  # a model that fixes its batch size (e.g. view(1, -1)) exports static
        try:
            program = torch.export.export(ctx.slim, (ctx.example_input,))
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ExportError(f"torch.export of the slim model failed ({type(err).__name__}: {first})",
                              hint="please report it with the model; nothing was written") from None
        dynamic = False
    # a quantized model's spec travels with it (its weights stay on the grid)
    torch.export.save(program, str(ctx.path(SLIM_PT2)),
                      extra_files=quant_extra_files(ctx.loaded.metadata.get("quantization"), program))
    ctx.files["slim_pt2"] = {"path": SLIM_PT2, "bytes": ctx.path(SLIM_PT2).stat().st_size,
                             "dynamic_batch": dynamic}


def stage_export_onnx(ctx: CompileContext) -> None:
    """Both models as ONNX with a dynamic batch; where that cannot export (a conv whose `groups`
    is the batch size, as CondConv's per-sample kernels: ONNX wants a constant), at the example
    input's batch, which the ORT check and the measurements then use, and the report says so."""
    for variant, module in ctx.variants().items():
        name = ONNX_FILES[variant]
        dynamic = ctx.fixed_batch is None and ctx.onnx_batch is None
        try:
            info = export_onnx(module, ctx.example_input, ctx.path(name), opset=ctx.options.opset,
                               dynamic_batch=dynamic)
        except OnnxExportError as err:
            if not dynamic:
                raise
            try:
                info = export_onnx(module, ctx.example_input, ctx.path(name), opset=ctx.options.opset,
                                   dynamic_batch=False)
            except OnnxExportError:
                raise err from None
            ctx.onnx_batch = int(ctx.example_input.shape[0])
            ctx.batches = (ctx.onnx_batch,)
            ctx.sections["trace"]["onnx_fixed_batch"] = {
                "batch": ctx.onnx_batch, "why": f"a dynamic batch does not export: {err.message.split('  [Caused by')[0]}"}
        ctx.files[f"{variant}_onnx"] = {"path": name, "bytes": info.size_bytes, "opset": info.opset,
                                        "ir_version": info.ir_version, "dynamic_batch": info.dynamic_batch}


def stage_ort_check(ctx: CompileContext) -> None:
    """ONNX Runtime's output of each exported file against its torch module, on every probe."""
    section: dict[str, object] = {"runtime": "onnxruntime", "tolerance_rel": ctx.options.tolerance}
    for variant, module in ctx.variants().items():
        name = ONNX_FILES[variant]
        runner = OrtRunner(ctx.path(name), threads=ctx.options.threads)
        check = ctx.check(module, _ort_call(runner, ctx.onnx_batch),
                          f"ONNX Runtime output of {name} differs from the {variant} torch model",
                          hint="an exporter or runtime problem; please report it with the model")
        section[variant] = check.to_dict()
        if check.tolerance > ctx.options.tolerance:  # passed at the model's float32 noise floor
            section[variant]["tolerance_rel"] = check.tolerance
    ctx.sections.setdefault("verification", {})["onnxruntime"] = section


def _ort_call(runner: OrtRunner, fixed_batch: int | None) -> Callable[[torch.Tensor], np.ndarray]:
    """ONNX Runtime on a torch batch; a file that fixes its batch runs it in slices of that size."""
    if fixed_batch is None:
        return lambda x: runner.run(x.numpy())
    return lambda x: np.concatenate([runner.run(part.numpy()) for part in x.split(fixed_batch)])


def stage_measure_ort(ctx: CompileContext) -> None:
    """Original, slim (and quantized) in ONNX Runtime; they alternate call by call, so that a
    shared machine's changing load cannot decide which one looks faster."""
    opts = ctx.options
    files = {variant: ctx.files[f"{variant}_onnx"]["path"] for variant in ("original", "slim")}
    if "slim_qdq_onnx" in ctx.files:
        files["quantized"] = ctx.files["slim_qdq_onnx"]["path"]
    runners = {variant: OrtRunner(ctx.path(name), threads=opts.threads) for variant, name in files.items()}
    for batch in ctx.batches:
        x = ctx.loaded.example_input(batch=batch, seed=opts.seed).numpy()
        stats = opts.time({v: r.bind(x) for v, r in runners.items()})
        ctx.latency.extend(LatencyRow("onnxruntime", opts.target, variant, batch, opts.threads, st,
                                      provider="CPUExecutionProvider") for variant, st in stats.items())


def stage_report(ctx: CompileContext) -> None:
    opts, loaded = ctx.options, ctx.loaded
    before = layer_stats(ctx.original, ctx.example_input)
    slim = ctx.dense_slim  # packed layers hold no weight
    after = layer_stats(slim, ctx.example_input)
    t_before, t_after = totals(ctx.original, before), totals(slim, after)
    ctx.sections["model"] = {
        "source": loaded.source, "path": str(loaded.path) if loaded.path else None, "arch": loaded.arch,
        "input_shape": list(loaded.input_shape), "masks": len(loaded.masks),
        "params": {"original": t_before.params, "slim": t_after.params},
        "macs": {"original": t_before.macs, "slim": t_after.macs},
    }
    ctx.sections["layers"] = report_mod.layer_rows(before, after)
    record = ctx.records.get("remove_zero_channels")
    ctx.sections["channels"] = report_mod.channels_section(ctx.analysis, record)
    if record is not None and record.alignment is not None:
        ctx.sections["alignment"] = record.alignment.to_dict()
    if loaded.path is not None:
        ctx.files["model_file"] = {"path": str(loaded.path), "bytes": loaded.path.stat().st_size,
                                   "external": True}
    ctx.sections["files"] = ctx.files
    if ctx.latency:
        ctx.sections["latency"] = [row.to_dict() for row in ctx.latency]
        choice = report_mod.fastest_runtimes(ctx.sections["latency"])
        if choice:  # where TVM loses to ONNX Runtime, the report names the faster one
            ctx.sections["runtime_choice"] = choice
    if ctx.target_failure is not None:
        ctx.sections["target_failure"] = ctx.target_failure.to_dict()
    ctx.sections["compile"] = {
        "target": opts.target, "tolerance_rel": opts.tolerance, "batches": list(ctx.batches),
        "threads": opts.threads, "runs": opts.runs, "warmup": opts.warmup, "measured": opts.measure,
        "stage_seconds": dict(ctx.stage_seconds),
    }
    ctx.sections["environment"] = {**environment(), "loadavg": list(os.getloadavg())}
    document = report_mod.make_report(ctx.sections)
    report_mod.write_report(document, ctx.workdir)
    ctx.sections = document


def _packing(options: CompileOptions) -> bool:
    """`--sparse auto` packs where TVM's sparse kernels measure faster than its dense ones; with
    `--target onnx` there are none (ONNX Runtime runs packed layers dense), so only a forced
    `--sparse csr|bsr` packs there (compact weights in slim.onnx)."""
    return options.sparse != "off" and not (options.sparse == "auto" and options.target == ONNX_TARGET)


# Model transformation and the runtime-independent artifacts, in order.
SLIM_STAGES: tuple[Stage, ...] = (
    Stage("trace", "Trace to torch.fx", stage_trace),
    Stage("analyze", "Analyze channel groups", stage_analyze),
    Stage("remove_zero_channels", "Remove zero channels", stage_remove_zero_channels),
    Stage("verify", "Verify against the original", stage_verify),
    Stage("pack_sparse", "Pack sparse layers (CSR/BSR where faster)", stage_pack_sparse, _packing),
    Stage("export_pt2", "Export slim .pt2", stage_export_pt2),
    Stage("export_onnx", "Export ONNX (original, slim)", stage_export_onnx),
    Stage("ort_check", "Check ONNX Runtime output", stage_ort_check),
    # runs for checkpoints quantized by `rwdeploy prune --quantize` alone (QUANTIZED_STAGES)
    Stage("export_quantized", "Export quantized weights (QDQ ONNX)", stage_export_quantized),
    Stage("measure_ort", "Measure ONNX Runtime latency", stage_measure_ort, measuring),
)

# Per target: the stages it adds after the common ones. Every entry of the target registry
# (runtime/targets.py) gets TVM build, then measurement where the target runs (rwdeploy.tvm_stages);
# `onnx` adds none.
TARGET_STAGES: dict[str, tuple[Stage, ...]] = {ONNX_TARGET: (), **{name: target_stages(name) for name in TARGETS}}

# After a TVM target's stages: a quantized checkpoint's integer-weight TVM builds.
QUANTIZED_TVM_STAGES: tuple[Stage, ...] = (
    Stage("tvm_quantized", "Build quantized TVM modules", stage_tvm_quantized, target_step=True),
)
QUANTIZED_STAGES = frozenset({"export_quantized", "tvm_quantized"})

REPORT_STAGES: tuple[Stage, ...] = (Stage("report", "Write report", stage_report),)


def pipeline(options: CompileOptions, quantized: bool = False) -> list[Stage]:
    """The stages `options` runs, in order; `QUANTIZED_STAGES` only for a `quantized` checkpoint."""
    tvm_quantized = QUANTIZED_TVM_STAGES if options.target in TARGETS else ()
    stages = (*SLIM_STAGES, *TARGET_STAGES[options.target], *tvm_quantized, *REPORT_STAGES)
    return [s for s in stages if s.when(options) and (quantized or s.name not in QUANTIZED_STAGES)]


def probe_inputs(loaded: LoadedModel, options: CompileOptions, batch_size: int | None = None) -> list[torch.Tensor]:
    """The example input, then random batches at several scales (seeded: reproducible)."""
    probes = [loaded.example_input(seed=options.seed)]
    for i in range(options.probe_batches):
        x = loaded.example_input(batch=batch_size or options.probe_batch_size, seed=options.seed + 1 + i)
        probes.append(x * (1.0 + 2.0 * i))  # scales 1, 3, 5: reach past the example's range
    return probes


def compile_model(loaded: LoadedModel, options: CompileOptions, progress: Progress | None = None) -> CompileResult:
    """Run the pipeline for `loaded`; `options.out` then holds the artifacts and reports (the
    verified ones and the report only, when a target step failed: see `result.target_failure`)."""
    options.validate()
    progress = progress or (lambda *event: None)
    _check_out(Path(options.out))
    stages = pipeline(options, quantized=bool(loaded.metadata.get("quantization")))
    torch.manual_seed(options.seed)
    np.random.seed(options.seed)
    with atomic_dir(options.out) as workdir:
        ctx = CompileContext(loaded, options, Path(workdir), loaded.example_input(seed=options.seed),
                             probe_inputs(loaded, options), batches=tuple(options.batches))
        verified_files: set[str] | None = None  # the files before the first target step
        for index, stage in enumerate(stages):
            if stage.target_step and ctx.target_failure is not None:
                continue  # a later target step builds on the one that failed
            progress(stage, index, len(stages), "start")
            files_before = set(ctx.files)
            if stage.target_step and verified_files is None:
                verified_files = files_before
            t0 = time.perf_counter()
            try:
                with torch.no_grad():
                    stage.run(ctx)
            except Exception as err:  # noqa: BLE001 - any target failure keeps the verified model
                if not stage.target_step:
                    raise
                # A wrong output (VerificationError) discards every target file; other failures
                # only the failing step's own (e.g. the .so files stay when the device is down).
                _drop_files(ctx, set(ctx.files) - (verified_files if isinstance(err, VerificationError) else files_before))
                ctx.target_failure = TargetFailure.from_error(stage, options.target, err)
            ctx.stage_seconds[stage.name] = time.perf_counter() - t0
            failed = ctx.target_failure is not None and ctx.target_failure.stage == stage.name
            progress(stage, index, len(stages), "failed" if failed else "done")
    return CompileResult(Path(options.out), ctx.sections, ctx.target_failure)


def _drop_files(ctx: CompileContext, roles: set[str]) -> None:
    """Remove the files of a failed target step from the output (and their report entries)."""
    for role in sorted(roles):
        ctx.path(ctx.files.pop(role)["path"]).unlink(missing_ok=True)


def _check_out(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier rwdeploy output (it would be lost)."""
    if out.exists() and out.is_dir() and any(out.iterdir()) and not (out / report_mod.REPORT_JSON).exists():
        raise OptionError(f"--out {out} is a non-empty folder that rwdeploy did not write",
                          hint="choose a new folder; rwdeploy replaces only its own earlier output")
