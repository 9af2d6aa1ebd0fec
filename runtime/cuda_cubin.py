"""A `gpu` build whose kernels are compiled to a cubin on a host without an NVIDIA driver.

TVM 0.27 creates a CUDA module (and so calls nvcc) only when its CUDA runtime library loads,
and that library links `libcuda.so.1`, which only a driver installs. Without one, the build
keeps CUDA source. Here the build runs in a child process that finds a stand-in
`libcuda.so.1` (every call fails: it is only there to be loaded, never to run anything) and
nvcc, so the artifact carries machine code for `arch` and the GPU box needs no compiler.

    figures = build_with_cubin(module, example_input, target=get_target("gpu", gpu_arch="sm_90"),
                               out_dir="out")   # -> out/model.gpu.so

`tvm_build.build(..., "gpu", out_dir=...)` comes here by itself on a host without a driver
where nvcc and gcc are installed (`RWDEPLOY_CUDA_SOURCE=1` keeps the CUDA source instead).
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from rwdeploy import errors
from rwdeploy.errors import RwdeployError, ToolchainError
from rwdeploy.runtime.targets import Target

# The driver entry points TVM's CUDA runtime library resolves at load time.
_STUB_SOURCE = """
typedef int CUresult;
#define NO_DEVICE(name) CUresult name() { return 100; }
NO_DEVICE(cuDeviceGetName) NO_DEVICE(cuFuncSetAttribute) NO_DEVICE(cuLaunchKernelEx)
NO_DEVICE(cuModuleGetFunction) NO_DEVICE(cuModuleLoadData) NO_DEVICE(cuModuleUnload)
NO_DEVICE(cuTensorMapEncodeTiled)
CUresult cuGetErrorName(int e, const char** s) { *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
CUresult cuGetErrorString(int e, const char** s) { *s = "no driver (build-time stand-in)"; return 0; }
"""

# Each child prints one JSON line: the build's figures, or the error (its class and fields).
_CHILD_PROLOGUE = """
import json, sys, torch
from rwdeploy.errors import RwdeployError
def report(fields):
    print(json.dumps(fields))
def fail(err):  # the parent raises it again, same class, same fields
    report({"error": type(err).__name__, "message": err.message, "hint": err.hint,
            "node": getattr(err, "node", None)})
    raise SystemExit(3)
"""

_CHILD_TORCH = _CHILD_PROLOGUE + """
from rwdeploy.runtime import tvm_build
import rwdeploy.sparse.ops  # the packed layers' custom ops, before their program is loaded
program = torch.export.load(sys.argv[1])
x = tuple(torch.load(sys.argv[2], weights_only=True))
try:
    art = tvm_build.build(program, x, "gpu", gpu_arch=sys.argv[3], out_dir=sys.argv[4])
except RwdeployError as err:
    fail(err)
report({"build_s": art.build_s, "export_s": art.export_s, "path": str(art.path),
        "size_bytes": art.size_bytes, "device_modules": art.device_modules,
        "cuda_binary": art.cuda_binary})
"""

_CHILD_ONNX = _CHILD_PROLOGUE + """
import onnx
from rwdeploy.quant.tvm_qdq import build_onnx
from rwdeploy.runtime.targets import get_target
try:
    build, _ = build_onnx(onnx.load(sys.argv[1]), get_target("gpu", gpu_arch=sys.argv[2]), path=sys.argv[3])
except RwdeployError as err:
    fail(err)
source = b"__global__" in open(build.path, "rb").read()  # CUDA source kept, not a cubin
report({"build_s": build.build_s, "library_bytes": build.library_bytes, "path": build.path,
        "cuda_binary": not source})
"""


def _last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _cuda_home(nvcc: str) -> str:
    return os.environ.get("CUDA_PATH") or str(Path(nvcc).resolve().parents[1])


def _run_child(code: str, args: list[str], arch: str, tmp: Path) -> dict:
    """Run a gpu build (`code`, one of the _CHILD_* scripts) where TVM finds a stand-in driver
    and nvcc; its JSON line, or its error raised again here."""
    nvcc, gcc = shutil.which("nvcc"), shutil.which("gcc")
    if nvcc is None or gcc is None:
        raise ToolchainError("a cubin build needs nvcc and gcc on PATH",
                             hint="install the CUDA toolkit, or ship the CUDA-source artifact")
    subprocess.run([gcc, "-shared", "-fPIC", "-x", "c", "-", "-o", str(tmp / "libcuda.so.1")],
                   input=_STUB_SOURCE, text=True, check=True, capture_output=True)
    env = dict(os.environ, TVM_CUDA_COMPILE_MODE="nvcc", CUDA_PATH=_cuda_home(nvcc),
               LD_LIBRARY_PATH=os.pathsep.join(
                   p for p in (str(tmp), os.environ.get("LD_LIBRARY_PATH", "")) if p))
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    info = _last_json(proc.stdout)
    if proc.returncode != 0 or info is None:
        if info is not None and "error" in info:
            cls = getattr(errors, info["error"], RwdeployError)
            kwargs = {"node": info["node"]} if cls is errors.TvmImportError else {}
            raise cls(info["message"], hint=info["hint"], **kwargs)
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RwdeployError(f"cubin build for {arch} failed: {last}")
    if not info["cuda_binary"]:
        raise RwdeployError(f"cubin build for {arch}: TVM kept CUDA source "
                            "(its CUDA runtime library did not load)")
    return info


def build_with_cubin(module_or_program: torch.nn.Module | torch.export.ExportedProgram,
                     example_input: torch.Tensor | tuple[torch.Tensor, ...], *, target: Target,
                     out_dir: str | os.PathLike | None = None) -> dict:
    """Build `model.gpu.so` for `target` (its arch) with the kernels as a cubin; needs nvcc, gcc.
    Returns the child's figures (`path`, `build_s`, `export_s`, `size_bytes`, `device_modules`),
    from which `tvm_build.build` makes its artifact: it has a file and no in-memory executable.
    Without `out_dir` the file lives in a temporary folder removed at exit, and
    `tvm_build.export` copies it where it ships.
    """
    arch = target.tvm_target["arch"]
    if out_dir is None:
        out_dir = tempfile.mkdtemp(prefix="rwdeploy-gpu-")
        atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    with tempfile.TemporaryDirectory(prefix="rwdeploy-cubin-") as tmp_name:
        tmp = Path(tmp_name)
        program = module_or_program
        if not isinstance(program, torch.export.ExportedProgram):
            with torch.no_grad():
                program = torch.export.export(module_or_program, inputs)
        torch.export.save(program, tmp / "model.pt2")
        torch.save(list(inputs), tmp / "inputs.pt")
        return _run_child(_CHILD_TORCH, [str(tmp / "model.pt2"), str(tmp / "inputs.pt"), arch,
                                         str(out_dir)], arch, tmp)


def build_onnx_with_cubin(model: "onnx.ModelProto", *, target: Target, path: str | os.PathLike) -> dict:
    """`quant.tvm_qdq.build_onnx` for a gpu target with the kernels as a cubin, written to `path`;
    returns the build's figures (build_s, library_bytes, path)."""
    arch = target.tvm_target["arch"]
    with tempfile.TemporaryDirectory(prefix="rwdeploy-cubin-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "model.onnx").write_bytes(model.SerializeToString())
        return _run_child(_CHILD_ONNX, [str(tmp / "model.onnx"), arch, str(path)], arch, tmp)
