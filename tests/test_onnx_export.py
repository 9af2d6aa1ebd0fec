"""ONNX export and ONNX Runtime: round trip against torch, validity, no mutation."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from rwdeploy.runtime.onnx_export import MAX_ORT_IR_VERSION, MIN_OPSET, export_onnx
from rwdeploy.runtime.ort_runner import OrtRunner


class SmallNet(nn.Module):
    """conv-BN-ReLU, a residual add, pooling, flatten into Linear: the compile pipeline's ops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = y + self.conv2(y)
        return self.fc(torch.flatten(self.pool(y), 1))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = SmallNet()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong BN export would show
        net.bn1.running_mean.uniform_(-1, 1)
        net.bn1.running_var.uniform_(0.5, 2)
    return net.eval()


def _rel_err(ref: torch.Tensor, got: np.ndarray) -> float:
    return float((ref - torch.from_numpy(got)).abs().max() / ref.abs().max())


@pytest.mark.parametrize("batch", [1, 3])
def test_ort_output_matches_torch(tmp_path, batch):
    net = _net()
    info = export_onnx(net, torch.randn(1, 3, 8, 8), tmp_path / "net.onnx")
    x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch))
    got = OrtRunner(info.path, threads=1).run(x.numpy())
    with torch.no_grad():
        ref = net(x)
    assert got.shape == tuple(ref.shape)  # the batch dimension is dynamic
    assert _rel_err(ref, got) < 1e-5


def test_file_is_valid_for_ort(tmp_path):
    info = export_onnx(_net(), torch.randn(1, 3, 8, 8), tmp_path / "net.onnx")
    model = onnx.load(info.path)
    onnx.checker.check_model(model, full_check=True)
    assert info.opset >= MIN_OPSET
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [info.opset]
    assert model.ir_version <= MAX_ORT_IR_VERSION
    # Weights live inside the file: no external data references, and the size accounts for them.
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    n_params = sum(p.numel() for p in _net().parameters())
    assert info.size_bytes >= 4 * n_params
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]


def test_export_does_not_mutate(tmp_path):
    net = _net().train()  # training mode: an exporter that ran it would update BN statistics
    before = {k: v.clone() for k, v in net.state_dict().items()}
    export_onnx(net, torch.randn(2, 3, 8, 8), tmp_path / "net.onnx")
    assert net.training and net.bn1.training
    after = net.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    # The file holds the eval-mode function (running statistics), as a deployed model must.
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = _net()(x)
    assert _rel_err(ref, OrtRunner(tmp_path / "net.onnx").run(x.numpy())) < 1e-5


def test_export_of_torch_export_module(tmp_path):
    """A module unlifted from torch.export (as `.pt2` files load) refuses train(); it still exports."""
    net = _net()
    program = torch.export.export(net, (torch.randn(2, 3, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    unlifted = program.module()
    export_onnx(unlifted, torch.randn(1, 3, 8, 8), tmp_path / "ep.onnx")
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref = net(x)
    assert _rel_err(ref, OrtRunner(tmp_path / "ep.onnx").run(x.numpy())) < 1e-5


def test_measure_records_runs_and_threads(tmp_path):
    info = export_onnx(_net(), torch.randn(1, 3, 8, 8), tmp_path / "net.onnx")
    runner = OrtRunner(info.path, threads=1)
    stats = runner.measure(np.zeros((2, 3, 8, 8), np.float32), warmup=2, runs=7, min_time_s=0)
    assert stats.n == 7 and stats.warmup == 2
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms
    assert runner.threads == 1
    assert runner.session.get_session_options().intra_op_num_threads == 1


def test_interleaved_timing_alternates_calls():
    from rwdeploy.runtime.latency import time_interleaved

    calls: list[str] = []
    stats = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                             warmup=2, min_runs=5, max_runs=9, min_time_s=0)
    assert calls == ["a", "b"] * 7  # 2 warm-up rounds, then 5 timed ones, strictly alternating
    assert stats["a"].n == stats["b"].n == 5 and stats["a"].warmup == 2

