"""Build a (slim) torch model with Apache TVM 0.27 (Relax) for a registry target.

    artifact = build(module, example_input, "cpu", out_dir="out")   # -> out/model.cpu.so
    stats, err = measure_local(artifact, example_input, reference)

Import is torch.export -> `from_exported_program(..., unwrap_unit_return_tuple=True)`; custom
ops (the sparse kernels) reach Relax through `converters` (name -> converter), which
`rwdeploy.runtime.tvm_sparse` supplies. CPU-like targets (cpu, arm and its presets) go
through `cpu_pipeline` (BN folding, NHWC, scheduled kernels from `tvm_schedule`, optionally
a MetaSchedule database from `tvm_tune`); `gpu` through TVM's default CUDA pipeline (dlight
GPU schedules), and the build checks that a CUDA device module really exists.
The model is never mutated.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from rwdeploy.errors import OptionError, RwdeployError, ToolchainError, TvmImportError
from rwdeploy.io import atomic_file
from rwdeploy.passes.verify import compare
from rwdeploy.runtime.latency import LatencyStats, time_callable
from rwdeploy.runtime.targets import RUNS_LOCAL, Target, get_target

Converter = Callable[..., Any]  # (fx.Node, importer) -> relax.Var, as TVM's frontend expects


@dataclass
class TvmArtifact:
    """What one build produced; `executable` is the in-memory relax executable."""

    target: Target
    path: Path | None
    build_s: float
    export_s: float
    size_bytes: int | None
    device_modules: list[str]
    cuda_binary: bool | None = None  # gpu: True = cubin embedded, False = CUDA source
    kernels: dict[str, list[str]] = field(default_factory=dict)
    tuned_trials: int = 0
    tuning_db: str | None = None
    executable: Any = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.name,
            "tvm_target": self.target.tvm_target,
            "host": self.target.host,
            "path": None if self.path is None else str(self.path),
            "file": None if self.path is None else self.path.name,
            "build_s": round(self.build_s, 3),
            "export_s": round(self.export_s, 3),
            "size_bytes": self.size_bytes,
            "device_modules": self.device_modules,
            "cuda_binary": self.cuda_binary,
            "kernels": {k: len(v) for k, v in self.kernels.items() if k != "notes"},
            "unscheduled_kernels": self.kernels.get("unscheduled", []),
            "tuned_trials": self.tuned_trials,
            "tuning_db": self.tuning_db,
            "notes": list(self.target.notes) + list(self.kernels.get("notes", [])),
        }


def resolve_target(target: str | Target, **opts: Any) -> Target:
    return target if isinstance(target, Target) else get_target(target, **opts)


def _as_tuple(example_input: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def _has_rwdeploy_ops(program: torch.export.ExportedProgram) -> bool:
    return any(node.op == "call_function" and "rwdeploy" in str(node.target)
               for node in program.graph.nodes)


def _has_packed_layers(module_or_program: torch.nn.Module | torch.export.ExportedProgram) -> bool:
    """Whether the model calls rwdeploy's CSR/BSR ops (packed modules or ATen-graph calls)."""
    if isinstance(module_or_program, torch.export.ExportedProgram):
        return _has_rwdeploy_ops(module_or_program)
    from rwdeploy.sparse.modules import _Packed

    return any(isinstance(m, _Packed) or (isinstance(m, torch.fx.GraphModule) and any(
        n.op == "call_function" and "rwdeploy" in str(n.target) for n in m.graph.nodes))
        for m in module_or_program.modules())


def _uses(program: torch.export.ExportedProgram, names: tuple[str, ...]) -> bool:
    """Whether the program calls one of the ATen ops `names` ("im2col.default", ...)."""
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
               and f"{n.target._opname}.{n.target._overloadname}" in names for n in program.graph.nodes)


def import_relax(module_or_program: torch.nn.Module | torch.export.ExportedProgram,
                 example_input: torch.Tensor | tuple[torch.Tensor, ...],
                 converters: dict[str, Converter] | None = None) -> Any:
    """The model as a Relax IRModule with its weights bound as constants.

    Ops TVM's importer lacks go through `runtime.tvm_convert.CONVERTERS` (and rwdeploy's sparse
    ops through `runtime.tvm_sparse`); one that has no converter at all is a `TvmImportError`
    naming the first node that uses it.
    """
    from tvm.relax.frontend.torch import from_exported_program

    from rwdeploy.runtime.tvm_convert import CONVERTERS, KEEP_UNDECOMPOSED

    if isinstance(module_or_program, torch.export.ExportedProgram):
        program = module_or_program
    else:
        with torch.no_grad():
            program = torch.export.export(module_or_program, _as_tuple(example_input))
    if converters is None and _has_rwdeploy_ops(program):
        from rwdeploy.runtime.tvm_sparse import convert_map  # CSR/BSR kernels (packed layers)

        converters = convert_map(dense_kernels=False)
    converters = {**CONVERTERS, **(converters or {})}
    keep = KEEP_UNDECOMPOSED
    if _has_rwdeploy_ops(program):
        from rwdeploy.runtime.tvm_sparse import KEPT_ACTIVATIONS

        keep = (*keep, *KEPT_ACTIVATIONS)
    decompose = True
    if _uses(program, keep):  # decompose here, keeping the ops a converter handles whole
        table = torch.export.default_decompositions()
        for name in keep:
            table.pop(getattr(torch.ops.aten, name.split(".")[0]).default, None)
        program, decompose = program.run_decompositions(table), False
    try:
        mod = from_exported_program(program, keep_params_as_input=False, run_ep_decomposition=decompose,
                                    unwrap_unit_return_tuple=True, custom_convert_map=converters)
    except TvmImportError:
        raise
    except (AssertionError, KeyError, NotImplementedError, ValueError, TypeError) as err:
        raise _import_error(program, converters, err) from None
    if _has_rwdeploy_ops(program):  # the sparse kernels' offsets from the (now constant) weights
        from rwdeploy.runtime.tvm_sparse import fold_weight_arithmetic

        mod = fold_weight_arithmetic(mod)
    return mod


def unsupported_nodes(program: torch.export.ExportedProgram, converters: dict[str, Converter]) -> list[Any]:
    """The nodes of `program` (after the core-ATen decomposition TVM's importer runs) whose op
    neither TVM's importer nor `converters` can convert."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    known = set(ExportedProgramImporter().create_convert_map()) | set(converters)
    return [n for n in program.run_decompositions().graph.nodes
            if n.op == "call_function" and n.target.__name__ not in known]


def _import_error(program: torch.export.ExportedProgram, converters: dict[str, Converter],
                  err: Exception) -> TvmImportError:
    hint = ("compile with --target onnx (slim .pt2 + ONNX, no TVM), or add a converter for the op "
            "to rwdeploy/runtime/tvm_convert.py")
    try:
        missing = unsupported_nodes(program, converters)
    except Exception:  # noqa: BLE001 - the diagnosis is best effort; the error below still stands
        missing = []
    if not missing:
        return TvmImportError(f"TVM cannot import the model: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}",
                              hint=hint)
    node = missing[0]
    stack = node.meta.get("nn_module_stack") or {}
    where = f" in module {list(stack.values())[-1][0]!r}" if stack else ""
    ops = sorted({str(n.target) for n in missing})
    return TvmImportError(f"TVM's Relax importer has no converter for {', '.join(ops)} "
                          f"(first at node {node.name!r}{where})", hint=hint, node=node.name)


def cpu_pipeline(target: Any, stats: dict[str, list[str]], tuning_db: str | None = None) -> Any:
    """Relax pipeline for LLVM targets: TVM's CPU passes plus the schedules they lack."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from rwdeploy.runtime.tvm_legalize import legalize_passes
    from rwdeploy.runtime.tvm_schedule import channel_unit, prepare_passes, schedule_cpu_pass, vector_lanes
    from rwdeploy.runtime import tvm_batch_split, tvm_window_ell
    from rwdeploy.runtime.tvm_inplace_epilogue import inplace_epilogue_pass
    from rwdeploy.runtime.tvm_input_layout import fold_input_transpose_pass

    @tvm.transform.module_pass(opt_level=0, name="rwdeploy.cpu_pipeline")
    def pipeline(mod: Any, _ctx: Any) -> Any:
        with target:
            tuned = [relax.transform.MetaScheduleApplyDatabase(tuning_db)] if tuning_db else []
            # batch-1 CSR Linear layers as window-ELL where the CPU has AVX-512
            window_ell = [tvm_window_ell.window_ell_pass()] if tvm_window_ell.supports(target) else []
            # a batch whose first layers' tensors overflow this machine's caches runs them per image
            split = [tvm_batch_split.batch_split_pass(tvm_batch_split.core_cache_bytes())] \
                if not str(target.attrs.get("mtriple", "")) else []
            return tvm.transform.Sequential([
                *window_ell,
                *prepare_passes(vector_lanes(target), stats, channel_unit(target)),
                *split,
                fold_input_transpose_pass(vector_lanes(target)),
                *cpu.library_dispatch_passes(target),
                *legalize_passes(target),
                *tuned,
                schedule_cpu_pass(target, stats),
                *cpu.dataflow_lower_passes(target),
                inplace_epilogue_pass(stats),
                *cpu.finalize_passes(target),
            ])(mod)

    return pipeline


def device_module_kinds(executable: Any) -> list[str]:
    """Kinds of the device modules imported by the host module ("cuda", ...)."""
    kinds: list[str] = []
    pending = list(executable.mod.imports)
    while pending:
        mod = pending.pop()
        if mod.kind not in ("llvm", "library", "static_library", "c"):
            kinds.append(str(mod.kind))
        pending.extend(mod.imports)
    return sorted(kinds)


def _cuda_module(executable: Any) -> Any | None:
    pending = list(executable.mod.imports)
    while pending:
        mod = pending.pop()
        if mod.kind == "cuda":
            return mod
        pending.extend(mod.imports)
    return None


def cuda_runtime_loads() -> bool:
    """Whether TVM's CUDA runtime library is loaded (it needs a driver's libcuda.so.1)."""
    import tvm

    return bool(tvm.runtime.enabled("cuda"))


def cubin_needs_stand_in() -> bool:
    """No driver here, but nvcc and gcc are: a cubin can still be built (runtime.cuda_cubin).

    Without one the CUDA module stays source, which a GPU machine can load only with TVM's
    compiler installed (measured: TVM's runtime alone fails on it).
    """
    return (not cuda_runtime_loads() and shutil.which("nvcc") is not None
            and shutil.which("gcc") is not None and not os.environ.get("RWDEPLOY_CUDA_SOURCE"))


def check_tuning_options(target: Target, tune: int,
                         tuning_db: str | os.PathLike | None) -> str | None:
    """Validate --tune/--tuning-db for `target`; returns the database folder (absolute) or None."""
    if tune < 0:
        raise OptionError(f"--tune must be >= 0 trials, got {tune}")
    if (tune or tuning_db is not None) and target.family == "gpu":
        raise OptionError("--tune/--tuning-db are for cpu/arm targets; "
                          "gpu uses TVM's default CUDA schedules")
    if tune and tuning_db is None:
        raise OptionError("--tune needs --tuning-db DIR to keep the tuning records")
    db = None if tuning_db is None else str(Path(tuning_db).resolve())
    if db is not None and not tune and not Path(db).is_dir():
        raise OptionError(f"--tuning-db {db} does not exist", hint="tune first with --tune TRIALS")
    return db


def build(module_or_program: torch.nn.Module | torch.export.ExportedProgram,
          example_input: torch.Tensor | tuple[torch.Tensor, ...],
          target: str | Target,
          *,
          out_dir: str | os.PathLike | None = None,
          tune: int = 0,
          tuning_db: str | os.PathLike | None = None,
          converters: dict[str, Converter] | None = None,
          gpu_arch: str | None = None,
          threads: int | None = None,
          exec_mode: str = "compiled") -> TvmArtifact:
    """Import, build and (when `out_dir` is given) export `model.<target>.so` there.

    `tune` > 0 runs MetaSchedule for that many trials into `tuning_db` (a folder reused across
    runs); a `tuning_db` without `tune` only applies what is already there. Missing
    toolchains raise ToolchainError before any work is done.

    `exec_mode` (cpu-like targets): "compiled" turns the Relax VM's own instructions (tensor
    allocation, shape checks, the kernel calls) into machine code in the library, "bytecode"
    leaves them to the VM's interpreter, whose per-instruction cost shows on small models
    (interleaved on the Xeon, batch 1: slim LeNet-5 70 % 12.8 -> 11.6 us, slim ResNet-20 70 %
    0.140 -> 0.134 ms, MobileNetV2 unchanged). `runtime.tvm_profile` needs "bytecode": only the
    interpreter reports its calls to an instrument.
    """
    import tvm
    from tvm import relax

    tgt = resolve_target(target, gpu_arch=gpu_arch, threads=threads)
    tgt.require("build")
    db = check_tuning_options(tgt, tune, tuning_db)
    if tgt.family == "gpu" and _has_packed_layers(module_or_program):
        raise RwdeployError(f"target {tgt.name!r}: the model has packed (CSR/BSR) layers, whose "
                            "kernels are CPU code; a CUDA build would run them on the host over "
                            "device memory", hint="build the model before packing (compile's "
                                                  "--sparse auto keeps gpu layers dense)")
    if tgt.family == "gpu" and not converters and cubin_needs_stand_in():
        from rwdeploy.runtime.cuda_cubin import build_with_cubin

        info = build_with_cubin(module_or_program, example_input, target=tgt, out_dir=out_dir)
        return TvmArtifact(target=tgt, path=Path(info["path"]), build_s=info["build_s"],
                           export_s=info["export_s"], size_bytes=info["size_bytes"],
                           device_modules=info["device_modules"], cuda_binary=True)

    t0 = time.perf_counter()
    mod = import_relax(module_or_program, example_input, converters)
    tvm_target = tgt.tvm()
    stats: dict[str, list[str]] = {}
    if tgt.family == "gpu":
        with tvm_target:  # the nvcc callback reads the arch from Target.current()
            executable = tvm.compile(mod, target=tvm_target)
        if _cuda_module(executable) is None:
            raise RwdeployError(f"target {tgt.name!r}: the build has no CUDA module "
                                "(every loop was compiled for the host)")
    else:
        from rwdeploy.runtime.tvm_stack_tiles import register_tir_pipeline

        if tune:
            from rwdeploy.runtime.tvm_tune import tune_cpu

            tune_cpu(mod, tvm_target, db, tune)
        executable = relax.build(mod, target=tvm_target, relax_pipeline=cpu_pipeline(tvm_target, stats, db),
                                 tir_pipeline=register_tir_pipeline(), exec_mode=exec_mode)
    build_s = time.perf_counter() - t0
    cuda = _cuda_module(executable)
    artifact = TvmArtifact(
        target=tgt, path=None, build_s=build_s, export_s=0.0, size_bytes=None,
        device_modules=device_module_kinds(executable),
        cuda_binary=None if cuda is None else bool(cuda.is_runnable()),
        kernels=stats, tuned_trials=tune, tuning_db=db, executable=executable,
    )
    if out_dir is not None:
        export(artifact, Path(out_dir) / tgt.artifact_name)
    return artifact


def export(artifact: TvmArtifact, path: str | os.PathLike) -> Path:
    """Write the shared library with the target's compiler (atomically); fills path/size."""
    path = Path(path)
    t0 = time.perf_counter()
    fcompile = artifact.target.fcompile()
    with atomic_file(path) as tmp:
        try:
            if artifact.executable is None:  # built in another process (a cubin build): its file
                shutil.copyfile(artifact.path, tmp)
            elif fcompile is None:
                artifact.executable.export_library(str(tmp))
            else:
                artifact.executable.export_library(str(tmp), fcompile=fcompile)
        except (RuntimeError, OSError) as err:
            if artifact.target.cross_compiler and "No such file" in str(err):
                raise ToolchainError(
                    f"cross compiler {artifact.target.cross_compiler} failed to run",
                    hint="install it, see `rwdeploy targets`") from None
            raise
    artifact.export_s = time.perf_counter() - t0
    artifact.path = path
    artifact.size_bytes = path.stat().st_size
    return path


def kernel_names(library: str | os.PathLike) -> set[str]:
    """The kernels (PrimFuncs) a built library holds, by name: each is exported as an
    `__tvm_ffi_<name>` symbol of the shared object, whichever the VM's `exec_mode` (a compiled
    VM's calls are machine code, so its executable's text no longer lists them)."""
    import re

    data = Path(library).read_bytes()
    return {m.decode() for m in re.findall(rb"__tvm_ffi_([A-Za-z0-9_]+)", data)}


def set_threads(n: int) -> None:
    """Use `n` threads in TVM's CPU thread pool from now on (TVM defaults to half the cores)."""
    import tvm

    os.environ["TVM_NUM_THREADS"] = str(n)
    tvm.get_global_func("runtime.config_threadpool")(1, n)


def _device(target: Target) -> Any:
    import tvm

    return tvm.cuda(0) if target.family == "gpu" else tvm.cpu(0)


def load_local(artifact: TvmArtifact) -> Callable[..., Any]:
    """The model's `main` in a relax VM of this process, loaded from the exported file."""
    import tvm
    from tvm.runtime.vm import VirtualMachine  # TVM's runtime alone is enough: no compiler import

    if artifact.target.runs_on != RUNS_LOCAL:
        raise OptionError(f"target {artifact.target.name!r} runs on a device over RPC, "
                          "not in this process")
    artifact.target.require("run")
    module = tvm.runtime.load_module(str(artifact.path)) if artifact.path else artifact.executable
    vm = VirtualMachine(module, _device(artifact.target))
    return vm["main"]


def _to_numpy(out: Any) -> np.ndarray:
    if hasattr(out, "numpy"):
        return out.numpy()
    return _to_numpy(out[0])  # a tuple output: the first element is the model's output


def bind_local(artifact: TvmArtifact,
               inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[Callable[[], None], np.ndarray]:
    """A no-argument call of the artifact on `inputs` in this process (synchronised with the
    device, for timing), and the (first) output of one call, as numpy. Threads: the target's."""
    import tvm

    if artifact.target.threads:
        set_threads(artifact.target.threads)
    main = load_local(artifact)
    dev = _device(artifact.target)
    args = [tvm.runtime.tensor(t.detach().cpu().numpy(), dev) for t in _as_tuple(inputs)]
    output = _to_numpy(main(*args))
    if artifact.target.family != "gpu":
        # a CPU call returns when its work is done; its sync is an FFI call (~0.3 us) doing nothing
        return lambda: main(*args), output

    def run() -> None:
        main(*args)
        dev.sync()

    return run, output


def run_local(artifact: TvmArtifact, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> np.ndarray:
    """One inference through the artifact; returns the (first) output as numpy."""
    return bind_local(artifact, inputs)[1]


def measure_local(artifact: TvmArtifact, inputs: torch.Tensor | tuple[torch.Tensor, ...],
                  reference: np.ndarray | torch.Tensor, *, warmup: int = 5, min_runs: int = 20,
                  min_time_s: float = 0.5) -> tuple[LatencyStats, float]:
    """Latency of one artifact in this process, after checking its output's shape.

    Returns the latency stats and the max abs error against `reference` (the torch model's
    output). To compare two artifacts, time their `bind_local` calls with
    `runtime.latency.time_interleaved` instead.
    """
    run, got = bind_local(artifact, inputs)
    ref = reference.detach().cpu().numpy() if isinstance(reference, torch.Tensor) else reference
    if got.shape != ref.shape:
        raise RwdeployError(f"TVM output shape {got.shape} differs from torch {ref.shape}")
    err = compare(ref, got, tolerance=math.inf).max_abs
    return time_callable(run, warmup=warmup, min_runs=min_runs, min_time_s=min_time_s), err
