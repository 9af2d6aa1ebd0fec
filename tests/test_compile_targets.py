"""Never lose what succeeded: a target step that fails (TVM cannot import the model, TVM or a cross
compiler missing, the device unreachable) leaves the verified slim model and the report, and
exits with status 4; `--target onnx` compiles without TVM at all.

All failures here are real: an op TVM's importer lacks, a `tvm` package that cannot be imported,
a port where nothing listens.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rwdeploy import models
from rwdeploy.cli import main
from rwdeploy.errors import TargetStepError
from rwdeploy.io import Checkpoint, save_checkpoint
from rwdeploy.passes.verify import compare
from rwdeploy.runtime.ort_runner import OrtRunner
from rwdeploy.runtime.targets import get_target

VERIFIED = ["original.onnx", "report.json", "report.md", "slim.onnx", "slim.pt2"]
QUICK = ["--no-measure", "--batch", "1", "--sparse", "off"]


@pytest.fixture(scope="module")
def lenet_checkpoint(tmp_path_factory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    net = models.create("lenet5")
    with torch.no_grad():
        net.conv1.weight[::2] = 0  # half of conv1's filters: something to remove
    path = tmp_path_factory.mktemp("model") / "lenet5.pt"
    save_checkpoint(Checkpoint("lenet5", net.state_dict(), (1, 1, 28, 28)), path)
    return path, net.eval()


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _slim_onnx_computes(net: nn.Module, folder: Path, shape: tuple[int, ...]) -> None:
    """Independent of the pipeline's own checks: the shipped slim.onnx against the model itself."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = net(x)
    assert compare(ref, OrtRunner(folder / "slim.onnx").run(x.numpy()), tolerance=1e-4).passed


def _compile_pickled(net: nn.Module, tmp_path: Path, *options: str) -> tuple[int, Path]:
    """`rwdeploy compile` of `net` pickled, at input 1x3x8x8: the exit code and the output folder."""
    path, out = tmp_path / "net.pt", tmp_path / "out"
    torch.save(net, path)
    code = main(["compile", str(path), "--trust-pickle", "--input-shape", "1,3,8,8", "--out", str(out), *options, *QUICK])
    return code, out


class RReLUHead(nn.Module):
    """A conv net whose activation is nn.RReLU: torch.export keeps it as
    aten.rrelu_with_noise_functional, an op TVM 0.27's Relax importer has no converter for (nor
    has rwdeploy); ONNX exports it as LeakyRelu."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.RReLU()
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x))).mean(dim=(2, 3))


def test_tvm_import_failure_keeps_the_verified_model(tmp_path, capsys):
    torch.manual_seed(0)
    net = RReLUHead().eval()
    with torch.no_grad():
        net.conv2.weight[::2] = 0
    code, out = _compile_pickled(net, tmp_path)
    captured = capsys.readouterr()
    assert code == TargetStepError.exit_code == 4, captured.err
    assert _files(out) == VERIFIED  # no half-built model.cpu.so / original.cpu.so
    _slim_onnx_computes(net, out, (3, 3, 8, 8))
    report = json.loads((out / "report.json").read_text())
    failure = report["target_failure"]
    assert failure["stage"] == "tvm_build" and failure["target"] == "cpu"
    assert "rrelu_with_noise_functional" in failure["error"] and failure["node"] in failure["error"]
    assert "--target onnx" in failure["hint"] and "tvm_convert.py" in failure["hint"]
    assert report["verification"]["passed"] and report["layers"]  # the rest of the report is there
    # The terminal summary says it in one line: the step, the op at its node, what to do.
    line = [ln for ln in captured.out.splitlines() if "FAILED" in ln]
    assert len(line) == 1 and "tvm_build" in line[0] and failure["node"] in line[0] and "--target onnx" in line[0]
    assert captured.err.strip().splitlines()[-1].startswith("rwdeploy: error: target step 'tvm_build'")
    assert "## Target step failed" in (out / "report.md").read_text()


def test_target_onnx_compiles_without_tvm(lenet_checkpoint, tmp_path):
    """A `tvm` that cannot even be imported does not matter to --target onnx."""
    path, net = lenet_checkpoint
    blocked = tmp_path / "no-tvm"
    (blocked / "tvm").mkdir(parents=True)
    (blocked / "tvm" / "__init__.py").write_text("raise ImportError('TVM is blocked by this test')\n")
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocked), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "rwdeploy", "compile", str(path), "--target", "onnx", "--out",
                           str(out), "--runs", "3", "--warmup", "1", "--min-time", "0", "--batch", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert _files(out) == VERIFIED
    _slim_onnx_computes(net, out, (2, 1, 28, 28))
    report = json.loads((out / "report.json").read_text())
    assert report["compile"]["target"] == "onnx" and "targets" not in report and "target_failure" not in report
    assert {(r["runtime"], r["variant"]) for r in report["latency"]} == {("onnxruntime", "original"),
                                                                         ("onnxruntime", "slim")}
    assert "sparse" not in report  # --sparse auto times TVM kernels: nothing to time without TVM
    # ...while a TVM target with that same unusable TVM keeps the verified model and says why.
    out_cpu = tmp_path / "cpu"
    proc = subprocess.run([sys.executable, "-m", "rwdeploy", "compile", str(path), "--out", str(out_cpu), *QUICK],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 4, proc.stderr
    assert _files(out_cpu) == VERIFIED
    failure = json.loads((out_cpu / "report.json").read_text())["target_failure"]
    assert failure["stage"] == "tvm_build" and "TVM is blocked by this test" in failure["error"]


def test_missing_cross_compiler_keeps_the_verified_model(lenet_checkpoint, tmp_path, capsys):
    if get_target("android-arm64").check("build"):
        pytest.skip("the Android NDK is installed here: nothing is missing")
    out = tmp_path / "out"
    assert main(["compile", str(lenet_checkpoint[0]), "--target", "android-arm64", "--out", str(out), *QUICK]) == 4
    assert _files(out) == VERIFIED
    failure = json.loads((out / "report.json").read_text())["target_failure"]
    assert "Android NDK" in failure["error"] and "rwdeploy targets" in failure["hint"]
    assert "rwdeploy: error: target step 'tvm_build'" in capsys.readouterr().err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the with-block ends: nothing listens there


def test_unreachable_device_keeps_the_built_libraries(lenet_checkpoint, tmp_path):
    """The build succeeded, the measurement could not run: the arm libraries stay."""
    if not get_target("arm").check("build"):
        pytest.skip("aarch64 cross compiler missing (scripts/setup.sh test installs it)")
    out = tmp_path / "out"
    port = _closed_port()
    assert main(["compile", str(lenet_checkpoint[0]), "--target", "arm", "--rpc", f"127.0.0.1:{port}",
                 "--out", str(out), "--runs", "1", "--warmup", "0", "--min-time", "0", "--batch", "1",
                 "--sparse", "off"]) == 4
    assert _files(out) == sorted([*VERIFIED, "model.arm.so", "original.arm.so"])
    report = json.loads((out / "report.json").read_text())
    failure = report["target_failure"]
    assert failure["stage"] == "arm_measure" and f"127.0.0.1:{port} refused the connection" in failure["error"]
    assert {b["variant"] for b in report["targets"]["arm"]["builds"]} == {"original", "slim"}
    assert report["files"]["tvm_module"]["path"] == "model.arm.so"


def test_target_options_of_onnx(lenet_checkpoint, tmp_path, capsys):
    code = main(["compile", str(lenet_checkpoint[0]), "--target", "onnx", "--tune", "4", "--out", str(tmp_path / "o")])
    assert code == 2 and "--target onnx builds none" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


class PerSampleKernels(nn.Module):
    """CondConv's trick: each sample mixes its own kernel from experts, and one grouped conv with
    `groups` = batch size applies them all. ONNX's Conv takes `group` as a constant, so no file
    with a dynamic batch can hold this; one at a fixed batch can."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.route = nn.Linear(8, 2)
        self.experts = nn.Parameter(torch.randn(2, 6 * 8 * 3 * 3) * 0.2)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        b = x.shape[0]
        mix = torch.sigmoid(self.route(x.mean(dim=(2, 3))))  # (b, experts)
        kernels = (mix @ self.experts).view(b * 6, 8, 3, 3)
        y = nn.functional.conv2d(x.reshape(1, b * 8, *x.shape[2:]), kernels, padding=1, groups=b)
        return self.head(y.view(b, 6, *y.shape[2:]).mean(dim=(2, 3)))


def test_onnx_fixes_the_batch_where_a_dynamic_one_cannot_export(tmp_path, capfd):
    torch.manual_seed(0)
    net = PerSampleKernels().eval()
    with torch.no_grad():
        net.stem.weight[::2] = 0
    code, out = _compile_pickled(net, tmp_path, "--target", "onnx")
    captured = capfd.readouterr()
    assert code == 0, captured.err
    assert "Torch IR graph" not in captured.out + captured.err  # the exporter's failed attempt stays quiet
    report = json.loads((out / "report.json").read_text())
    assert report["trace"]["onnx_fixed_batch"]["batch"] == 1
    assert not report["files"]["slim_onnx"]["dynamic_batch"] and report["verification"]["passed"]
    assert "fix the batch at 1" in captured.out
    _slim_onnx_computes(net, out, (1, 3, 8, 8))  # independent check, at the batch the file fixes
