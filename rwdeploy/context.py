"""The compile pipeline's types: its options, the context its stages share, a stage, a result.

Every stage module (`rwdeploy.compile`, `rwdeploy.tvm_stages`, `rwdeploy.quant.compile_stage`)
imports these from here, and `rwdeploy.compile` assembles the stages into the pipeline; nothing
here imports a stage, so the stage modules never need each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import fx, nn

from rwdeploy.errors import OptionError, RwdeployError, TvmImportError, VerificationError, last_line
from rwdeploy.io import LoadedModel
from rwdeploy.passes.channel_alignment import parse_align
from rwdeploy.passes.pack_sparse import MODES as SPARSE_MODES
from rwdeploy.passes.verify import NOISE_FACTOR, Closeness, compare_on
from rwdeploy.runtime.latency import LatencyRow, LatencyStats, time_interleaved
from rwdeploy.runtime.rpc import parse_address
from rwdeploy.runtime.targets import TARGETS, Target, get_target
from rwdeploy.runtime.tvm_build import TvmArtifact, check_tuning_options

if TYPE_CHECKING:
    import onnx

    from rwdeploy.passes.channel_groups import ChannelAnalysis
    from rwdeploy.quant.qat import QuantSpec

# `--target onnx`: the slim model, verified, as .pt2 and ONNX (checked in ONNX Runtime); no TVM.
ONNX_TARGET = "onnx"
COMPILE_TARGETS = (ONNX_TARGET, *TARGETS)


@dataclass
class CompileOptions:
    out: Path
    target: str = "cpu"  # a TVM registry target (runtime/targets.py), or "onnx"
    tolerance: float = 1e-4  # max relative error of every output check (verify.compare)
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
    # keep removable zero channels for aligned counts: off | auto (whole-model candidates timed) | N (multiples of N)
    align: str = "off"
    # --align auto times its whole-model candidates at this batch size (None: the first of `batches`):
    # the fastest channel counts at one batch size need not be the fastest at another
    align_batch: int | None = None
    gpu_arch: str | None = None  # --target gpu: sm_XY (default: the visible GPU's, else sm_90)
    tune: int = 0  # MetaSchedule trials for the TVM cpu/arm build (0: hand schedules only)
    tuning_db: Path | None = None  # MetaSchedule records, reused across runs
    # arm targets: the device to measure on over TVM RPC; neither = the emulated aarch64 device
    rpc: str | None = None  # HOST:PORT
    tracker: str | None = None  # HOST:PORT, with key
    key: str | None = None

    def tolerance_with(self, float32_noise: float) -> float:
        """--tolerance, or the model's float32 noise floor (times NOISE_FACTOR) where larger."""
        return max(self.tolerance, NOISE_FACTOR * float32_noise)

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
        align = parse_align(self.align)
        if self.align_batch is not None and self.align_batch < 1:
            raise OptionError(f"--align-batch {self.align_batch} must be a positive batch size",
                              hint="e.g. --align-batch 8 (the batch size you deploy at)")
        if self.align_batch is not None and align != "auto":
            raise OptionError(f"--align-batch times --align auto's candidates; --align {self.align} measures nothing",
                              hint="use --align auto --align-batch N, or drop --align-batch")
        if self.sparse not in SPARSE_MODES:
            raise OptionError(f"unknown --sparse {self.sparse!r}", hint=f"use one of {', '.join(SPARSE_MODES)}")
        if self.target not in COMPILE_TARGETS:
            raise OptionError(f"unknown --target {self.target!r}",
                              hint=f"known targets: {', '.join(sorted(COMPILE_TARGETS))}")
        if self.sparse in ("csr", "bsr") and self.target in TARGETS and TARGETS[self.target].family == "gpu":
            raise OptionError(f"--sparse {self.sparse} with --target {self.target}: the packed kernels "
                              "are CPU kernels, a GPU build has none",
                              hint="use --sparse auto|off (layers stay dense on the GPU), or --target "
                                   "onnx for the compact CSR/BSR weights")
        self._validate_device()
        self._validate_tvm()

    def _validate_device(self) -> None:
        arm = self.target in TARGETS and TARGETS[self.target].family == "arm"
        if (self.rpc or self.tracker or self.key) and not arm:
            raise OptionError(f"--rpc/--tracker/--key measure on a device; --target {self.target} runs here",
                              hint="use them with an arm target (arm, rpi4, rpi5, graviton2, android-arm64)")
        if self.rpc and self.tracker:
            raise OptionError("give either --rpc HOST:PORT or --tracker HOST:PORT --key KEY, not both")
        if self.tracker and not self.key:
            raise OptionError("--tracker needs --key KEY (the device key its server registered with)")
        for option, value in (("--rpc", self.rpc), ("--tracker", self.tracker)):
            if value:
                parse_address(value, option)

    def _validate_tvm(self) -> None:
        """--gpu-arch/--tune/--tuning-db against --target, before any slow stage runs."""
        if self.target == ONNX_TARGET:
            if self.gpu_arch or self.tune or self.tuning_db:
                raise OptionError("--gpu-arch/--tune/--tuning-db configure a TVM build; --target onnx builds none")
            return
        try:
            target = self.tvm_target()
        except ImportError:  # no usable TVM: the build stage reports it as a failed target step
            return
        check_tuning_options(target, self.tune, self.tuning_db)

    def tvm_target(self) -> Target:
        return get_target(self.target, gpu_arch=self.gpu_arch, threads=self.threads, rpc=self.rpc)

    def time(self, calls: dict[str, Callable[[], Any]]) -> dict[str, LatencyStats]:
        """Time `calls` in alternation (`runtime.latency.time_interleaved`) as the options say."""
        return time_interleaved(calls, warmup=self.warmup, min_runs=self.runs, max_runs=max(self.runs, 1000),
                                min_time_s=self.min_time_s)


@dataclass(frozen=True)
class QuantizedSlim:
    """A checkpoint quantized by `rwdeploy prune --quantize`: its spec and the slim model's float
    ONNX graph, from which the QDQ ONNX and the quantized TVM builds are made."""

    spec: QuantSpec
    float_onnx: onnx.ModelProto


@dataclass(frozen=True)
class TargetFailure:
    """A target step (TVM build, device measurement) that failed after the slim model was verified
    and written: which step, on which op/node when known, and what to do."""

    stage: str
    title: str
    target: str
    error: str
    hint: str
    node: str | None = None
    cause: BaseException | None = field(default=None, compare=False, repr=False)  # for --debug

    @classmethod
    def from_error(cls, stage: Stage, target: str, err: BaseException) -> TargetFailure:
        if isinstance(err, RwdeployError):
            error, hint = " ".join(err.message.split()), err.hint
        else:
            error, hint = f"{type(err).__name__}: {last_line(err)}", None
        node = err.node if isinstance(err, TvmImportError) else None
        return cls(stage.name, stage.title, target, error,
                   hint or "compile with --target onnx to skip TVM, and please report it (with --debug)", node, err)

    def one_line(self) -> str:
        return (f"target step {self.stage!r} ({self.title}) failed for --target {self.target}: {self.error}; "
                f"{self.hint}. The verified slim model was written (slim.pt2, slim.onnx, report)")

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "title": self.title, "target": self.target, "error": self.error,
                "node": self.node, "hint": self.hint, "summary": self.one_line()}


@dataclass
class CompileContext:
    """What the stages share. Each stage fills in its own fields (the comment names the stage)."""

    loaded: LoadedModel
    options: CompileOptions
    workdir: Path
    example_input: torch.Tensor
    probe_inputs: list[torch.Tensor]
    batches: tuple[int, ...] = ()  # the batch sizes measured (options.batches unless the model fixes one)
    fixed_batch: int | None = None  # trace: the only batch size the model accepts, if it has one
    onnx_batch: int | None = None  # export_onnx: the batch the ONNX files fix when a dynamic one cannot export
    original: nn.Module | None = None  # trace: the traced original (a GraphModule)
    analysis: ChannelAnalysis | None = None  # analyze
    slim: nn.Module | None = None  # remove_zero_channels; pack_sparse replaces it by the packed model
    unpacked: fx.GraphModule | None = None  # pack_sparse: the slim model before packing
    quantized: QuantizedSlim | None = None  # export_quantized, for quantized checkpoints
    records: dict[str, Any] = field(default_factory=dict)  # pass name -> the pass's record
    sections: dict[str, Any] = field(default_factory=dict)  # report sections by name
    latency: list[LatencyRow] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # role -> {path, bytes, ...}
    stage_seconds: dict[str, float] = field(default_factory=dict)  # compile_model
    tvm_artifacts: dict[tuple[str, int], TvmArtifact] = field(default_factory=dict)  # tvm_build: (variant, batch)
    target_failure: TargetFailure | None = None  # compile_model, when a target step failed

    def path(self, name: str) -> Path:
        return self.workdir / name

    def variants(self) -> dict[str, nn.Module]:
        """The models every runtime compares: the original and the slim (maybe packed) one."""
        assert self.original is not None and self.slim is not None, "runs after remove_zero_channels"
        return {"original": self.original, "slim": self.slim}

    def check(self, reference: Callable[[Any], Any], candidate: Callable[[Any], Any], what: str,
              hint: str) -> Closeness:
        """`candidate` against `reference` on the probe inputs, to --tolerance (else `require_close`'s
        error); to the model's float32 noise floor where that is larger (`float32_noise`)."""
        check = compare_on(reference, candidate, self.probe_inputs, tolerance=self.options.tolerance)
        if not check.passed and check.mismatch is None:
            floor = self.float32_noise()
            if floor is not None and check.max_rel <= self.options.tolerance_with(floor):
                return replace(check, tolerance=self.options.tolerance_with(floor))
        require_close(check, self.options.tolerance, what, hint)
        return check

    def float32_noise(self) -> float | None:
        """How far float32 rounding alone moves the model on the probes: the larger of what it
        moves the original and the slim model by, each against its own float64 evaluation (two
        float32 evaluations of one function; computed once, when a check first needs it, and
        kept in the report's `verification` section)."""
        if "float32_noise" not in self.sections.setdefault("verification", {}):
            from rwdeploy.passes.verify import float32_noise

            floors = [float32_noise(m, self.probe_inputs) for m in (self.original, self.dense_slim)]
            self.sections["verification"]["float32_noise"] = None if None in floors else max(floors)
        return self.sections["verification"]["float32_noise"]

    @property
    def dense_slim(self) -> nn.Module:
        """The slim model with dense weights (before sparse packing, when that ran)."""
        assert self.slim is not None, "runs after remove_zero_channels"
        return self.unpacked if self.unpacked is not None else self.slim


def require_close(check: Any, tolerance: float, what: str, hint: str, tail: str = "; nothing was written") -> None:
    """The pipeline's one failed-check error: `check` (a `verify.Closeness` or `VerificationResult`)
    passed, or a VerificationError "<what>: max relative error ... > tolerance ...<tail>"."""
    if not check.passed:
        raise VerificationError(f"{what}: max relative error {check.max_rel:.3g} > tolerance {tolerance:g}{tail}",
                                hint=hint)


def measuring(options: CompileOptions) -> bool:
    return options.measure


@dataclass(frozen=True)
class Stage:
    name: str
    title: str  # shown in the progress display
    run: Callable[[CompileContext], None]
    when: Callable[[CompileOptions], bool] = lambda options: True
    target_step: bool = False  # a failure keeps the verified artifacts (TargetFailure) instead of all-or-nothing


@dataclass
class CompileResult:
    out: Path
    report: dict[str, Any]
    target_failure: TargetFailure | None = None


# progress(stage, index, total, state); state "start", "done" or "failed" (a target step: the
# pipeline goes on to the report)
Progress = Callable[[Stage, int, int, str], None]
