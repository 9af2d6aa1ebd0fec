"""Build a QDQ ONNX model with TVM (Relax) so the built module stores integer weights.

TVM's ONNX frontend maps DequantizeLinear to `R.dequantize` over int8 constants; the default
pipeline keeps those constants as int8 and dequantizes at run time, so the library carries
1 byte per weight instead of 4. INT4 initializers do not import (TVM 0.27 reads them with the
wrong byte count), so 4-bit weights go to TVM as int8 values within [-8, 7].
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from rwdeploy.errors import ToolchainError
from rwdeploy.io import atomic_file

if TYPE_CHECKING:
    from rwdeploy.runtime.targets import Target


@dataclass
class TvmBuild:
    path: str | None
    library_bytes: int
    build_s: float
    target: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "library_bytes": self.library_bytes, "build_s": round(self.build_s, 3),
                "target": self.target}


def build_onnx(model: onnx.ModelProto, target: Target | None = None, path: str | os.PathLike | None = None):
    """Import `model` into Relax, build it for `target` (a registry entry; default: this host's
    `cpu`), export the library (with the target's cross compiler).

    Returns (TvmBuild, run): run(x: np.ndarray) -> np.ndarray calls the built module, for a
    target that runs in this process (the cpu family); None for arm and gpu builds.
    """
    try:
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx
    except ImportError as err:
        raise ToolchainError(f"TVM is not importable ({err})", hint="install apache-tvm as in pyproject.toml") from None
    from rwdeploy.runtime.targets import get_target
    from rwdeploy.runtime.tvm_build import _cuda_module, cubin_needs_stand_in

    tgt = target or get_target("cpu")
    tgt.require("build")
    if tgt.family == "gpu" and path is not None and cubin_needs_stand_in():
        from rwdeploy.runtime.cuda_cubin import build_onnx_with_cubin

        info = build_onnx_with_cubin(model, target=tgt, path=path)
        return TvmBuild(str(path), info["library_bytes"], info["build_s"], tgt.tvm_target), None
    tvm_target = tgt.tvm()
    t0 = time.perf_counter()
    mod = from_onnx(model, keep_params_in_input=False)
    if tgt.family == "gpu":
        with tvm_target:  # the nvcc callback reads the arch from Target.current()
            executable = tvm.compile(mod, target=tvm_target)
        if _cuda_module(executable) is None:
            raise ToolchainError(f"target {tgt.name!r}: the quantized build has no CUDA module")
    else:
        executable = tvm.compile(mod, target=tvm_target)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="rwdeploy-tvm-") as tmp:
        lib = Path(tmp) / "lib.so"
        fcompile = tgt.fcompile()
        if fcompile is None:
            executable.export_library(str(lib))
        else:
            executable.export_library(str(lib), fcompile=fcompile)
        size = lib.stat().st_size
        if path is not None:
            with atomic_file(path) as out:
                out.write_bytes(lib.read_bytes())
    build = TvmBuild(str(path) if path is not None else None, size, seconds, tgt.tvm_target)
    if tgt.family != "cpu":
        return build, None
    vm = relax.VirtualMachine(executable, tvm.cpu())

    def run(x: np.ndarray) -> np.ndarray:
        return vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return build, run
