"""What `compile --align auto` gives the channel-removal pass: the target's vector width, and a
measurer that times a channel group's layers at each candidate channel count in ONNX Runtime.

`OrtLayerTimer()(cases)`: `cases` = {kept count: [(layer name, nn.Module, input shape)]} (built by
`passes/channel_alignment.layer_cases`). Every layer of every candidate is exported to ONNX
(`export_onnx`, static batch) and loaded in an `OrtRunner`; a candidate's call runs its layers one
after another, and the candidates are timed call by call in alternation (`time_interleaved`), so
a shared machine's load cannot decide between them. Returns {kept count: {"median_ms", "p90_ms",
"n"}}; `where` names the runtime (and says when it is a proxy for the compile's target).

`OrtModelTimer` / `TvmModelTimer` time whole candidate models for the whole-model choice: the
first in ONNX Runtime (`--target onnx`), the second as rwdeploy's own TVM build for this host
(`--target cpu`), what that compile ships.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from rwdeploy.runtime.latency import time_interleaved
from rwdeploy.runtime.onnx_export import export_onnx
from rwdeploy.runtime.ort_runner import OrtRunner

LayerCase = tuple[str, nn.Module, Sequence[int]]


def host_lanes() -> int:
    """float32 lanes of this host's widest vector unit (AVX-512: 16, AVX/AVX2: 8, else 4), from
    /proc/cpuinfo (no TVM import)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 4
    flags = set(re.findall(r"\b(avx512f|avx2|avx)\b", text))
    return 16 if "avx512f" in flags else 8 if flags else 4


def target_lanes(target: str) -> int:
    """The channel multiple `--align auto` rounds to for a compile target: the host's lanes for
    the targets that run here (cpu, onnx), 4 for the arm family (NEON, 128-bit), 32 for gpu (a warp)."""
    from rwdeploy.runtime.targets import TARGETS

    family = TARGETS[target].family if target in TARGETS else "cpu"
    return {"arm": 4, "gpu": 32}.get(family, host_lanes())


class OrtLayerTimer:
    """Times candidates' layers in ONNX Runtime (CPU provider) on this host (see the module doc)."""

    def __init__(self, target: str = "onnx", *, threads: int = 1, warmup: int = 3, min_runs: int = 10,
                 max_runs: int = 300, min_time_s: float = 0.15) -> None:
        self.target, self.threads = target, threads
        self.warmup, self.min_runs, self.max_runs, self.min_time_s = warmup, min_runs, max_runs, min_time_s
        self.where = f"onnxruntime CPUExecutionProvider on this host, {threads} thread(s)"
        if target not in ("onnx", "cpu"):
            self.where += f" (proxy: target {target!r} is not measured here)"
        elif target == "cpu":
            self.where += " (proxy for the TVM build)"

    def __call__(self, cases: dict[int, list[LayerCase]]) -> dict[int, dict[str, Any]]:
        calls = {}
        with tempfile.TemporaryDirectory(prefix="rwdeploy-align-") as tmp:
            for count, layers in cases.items():
                runs = []
                for i, (_, module, shape) in enumerate(layers):
                    x = torch.randn(*shape)
                    path = Path(tmp) / f"k{count}_{i}.onnx"
                    export_onnx(module, x, path, dynamic_batch=False)
                    runs.append(OrtRunner(path, threads=self.threads).bind(x.numpy().astype(np.float32)))
                calls[str(count)] = _sequence(runs)
        stats = time_interleaved(calls, warmup=self.warmup, min_runs=self.min_runs, max_runs=self.max_runs,
                                 min_time_s=self.min_time_s)
        return {int(k): {"median_ms": s.median_ms, "p90_ms": s.p90_ms, "n": s.n} for k, s in stats.items()}


def _sequence(runs: list[Any]) -> Any:
    def call() -> None:
        for run in runs:
            run()
    return call


class OrtModelTimer:
    """Times whole candidate models in ONNX Runtime (CPU provider) on this host, for `--align auto`'s
    whole-model choice (`passes/whole_model_alignment.py`): `timer({name: nn.Module})` exports each
    to ONNX at `example`'s shape (static batch), and calls them all in alternation (`time_interleaved`)
    for at least `min_time_s` per model in all. Returns {name: {"median_ms", "p90_ms", "n"}}."""

    def __init__(self, example: torch.Tensor, target: str = "onnx", *, threads: int = 1, warmup: int = 3,
                 min_runs: int = 10, max_runs: int = 2000, min_time_s: float = 0.5) -> None:
        self.example, self.threads = example, threads
        self.warmup, self.min_runs, self.max_runs, self.min_time_s = warmup, min_runs, max_runs, min_time_s
        self.where = (f"onnxruntime CPUExecutionProvider on this host, {threads} thread(s), "
                      f"batch {int(example.shape[0])}, whole models interleaved")

    def __call__(self, models: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
        x = self.example.numpy().astype(np.float32)
        calls = {}
        with tempfile.TemporaryDirectory(prefix="rwdeploy-align-model-") as tmp:
            for i, (name, module) in enumerate(models.items()):
                path = Path(tmp) / f"m{i}.onnx"
                export_onnx(module, self.example, path, dynamic_batch=False)
                calls[name] = OrtRunner(path, threads=self.threads).bind(x)
            stats = time_interleaved(calls, warmup=self.warmup, min_runs=self.min_runs, max_runs=self.max_runs,
                                     min_time_s=self.min_time_s * len(models))
        return {name: {"median_ms": s.median_ms, "p90_ms": s.p90_ms, "n": s.n} for name, s in stats.items()}


class TvmModelTimer:
    """Times whole candidate models as rwdeploy's TVM build for `target` (a target that runs on
    this host: cpu) for `--align auto`'s whole-model choice: `timer({name: nn.Module})` builds each
    at `example`'s shape (`runtime.tvm_build.build`, the build `compile --target cpu` ships) and
    calls them all in alternation (`time_interleaved`) for at least `min_time_s` per model in all.

    ONNX Runtime is no proxy for this choice: its kernels and TVM's waste different lanes on the
    same channel count (slim ResNet-18 70 %, Xeon: the channels ONNX Runtime's timing kept made
    the TVM build 1.25 ms where the unaligned model ran 1.11). `progress(message)` is told before
    each build (they take seconds each). Returns {name: {"median_ms", "p90_ms", "n"}}."""

    def __init__(self, example: torch.Tensor, target: str = "cpu", *, threads: int = 1, warmup: int = 3,
                 min_runs: int = 10, max_runs: int = 2000, min_time_s: float = 0.5,
                 progress: Any = None) -> None:
        self.example, self.target, self.threads = example, target, threads
        self.warmup, self.min_runs, self.max_runs, self.min_time_s = warmup, min_runs, max_runs, min_time_s
        self.progress = progress
        self.where = (f"rwdeploy's TVM build for target {target!r} on this host, {threads} thread(s), "
                      f"batch {int(example.shape[0])}, whole models interleaved")

    def __call__(self, models: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
        from rwdeploy.runtime import tvm_build

        calls = {}
        for i, (name, module) in enumerate(models.items()):
            if self.progress is not None:
                self.progress(f"building candidate {i + 1}/{len(models)} ({name}) with TVM")
            artifact = tvm_build.build(module, self.example, self.target, threads=self.threads)
            calls[name], _ = tvm_build.bind_local(artifact, self.example)
        stats = time_interleaved(calls, warmup=self.warmup, min_runs=self.min_runs, max_runs=self.max_runs,
                                 min_time_s=self.min_time_s * len(models))
        return {name: {"median_ms": s.median_ms, "p90_ms": s.p90_ms, "n": s.n} for name, s in stats.items()}
