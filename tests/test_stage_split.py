"""How benchmarks/stages.py cuts a model into stages: the chain of stages computes the model's
output (a flatten put before the first Linear where the forward flattens), a stage starts at each
child holding a conv or Linear, and a model whose top level is not a chain is refused; and its
cold-cache timing (a memory write before each call, outside the timed part)."""
from __future__ import annotations

import time

import pytest
import torch
from conftest import benchmark_module
from torch import nn


@pytest.fixture(scope="module")
def stages_mod():
    with benchmark_module("stages") as mod:
        yield mod


class Flattening(nn.Module):
    """Children in order, a Sequential among them, and a flatten in forward before the Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(8, 4, 1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.act(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.conv(x))


def test_stages_chain_to_the_models_output(stages_mod):
    torch.manual_seed(0)
    model = Flattening().eval()
    with torch.no_grad():  # trained-looking statistics, so a dropped batch norm would show
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    stages = stages_mod.split_stages(model, x)
    assert [name for name, _ in stages] == ["conv1+bn1+act", "body.0+body.1+body.2", "body.3+body.4+pool+flatten",
                                            "fc"]
    y = x
    with torch.no_grad():
        for _, stage in stages:
            y = stage(y)
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-6)


def test_a_model_whose_top_level_is_not_a_chain_is_refused(stages_mod):
    with pytest.raises(SystemExit, match="not a chain of its children"):
        stages_mod.split_stages(Residual().eval(), torch.randn(1, 4, 6, 6))


def test_cold_timing_flushes_before_every_call_and_times_only_the_call(stages_mod):
    events: list[str] = []

    def flush() -> None:
        events.append("flush")
        time.sleep(0.01)  # far longer than the calls: timing it would show in every sample

    calls = {"a": lambda: events.append("a"), "b": lambda: events.append("b")}
    stats = stages_mod.time_after_flush(calls, flush, min_runs=4, min_time_s=0.0)
    assert events[:2] == ["a", "b"]  # one untimed first call each
    timed = events[2:]
    assert timed == ["flush", "a", "flush", "b"] * (len(timed) // 4) and len(timed) >= 16
    assert {name: s.n for name, s in stats.items()} == {"a": len(timed) // 4, "b": len(timed) // 4}
    assert max(s.median_ms for s in stats.values()) < 5.0


def test_memory_writer_writes_the_whole_buffer(stages_mod):
    write = stages_mod.MemoryWriter(8 << 10)
    assert write.buffer.nbytes == 8 << 10
    write()
    write()
    assert (write.buffer == 2.0).all()
