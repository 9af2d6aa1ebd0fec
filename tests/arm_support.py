"""Shared by test_arm_emulator.py and test_rpc.py: the emulated device and small aarch64 builds.

The emulator is provisioned once per machine (cached under $RWDEPLOY_A64_HOME or
~/.cache/rwdeploy/a64); the project's set-up script does that before the tests run. Without
qemu or network the tests skip locally but fail in CI (CI=1), where this path must run.
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from rwdeploy.errors import ToolchainError
from rwdeploy.runtime import arm_emulator


def provisioned_home() -> arm_emulator.EmulatorHome:
    try:
        return arm_emulator.provision()
    except ToolchainError as err:
        if os.environ.get("CI"):
            pytest.fail(f"arm emulator provisioning failed in CI: {err.one_line()}")
        pytest.skip(f"arm emulator unavailable: {err.one_line()}")


def small_cnn(width: int, seed: int = 0) -> nn.Module:
    """A small conv net; `width` filters in the first conv, 2*width in the second."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 4 * 4, 10),
    ).eval()


def example_input(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 1, 16, 16)).astype(np.float32)


def torch_output(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@functools.lru_cache(maxsize=None)
def build_small_cnn(width: int, target: str) -> Path:
    """`small_cnn(width)` built by the product's TVM build for `target` ("arm" or "cpu"):
    `model.<target>.so` in a temporary folder, built once per test session."""
    from rwdeploy.runtime import tvm_build

    out = Path(tempfile.mkdtemp(prefix=f"rwdeploy-cnn{width}-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    return tvm_build.build(small_cnn(width), torch.from_numpy(example_input()), target, out_dir=out).path
