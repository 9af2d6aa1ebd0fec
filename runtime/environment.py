"""A record of the machine and the versions a measurement was taken with."""
from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

# the checkout this package runs from, where it runs from one (an editable install)
_CHECKOUT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def code_version(checkout: Path = _CHECKOUT) -> str:
    """The git commit `checkout` is at ("<short sha>-dirty" with uncommitted changes to tracked
    files; "unknown" where `checkout` is not the top of a git checkout, as for an installed
    package, whose site-packages may sit inside some other project's repository): results from
    different code are not comparable."""
    try:
        top, sha = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--show-toplevel", "--short", "HEAD"],
                                  capture_output=True, text=True, timeout=10, check=True).stdout.splitlines()
        if Path(top).resolve() != Path(checkout).resolve():
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


@lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch": torch.__version__,
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime"),
        "tvm": _version("apache-tvm"),
        "rwdeploy": _version("rwdeploy"),
        "rwdeploy_commit": code_version(),
        "cuda_available": bool(torch.cuda.is_available()),
    }
