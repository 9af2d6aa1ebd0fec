"""The compile pipeline: a loaded model in, one folder of verified, measured artifacts out.

The pipeline is a list of stages run in order over one `CompileContext`:

    trace -> analyze -> remove zero channels -> verify -> export .pt2 -> export ONNX
          -> ONNX Runtime check -> measure latency -> [target stages] -> report

Each stage is a plain function `stage(ctx) -> None` that reads what earlier stages left in the
context and adds its own results. Extending the pipeline is one entry:

* a model-transforming stage (e.g. sparse packing) goes into `SLIM_STAGES` after
  `remove_zero_channels`, with a `when=` predicate on the options;
* a target adds its build/measure stages as one `TARGET_STAGES[name]` entry; the CLI's
  `--target` choices are that registry's keys.

Everything is written into a temporary folder that is renamed to `options.out` only when
every stage succeeded; any error (a failed verification above all) leaves nothing behind.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
from torch import fx, nn

from rwdeploy import report as report_mod
from rwdeploy.errors import ExportError, OptionError, VerificationError
from rwdeploy.io import LoadedModel, atomic_dir
from rwdeploy.passes.layer_stats import layer_stats, totals
from rwdeploy.quant.compile_stage import stage_export_quantized
from rwdeploy.runtime.environment import environment
from rwdeploy.runtime.latency import time_interleaved
from rwdeploy.runtime.onnx_export import export_onnx
from rwdeploy.runtime.ort_runner import OrtRunner
from rwdeploy.runtime.targets import TARGETS
from rwdeploy.tvm_stages import target_stages, validate_tvm_options

SLIM_PT2 = "slim.pt2"
SLIM_ONNX = "slim.onnx"
ORIGINAL_ONNX = "original.onnx"


@dataclass
class CompileOptions:
    out: Path
    target: str = "cpu"
    tolerance: float = 1e-4  # max relative error of slim vs original (and ORT vs torch)
    batches: tuple[int, ...] = (1, 8)
    threads: int = 1  # one intra-op thread: the most repeatable latency on a shared machine
    runs: int = 50  # timed runs at least (and at least `min_time_s` of them)
    warmup: int = 10
    min_time_s: float = 0.5
    measure: bool = True
    probe_batches: int = 3  # random probe batches besides the example input
    probe_batch_size: int = 4
    seed: int = 0
    opset: int = 17
    sparse: str = "auto"  # pack sparse layers as CSR/BSR: auto (where measured faster) | off | csr | bsr
    gpu_arch: str | None = None  # --target gpu: sm_XY (default: the visible GPU's, else sm_90)
    tune: int = 0  # MetaSchedule trials for the TVM cpu/arm build (0: hand schedules only)
    tuning_db: Path | None = None  # MetaSchedule records, reused across runs
    # arm targets: the device to measure on over TVM RPC; neither = the emulated aarch64 device
    rpc: str | None = None  # HOST:PORT
    tracker: str | None = None  # HOST:PORT, with key
    key: str | None = None

    def validate(self) -> None:
        if not self.tolerance >= 0:
            raise OptionError(f"--tolerance {self.tolerance} must be >= 0", hint="e.g. --tolerance 1e-4")
        if not self.batches or any(b < 1 for b in self.batches):
            raise OptionError(f"--batch {','.join(map(str, self.batches))} must list positive sizes",
                              hint="e.g. --batch 1,8")
        if self.threads < 1:
            raise OptionError(f"--threads {self.threads} must be >= 1")
        if self.runs < 1 or self.warmup < 0:
            raise OptionError(f"--runs {self.runs} / --warmup {self.warmup}: need runs >= 1, warmup >= 0")
        from rwdeploy.passes.pack_sparse import MODES as SPARSE_MODES

        if self.sparse not in SPARSE_MODES:
            raise OptionError(f"unknown --sparse {self.sparse!r}", hint=f"use one of {', '.join(SPARSE_MODES)}")
        if self.target not in TARGET_STAGES:
            raise OptionError(f"unknown --target {self.target!r}",
                              hint=f"known targets: {', '.join(sorted(TARGET_STAGES))}")
        self._validate_device()
        validate_tvm_options(self)

    def _validate_device(self) -> None:
        from rwdeploy.runtime.rpc import parse_address
        from rwdeploy.runtime.targets import TARGETS as REGISTRY

        if (self.rpc or self.tracker or self.key) and REGISTRY[self.target].family != "arm":
            raise OptionError(f"--rpc/--tracker/--key measure on a device; --target {self.target} runs here",
                              hint="use them with an arm target (arm, rpi4, rpi5, graviton2, android-arm64)")
        if self.rpc and self.tracker:
            raise OptionError("give either --rpc HOST:PORT or --tracker HOST:PORT --key KEY, not both")
        if self.tracker and not self.key:
            raise OptionError("--tracker needs --key KEY (the device key its server registered with)")
        for option, value in (("--rpc", self.rpc), ("--tracker", self.tracker)):
            if value:
                parse_address(value, option)


@dataclass
class CompileContext:
    """What the stages share. Each stage fills in its own fields."""

    loaded: LoadedModel
    options: CompileOptions
    workdir: Path
    example_input: torch.Tensor
    probe_inputs: list[torch.Tensor]
    batches: tuple[int, ...] = ()  # the batch sizes measured (options.batches unless the model fixes one)
    fixed_batch: int | None = None  # the only batch size the model accepts, if it has one
    original: nn.Module | None = None  # the traced original (a GraphModule)
    trace_method: str | None = None
    analysis: Any = None
    slim: fx.GraphModule | None = None
    unpacked: fx.GraphModule | None = None  # the slim model before sparse packing (layer stats)
    records: dict[str, Any] = field(default_factory=dict)  # pass name -> record
    sections: dict[str, Any] = field(default_factory=dict)  # report sections by name
    latency: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # filled in by compile_model
    tvm_artifacts: dict[tuple[str, int], Any] = field(default_factory=dict)  # (variant, batch) -> TvmArtifact

    def path(self, name: str) -> Path:
        return self.workdir / name


@dataclass(frozen=True)
class Stage:
    name: str
    title: str  # shown in the progress display
    run: Callable[[CompileContext], None]
    when: Callable[[CompileOptions], bool] = lambda options: True


@dataclass
class CompileResult:
    out: Path
    report: dict[str, Any]

    @property
    def files(self) -> dict[str, Path]:
        return {role: self.out / info["path"] for role, info in self.report.get("files", {}).items()
                if not info.get("external")}


class Progress(Protocol):
    def __call__(self, stage: Stage, index: int, total: int, state: str) -> None:
        """`state` is "start" or "done"."""


# ---------------------------------------------------------------------------------------------
# Stages


def max_errors(reference: torch.Tensor, output: torch.Tensor) -> tuple[float, float]:
    """Max absolute error, and that relative to the reference's largest magnitude.

    Relative to the output scale (not element-wise), so near-zero logits do not blow it up.
    """
    ref = reference.detach().double()
    diff = (ref - output.detach().double()).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return float(diff), float(diff / scale) if scale > 0 else float(diff)


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
    ctx.original, ctx.trace_method = traced.gm, traced.method
    ctx.sections["trace"] = traced.to_dict() if hasattr(traced, "to_dict") else {"method": traced.method}
    if not _accepts_other_batch(ctx.original, ctx.example_input):
        # Probe and measure at the one batch size the model runs at, and say so.
        ctx.fixed_batch = int(ctx.example_input.shape[0])
        ctx.probe_inputs = probe_inputs(ctx.loaded, ctx.options, batch_size=ctx.fixed_batch)
        ctx.batches = (ctx.fixed_batch,)
        ctx.sections["trace"]["fixed_batch"] = ctx.fixed_batch


def stage_analyze(ctx: CompileContext) -> None:
    from rwdeploy.passes.channel_groups import analyze_channel_groups

    ctx.analysis = analyze_channel_groups(ctx.original, ctx.example_input)


def stage_remove_zero_channels(ctx: CompileContext) -> None:
    from rwdeploy.passes.remove_zero_channels import remove_zero_channels

    result = remove_zero_channels(ctx.original, ctx.example_input, analysis=ctx.analysis,
                                  masks=ctx.loaded.masks or None)
    ctx.slim = result.gm
    ctx.records["remove_zero_channels"] = result.record


def stage_verify(ctx: CompileContext) -> None:
    from rwdeploy.passes.verify import verify_equivalence

    opts = ctx.options
    result = verify_equivalence(ctx.original, ctx.slim, ctx.probe_inputs, rtol=opts.tolerance,
                                record=ctx.records.get("remove_zero_channels"))
    section = {
        "probe_inputs": [list(x.shape) for x in ctx.probe_inputs],
        "tolerance_rel": opts.tolerance,
        "max_abs": float(result.max_abs),
        "max_rel": float(result.max_rel),
        "passed": bool(result.passed),
        "first_diverging_node": result.first_diverging_node,
    }
    ctx.sections["verification"] = section
    if not result.passed:
        where = result.first_diverging_node or "the output"
        raise VerificationError(
            f"slim model differs from the original: max relative error {result.max_rel:.3g} > "
            f"tolerance {opts.tolerance:g}, first diverging at node {where!r}; nothing was written",
            hint="this is a bug in channel removal for that layer, please report it "
                 "(or raise --tolerance if the difference is acceptable)",
        )


def stage_pack_sparse(ctx: CompileContext) -> None:
    """Pack sparse layers as CSR/BSR where that measures faster (`--sparse`); checked on the probes."""
    from rwdeploy.passes.pack_sparse import pack_sparse
    from rwdeploy.sparse.timing import HostLayerTimer

    opts = ctx.options  # the pass never measures: this stage gives it the target's layer timer
    result = pack_sparse(ctx.slim, ctx.example_input, mode=opts.sparse, target=opts.target,
                         timer=HostLayerTimer(opts.target))
    worst = 0.0
    for x in ctx.probe_inputs:
        worst = max(worst, max_errors(ctx.slim(x), result.gm(x))[1])
    if worst > opts.tolerance:
        raise VerificationError(f"packed model differs from the slim model: max relative error {worst:.3g} "
                                f"> tolerance {opts.tolerance:g}; nothing was written",
                                hint="compile with --sparse off, and please report it")
    ctx.unpacked, ctx.slim = ctx.slim, result.gm
    ctx.records["pack_sparse"] = result.record
    ctx.sections["sparse"] = {**result.record.to_dict(), "max_rel_vs_slim": worst}


def stage_export_pt2(ctx: CompileContext) -> None:
    """The slim model as a `torch.export` program, batch dimension dynamic where possible."""
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
    torch.export.save(program, str(ctx.path(SLIM_PT2)))
    ctx.files["slim_pt2"] = {"path": SLIM_PT2, "bytes": ctx.path(SLIM_PT2).stat().st_size,
                             "dynamic_batch": dynamic}


def stage_export_onnx(ctx: CompileContext) -> None:
    for role, module, name in (("original_onnx", ctx.original, ORIGINAL_ONNX), ("slim_onnx", ctx.slim, SLIM_ONNX)):
        info = export_onnx(module, ctx.example_input, ctx.path(name), opset=ctx.options.opset,
                           dynamic_batch=ctx.fixed_batch is None)
        ctx.files[role] = {"path": name, "bytes": info.size_bytes, "opset": info.opset,
                           "ir_version": info.ir_version, "dynamic_batch": info.dynamic_batch}


def stage_ort_check(ctx: CompileContext) -> None:
    """ONNX Runtime's output of each exported file against its torch module, on every probe."""
    section: dict[str, Any] = {"runtime": "onnxruntime", "tolerance_rel": ctx.options.tolerance}
    for variant, module, name in (("original", ctx.original, ORIGINAL_ONNX), ("slim", ctx.slim, SLIM_ONNX)):
        runner = OrtRunner(ctx.path(name), threads=ctx.options.threads)
        worst_abs = worst_rel = 0.0
        with torch.no_grad():
            for x in ctx.probe_inputs:
                got = torch.from_numpy(runner.run(x.numpy()))
                abs_err, rel_err = max_errors(module(x), got)
                worst_abs, worst_rel = max(worst_abs, abs_err), max(worst_rel, rel_err)
        section[variant] = {"max_abs": worst_abs, "max_rel": worst_rel}
        if worst_rel > ctx.options.tolerance:
            raise VerificationError(
                f"ONNX Runtime output of {name} differs from the {variant} torch model: max relative "
                f"error {worst_rel:.3g} > tolerance {ctx.options.tolerance:g}; nothing was written",
                hint="an exporter or runtime problem; please report it with the model",
            )
    ctx.sections.setdefault("verification", {})["onnxruntime"] = section


def stage_measure_ort(ctx: CompileContext) -> None:
    """Original vs slim in ONNX Runtime; the two alternate call by call, so that a shared
    machine's changing load cannot decide which one looks faster."""
    opts = ctx.options
    runners = {variant: OrtRunner(ctx.path(name), threads=opts.threads)
               for variant, name in (("original", ORIGINAL_ONNX), ("slim", SLIM_ONNX))}
    for batch in ctx.batches:
        x = ctx.loaded.example_input(batch=batch, seed=opts.seed).numpy()
        stats = time_interleaved({v: r.bind(x) for v, r in runners.items()}, warmup=opts.warmup,
                                 min_runs=opts.runs, max_runs=max(opts.runs, 1000),
                                 min_time_s=opts.min_time_s)
        for variant, st in stats.items():
            ctx.latency.append({
                "runtime": "onnxruntime", "target": opts.target, "variant": variant, "batch": batch,
                "median_ms": st.median_ms, "p90_ms": st.p90_ms, "n": st.n, "warmup": st.warmup,
                "threads": opts.threads, "emulated": False, "provider": "CPUExecutionProvider",
                "interleaved": True,
            })


def stage_report(ctx: CompileContext) -> None:
    opts, loaded = ctx.options, ctx.loaded
    before = layer_stats(ctx.original, ctx.example_input)
    slim = ctx.unpacked if ctx.unpacked is not None else ctx.slim  # packed layers hold no weight
    after = layer_stats(slim, ctx.example_input)
    t_before, t_after = totals(ctx.original, before), totals(slim, after)
    ctx.sections["model"] = {
        "source": loaded.source,
        "path": str(loaded.path) if loaded.path else None,
        "arch": loaded.arch,
        "input_shape": list(loaded.input_shape),
        "masks": len(loaded.masks),
        "params": {"original": t_before.params, "slim": t_after.params},
        "macs": {"original": t_before.macs, "slim": t_after.macs},
    }
    ctx.sections["layers"] = report_mod.layer_rows(before, after)
    record = ctx.records.get("remove_zero_channels")
    ctx.sections["channels"] = report_mod.channels_section(ctx.analysis, record)
    if loaded.path is not None:
        ctx.files["model_file"] = {"path": str(loaded.path), "bytes": loaded.path.stat().st_size,
                                   "external": True}
    ctx.sections["files"] = ctx.files
    if ctx.latency:
        ctx.sections["latency"] = ctx.latency
    ctx.sections["compile"] = {
        "target": opts.target,
        "tolerance_rel": opts.tolerance,
        "batches": list(ctx.batches),
        "threads": opts.threads,
        "runs": opts.runs,
        "warmup": opts.warmup,
        "measured": opts.measure,
        "stage_seconds": dict(ctx.stage_seconds),
    }
    ctx.sections["environment"] = {**environment(), "loadavg": list(os.getloadavg())}
    document = report_mod.make_report(ctx.sections)
    report_mod.write_report(document, ctx.workdir)
    ctx.sections = document


def _measuring(options: CompileOptions) -> bool:
    return options.measure


# Model transformation and the runtime-independent artifacts, in order.
SLIM_STAGES: tuple[Stage, ...] = (
    Stage("trace", "Trace to torch.fx", stage_trace),
    Stage("analyze", "Analyze channel groups", stage_analyze),
    Stage("remove_zero_channels", "Remove zero channels", stage_remove_zero_channels),
    Stage("verify", "Verify against the original", stage_verify),
    Stage("pack_sparse", "Pack sparse layers (CSR/BSR where faster)", stage_pack_sparse,
          lambda options: options.sparse != "off"),
    Stage("export_pt2", "Export slim .pt2", stage_export_pt2),
    Stage("export_onnx", "Export ONNX (original, slim)", stage_export_onnx),
    Stage("ort_check", "Check ONNX Runtime output", stage_ort_check),
    # does nothing unless the checkpoint was quantized by `rwdeploy prune --quantize`
    Stage("export_quantized", "Export quantized weights (QDQ ONNX, TVM)", stage_export_quantized),
    Stage("measure_ort", "Measure ONNX Runtime latency", stage_measure_ort, _measuring),
)

# Per target: the stages it adds after the common ones (TVM build + measure for arm/gpu, ...).
# Every entry of the target registry (runtime/targets.py): TVM build, then measurement where the
# target runs (in this process for cpu/gpu, on a device for arm: rwdeploy.tvm_stages.DEVICE_STAGES).
TARGET_STAGES: dict[str, tuple[Stage, ...]] = {name: target_stages(name, Stage) for name in TARGETS}

REPORT_STAGES: tuple[Stage, ...] = (Stage("report", "Write report", stage_report),)


def pipeline(options: CompileOptions) -> list[Stage]:
    """The stages `options` runs, in order."""
    stages = (*SLIM_STAGES, *TARGET_STAGES[options.target], *REPORT_STAGES)
    return [s for s in stages if s.when(options)]


def probe_inputs(loaded: LoadedModel, options: CompileOptions, batch_size: int | None = None) -> list[torch.Tensor]:
    """The example input, then random batches at several scales (seeded: reproducible)."""
    probes = [loaded.example_input(seed=options.seed)]
    for i in range(options.probe_batches):
        x = loaded.example_input(batch=batch_size or options.probe_batch_size, seed=options.seed + 1 + i)
        probes.append(x * (1.0 + 2.0 * i))  # scales 1, 3, 5: reach past the example's range
    return probes


def compile_model(loaded: LoadedModel, options: CompileOptions, progress: Progress | None = None) -> CompileResult:
    """Run the pipeline for `loaded`; on success `options.out` holds the artifacts and reports."""
    options.validate()
    _check_out(Path(options.out))
    stages = pipeline(options)
    torch.manual_seed(options.seed)
    np.random.seed(options.seed)
    with atomic_dir(options.out) as workdir:
        ctx = CompileContext(loaded, options, Path(workdir), loaded.example_input(seed=options.seed),
                             probe_inputs(loaded, options), batches=tuple(options.batches))
        for index, stage in enumerate(stages):
            if progress:
                progress(stage, index, len(stages), "start")
            t0 = time.perf_counter()
            with torch.no_grad():
                stage.run(ctx)
            ctx.stage_seconds[stage.name] = time.perf_counter() - t0
            if progress:
                progress(stage, index, len(stages), "done")
    return CompileResult(Path(options.out), ctx.sections)


def _check_out(out: Path) -> None:
    """Refuse to replace a folder that is not an earlier rwdeploy output (it would be lost)."""
    if out.exists() and out.is_dir() and any(out.iterdir()) and not (out / report_mod.REPORT_JSON).exists():
        raise OptionError(f"--out {out} is a non-empty folder that rwdeploy did not write",
                          hint="choose a new folder; rwdeploy replaces only its own earlier output")
