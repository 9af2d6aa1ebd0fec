"""Wall-clock latency of a callable: warm-up, then timed runs until a count and a time are reached.

Measurers never mutate the model they time; they call a prepared `run()` closure.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable


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
