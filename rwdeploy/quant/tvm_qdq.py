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
from typing import Any

import numpy as np
import onnx

from rwdeploy.errors import ToolchainError
from rwdeploy.io import atomic_file


@dataclass
class TvmBuild:
    path: str | None
    library_bytes: int
    build_s: float
    target: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "library_bytes": self.library_bytes, "build_s": round(self.build_s, 3),
                "target": self.target}


def host_target() -> dict[str, Any]:
    import tvm

    return {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}


def build_onnx(model: onnx.ModelProto, target: dict[str, Any] | None = None, path: str | os.PathLike | None = None):
    """Import `model` into Relax, build it for `target` (default: this host), export the library.

    Returns (TvmBuild, run) where run(x: np.ndarray) -> np.ndarray calls the built module.
    """
    try:
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx
    except ImportError as err:
        raise ToolchainError(f"TVM is not importable ({err})", hint="install apache-tvm as in pyproject.toml") from None
    target = target or host_target()
    t0 = time.perf_counter()
    mod = from_onnx(model, keep_params_in_input=False)
    executable = tvm.compile(mod, target=tvm.target.Target(target))
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="rwdeploy-tvm-") as tmp:
        lib = Path(tmp) / "lib.so"
        executable.export_library(str(lib))
        size = lib.stat().st_size
        if path is not None:
            with atomic_file(path) as out:
                out.write_bytes(lib.read_bytes())
    vm = relax.VirtualMachine(executable, tvm.cpu())

    def run(x: np.ndarray) -> np.ndarray:
        return vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x, dtype=np.float32))).numpy()

    return TvmBuild(str(path) if path is not None else None, size, seconds, target), run
