"""Shared fixtures: running the CLI as a real subprocess; benchmark scripts as modules."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def benchmark_module(stem: str) -> Iterator[ModuleType]:
    """benchmarks/<stem>.py imported as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{stem}_under_test", REPO / "benchmarks" / f"{stem}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while a class is built
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)

# A channel rule that raises is a bug: tests see it (also in CLI subprocesses), where a normal
# compile turns it into pinned channels.
os.environ["RWDEPLOY_STRICT_ANALYSIS"] = "1"


def run_cli(*args: str, cwd: str | Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m rwdeploy ARGS` in a subprocess, with text output captured."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="160")
    return subprocess.run([sys.executable, "-m", "rwdeploy", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny test networks: one intra-op thread avoids thread hand-off costs that dominate on a
    shared 2-core machine. Restored afterwards for other test modules. Opt in per module with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def direct_convs(monkeypatch):
    """Every 3x3 conv built as a direct register-tiled conv, none as Winograd (`tvm_winograd`):
    for the tests of the direct conv's schedule on layers that would otherwise go Winograd."""
    from rwdeploy.runtime import tvm_winograd

    monkeypatch.setattr(tvm_winograd, "choose_winograd", lambda *layer: None)


@pytest.fixture
def direct_pixel_convs(monkeypatch):
    """Every pixel-vectorised conv built as a direct one, none as row Winograd
    (`tvm_row_winograd`): for the tests of the pixel conv's own compute and schedule."""
    from rwdeploy.runtime import tvm_row_winograd

    monkeypatch.setattr(tvm_row_winograd, "choose_row_winograd", lambda *layer: None)
