"""Wall-clock latency of a callable: warm-up, then timed runs until a count and a time are reached.

Measurers never mutate the model they time; they call a prepared `run()` closure.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    n: int
    warmup: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_samples(cls, samples_s: list[float], warmup: int) -> "LatencyStats":
        ms = sorted(s * 1e3 for s in samples_s)
        p90 = ms[min(len(ms) - 1, int(round(0.9 * (len(ms) - 1))))]
        return cls(statistics.median(ms), p90, ms[0], statistics.fmean(ms), len(ms), warmup)


@dataclass(frozen=True)
class LatencyRow:
    """One row of the report's `latency` section: one variant of the model, timed at one batch
    size in one runtime. ONNX Runtime, TVM in this process and TVM on a device all make these."""

    runtime: str  # "onnxruntime" | "tvm"
    target: str  # the compile's --target
    variant: str  # "original" | "slim" | "quantized"
    batch: int
    threads: int | None  # None: the device's own setting
    stats: LatencyStats
    interleaved: bool = True  # timed call by call in alternation with the other variants of its batch
    emulated: bool = False  # on the emulated aarch64 device: not the latency of real hardware
    device: str | None = None  # where it ran when not in this process (an RPC address)
    provider: str | None = None  # ONNX Runtime's execution provider
    max_abs_err: float | None = None  # its output vs torch at this input, where checked when timed
    max_rel_err: float | None = None
    with_other_runtime: bool = False  # timed in the same turns as the other runtime's calls

    def to_dict(self) -> dict[str, Any]:
        head = {"runtime": self.runtime, "target": self.target, "variant": self.variant, "batch": self.batch}
        tail = {k: v for k, v in asdict(self).items() if k not in head and k != "stats"}
        return {**head, **self.stats.to_dict(), **tail}


def time_callable(
    run: Callable[[], Any],
    *,
    warmup: int = 5,
    min_runs: int = 20,
    max_runs: int = 1000,
    min_time_s: float = 0.5,
) -> LatencyStats:
    """Time `run()`; keeps going past `min_runs` until `min_time_s` has passed (or `max_runs`).

    A floor on both count and time keeps medians stable for fast models without making
    slow ones take forever.
    """
    for _ in range(warmup):
        run()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_runs:
        t0 = time.perf_counter()
        run()
        samples.append(time.perf_counter() - t0)
        if len(samples) >= min_runs and time.perf_counter() - start >= min_time_s:
            break
    return LatencyStats.from_samples(samples, warmup)


def time_interleaved(
    runs: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 5,
    min_runs: int = 20,
    max_runs: int = 1000,
    min_time_s: float = 0.5,
    calls_per_turn: int = 1,
) -> dict[str, LatencyStats]:
    """Time several callables in alternation (a, b, a, b, ...), one turn at a time.

    On a shared machine the load changes from second to second; timing one model for a while
    and then the other lets that drift decide the comparison. Alternating turns exposes every
    candidate to the same conditions, so their ratio is what the models differ by.
    `min_runs`/`max_runs` count timed calls of each; `min_time_s` is the whole loop's floor.
    With `calls_per_turn` 1 a turn is one timed call, which starts with the caches the other
    candidates left; with k > 1 it is one untimed call, then k timed ones: each candidate's
    steady state, as when it runs alone (what a deployed model sees), still interleaved.
    """
    for _ in range(warmup):
        for run in runs.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    start, timed = time.perf_counter(), 0
    while timed < max_runs:
        for name, run in runs.items():
            if calls_per_turn > 1:
                run()
            for _ in range(calls_per_turn):
                t0 = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - t0)
        timed += calls_per_turn
        if timed >= min_runs and time.perf_counter() - start >= min_time_s:
            break
    return {name: LatencyStats.from_samples(s, warmup) for name, s in samples.items()}
