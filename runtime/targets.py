"""The target registry: where a model can be built for and run, as one entry per target.

A `Target` names a TVM target (a JSON dict, host included), how the exported library is
compiled (the C compiler TVM hands the object files to), where the artifact runs (in this
process or on a device over TVM RPC), how it is measured, and what must be installed for it.
`get_target(name, ...)` resolves the host-dependent details (the real CPU name, thread count,
CUDA architecture) at the moment of use, so the registry itself stays a plain table.

Adding a target is adding one entry to `TARGETS` (a board preset is one `_arm_board` line).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable

from rwdeploy.errors import OptionError, ToolchainError

# Where an artifact runs and how its latency is taken.
RUNS_LOCAL = "local"  # loaded into this process (relax.VirtualMachine on tvm.cpu()/tvm.cuda())
RUNS_RPC = "rpc"  # uploaded to a device (or the emulated aarch64 device) over TVM RPC

DEFAULT_GPU_ARCH = "sm_90"  # used when no GPU is visible and no --gpu-arch is given


@dataclass(frozen=True)
class Requirement:
    """One thing a target needs installed, with how to check for it and how to install it."""

    name: str
    needed_for: str  # "build", "run" or "optional" (never blocks)
    check: Callable[[], bool] = field(compare=False, repr=False)
    install: str  # what to tell the user

    def present(self) -> bool:
        try:
            return bool(self.check())
        except Exception:  # a broken probe means "not usable", never a crash in `targets`
            return False


@dataclass(frozen=True)
class Target:
    """One entry of the registry; `tvm_target`/`host` are TVM target JSON dicts."""

    name: str
    family: str  # "cpu" | "arm" | "gpu": which build recipe applies
    description: str
    tvm_target: dict[str, Any]
    host: dict[str, Any] | None = None
    cross_compiler: str | None = None  # C compiler for export_library; None = host default
    runs_on: str = RUNS_LOCAL
    measure: str = ""  # how latency is taken, in words (listed by `rwdeploy targets`)
    requirements: tuple[Requirement, ...] = ()
    preset_of: str | None = None  # board presets name their family target
    threads: int | None = None  # cpu: TVM_NUM_THREADS used when measuring
    notes: tuple[str, ...] = ()  # facts decided at resolution (e.g. "no GPU: arch sm_90 assumed")

    @property
    def artifact_name(self) -> str:
        """File name of the exported library: `model.<target>.so`."""
        return f"model.{self.name}.so"

    def missing(self, needed_for: str | None = None) -> list[Requirement]:
        """Requirements that are not present (all, or only those for "build"/"run")."""
        return [r for r in self.requirements
                if (r.needed_for == needed_for if needed_for else r.needed_for != "optional")
                and not r.present()]

    def check(self, needed_for: str | None = None) -> bool:
        """True when everything the target needs (for "build", "run" or both) is installed."""
        return not self.missing(needed_for)

    def require(self, needed_for: str) -> None:
        """Raise ToolchainError naming what to install when a requirement is missing."""
        missing = self.missing(needed_for)
        if missing:
            what = "; ".join(f"{r.name} ({r.install})" for r in missing)
            raise ToolchainError(
                f"target {self.name!r} cannot {needed_for}: missing {what}",
                hint=f"install it, then check with `rwdeploy targets`",
            )

    def tvm(self) -> Any:
        """The `tvm.target.Target` (host attached) for this entry."""
        import tvm

        if self.host is None:
            return tvm.target.Target(self.tvm_target)
        return tvm.target.Target(self.tvm_target, host=self.host)

    def fcompile(self) -> Callable[..., None] | None:
        """The compile function for `export_library`: the cross compiler, or TVM's default."""
        if self.cross_compiler is None:
            return None
        from tvm.support import cc

        return cc.cross_compiler(self.cross_compiler)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "description": self.description,
            "tvm_target": self.tvm_target,
            "host": self.host,
            "cross_compiler": self.cross_compiler,
            "runs_on": self.runs_on,
            "measure": self.measure,
            "preset_of": self.preset_of,
            "threads": self.threads,
            "requirements": [
                {"name": r.name, "needed_for": r.needed_for, "present": r.present(),
                 "install": r.install}
                for r in self.requirements
            ],
            "notes": list(self.notes),
        }


# --- probes ------------------------------------------------------------------------------

def _have_program(name: str) -> Callable[[], bool]:
    return lambda: shutil.which(name) is not None


def _have_tvm() -> bool:
    import tvm  # noqa: F401

    return True


def _have_any_program(prefix: str) -> Callable[[], bool]:
    """Some executable on PATH starts with `prefix` (NDK clangs carry the API level)."""

    def probe() -> bool:
        for folder in os.environ.get("PATH", "").split(os.pathsep):
            try:
                if any(n.startswith(prefix) for n in os.listdir(folder)):
                    return True
            except OSError:
                continue
        return False

    return probe


def _android_clang() -> str:
    """The NDK's aarch64 clang on PATH (highest API level), or the generic name if none."""
    found: list[str] = []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        try:
            found += [n for n in os.listdir(folder)
                      if n.startswith("aarch64-linux-android") and n.endswith("-clang")]
        except OSError:
            continue
    return sorted(found)[-1] if found else "aarch64-linux-android-clang"


@lru_cache(maxsize=1)
def host_cpu() -> str | None:
    """The real host CPU name for LLVM (`mcpu=native` silently compiles generic code); None
    where only TVM's runtime is installed (loading and running an artifact needs no LLVM)."""
    import tvm

    try:
        return str(tvm.target.codegen.llvm_get_system_cpu())
    except AttributeError:  # the function lives in TVM's compiler library
        return None


def cuda_gpu_arch() -> str | None:
    """`sm_XY` of the first visible CUDA GPU, or None when there is none."""
    try:
        import tvm

        dev = tvm.cuda(0)
        if dev.exist:
            return "sm_" + str(dev.compute_version).replace(".", "")
    except Exception:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            first = out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 else ""
            if first:
                return "sm_" + first.replace(".", "")
        except (OSError, subprocess.SubprocessError, IndexError):
            pass
    return None


def _have_cuda_gpu() -> bool:
    return cuda_gpu_arch() is not None


_TVM = Requirement("apache-tvm 0.27", "build", _have_tvm, "pip install apache-tvm==0.27.0.post1")
_HOST_CC = Requirement("gcc", "build", _have_program("gcc"), "apt-get install -y gcc")
_A64_GCC = Requirement(
    "aarch64-linux-gnu-gcc", "build", _have_program("aarch64-linux-gnu-gcc"),
    "apt-get install -y gcc-aarch64-linux-gnu g++-aarch64-linux-gnu",
)
_A64_DEVICE = Requirement(
    "an aarch64 device: --rpc HOST:PORT, or qemu-aarch64 for the emulated one", "run",
    _have_program("qemu-aarch64"),
    "give --rpc HOST:PORT, or apt-get install -y qemu-user (emulated device)",
)
_PHONE = Requirement(
    "an Android phone over TVM RPC", "run", lambda: False,  # only --rpc can provide one
    "give --rpc HOST:PORT (the TVM RPC app on the phone, e.g. through adb forward)",
)
_NDK_CLANG = Requirement(
    "Android NDK aarch64 clang", "build", _have_any_program("aarch64-linux-android"),
    "install the Android NDK and put toolchains/llvm/prebuilt/linux-x86_64/bin on PATH",
)
_CUDA_GPU = Requirement("a CUDA GPU + driver", "run", _have_cuda_gpu,
                        "run on a machine with an NVIDIA GPU (the build works without one)")
_NVCC = Requirement("nvcc (a cubin without a driver here; CUDA source needs TVM's compiler "
                    "on the GPU machine)", "optional",
                    _have_program("nvcc"), "install the CUDA toolkit")


# --- the registry ----------------------------------------------------------------------

def _arm_board(name: str, cpu: str, board: str) -> Target:
    """A board preset of the `arm` family: the same cross build, tuned for one core."""
    return Target(
        name=name, family="arm", preset_of="arm",
        description=f"{board} ({cpu}), aarch64 + NEON, cross-compiled",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": cpu,
                    "mattr": ["+neon"]},
        cross_compiler="aarch64-linux-gnu-gcc", runs_on=RUNS_RPC,
        measure="TVM RPC to the board (--rpc HOST:PORT)",
        requirements=(_TVM, _A64_GCC, _A64_DEVICE),
    )


TARGETS: dict[str, Target] = {
    "cpu": Target(
        name="cpu", family="cpu",
        description="this machine's CPU through LLVM (real CPU name, explicit thread count)",
        tvm_target={"kind": "llvm"},  # mcpu/num-cores filled in by get_target
        runs_on=RUNS_LOCAL,
        measure="relax.VirtualMachine in this process; ONNX Runtime CPU beside it",
        requirements=(_TVM, _HOST_CC),
    ),
    "arm": Target(
        name="arm", family="arm",
        description="generic aarch64 + NEON (Linux), cross-compiled",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
        cross_compiler="aarch64-linux-gnu-gcc", runs_on=RUNS_RPC,
        measure="TVM RPC to a device (--rpc HOST:PORT) or the emulated aarch64 device",
        requirements=(_TVM, _A64_GCC, _A64_DEVICE),
    ),
    "rpi4": _arm_board("rpi4", "cortex-a72", "Raspberry Pi 4"),
    "rpi5": _arm_board("rpi5", "cortex-a76", "Raspberry Pi 5"),
    "graviton2": _arm_board("graviton2", "neoverse-n1", "AWS Graviton2"),
    "android-arm64": Target(
        name="android-arm64", family="arm", preset_of="arm",
        description="Android arm64 phone, aarch64 + NEON, built with the NDK's clang",
        tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-android", "mattr": ["+neon"]},
        cross_compiler="aarch64-linux-android-clang",  # replaced by the NDK clang found on PATH
        runs_on=RUNS_RPC, measure="TVM RPC to the phone (--rpc HOST:PORT, e.g. via adb forward)",
        requirements=(_TVM, _NDK_CLANG, _PHONE),
    ),
    "gpu": Target(
        name="gpu", family="gpu",
        description="NVIDIA GPU through CUDA (arch detected, or --gpu-arch)",
        tvm_target={"kind": "cuda"},  # arch filled in by get_target
        host={"kind": "llvm"},
        runs_on=RUNS_LOCAL,
        measure="relax.VirtualMachine on tvm.cuda(); skipped without a GPU",
        requirements=(_TVM, _HOST_CC, _CUDA_GPU, _NVCC),
    ),
}


def _threads(threads: int | None) -> int:
    if threads is not None:
        if threads < 1:
            raise OptionError(f"--threads must be >= 1, got {threads}")
        return threads
    env = os.environ.get("TVM_NUM_THREADS")
    if env and env.isdigit() and int(env) > 0:
        return int(env)
    return os.cpu_count() or 1


def get_target(name: str, *, gpu_arch: str | None = None, threads: int | None = None,
               rpc: str | None = None) -> Target:
    """The registry entry `name`, resolved for this machine.

    cpu: `mcpu` is the real host CPU and `num-cores` the thread count (`threads`, else
    TVM_NUM_THREADS, else all cores). gpu: `arch` is `gpu_arch`, else the visible GPU's, else
    sm_90 with a note. `rpc` marks that a device is given, which satisfies the arm run need.
    """
    try:
        base = TARGETS[name]
    except KeyError:
        raise OptionError(f"unknown target {name!r}",
                          hint=f"known targets: {', '.join(TARGETS)}") from None
    if gpu_arch is not None and base.family != "gpu":
        raise OptionError(f"--gpu-arch applies to --target gpu, not {name!r}")
    if base.family == "cpu":
        n = _threads(threads)
        tgt = dict(base.tvm_target, mcpu=host_cpu(), **{"num-cores": n})
        return dataclasses.replace(base, tvm_target=tgt, threads=n)
    if base.family == "gpu":
        notes: tuple[str, ...] = ()
        arch = gpu_arch
        if arch is None:
            arch = cuda_gpu_arch()
            if arch is None:
                arch = DEFAULT_GPU_ARCH
                notes = (f"no CUDA GPU visible: built for {arch} (override with --gpu-arch)",)
        if not (arch.startswith("sm_") and arch[3:].rstrip("a").isdigit()):
            raise OptionError(f"--gpu-arch {arch!r} is not a CUDA architecture",
                              hint="use the form sm_XY, e.g. sm_80, sm_90")
        cpu = host_cpu()
        host = dict(base.host or {"kind": "llvm"}, **({"mcpu": cpu} if cpu else {}))
        return dataclasses.replace(base, tvm_target=dict(base.tvm_target, arch=arch),
                                   host=host, notes=notes)
    entry = base
    if name == "android-arm64":
        entry = dataclasses.replace(entry, cross_compiler=_android_clang())
    if rpc is not None:
        given = Requirement(f"a device over TVM RPC at {rpc}", "run", lambda: True,
                            "given with --rpc")
        entry = dataclasses.replace(entry, requirements=tuple(
            given if r.needed_for == "run" else r for r in entry.requirements))
    return entry
