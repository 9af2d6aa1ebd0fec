"""Per-layer format choice for arm targets, measured on the arm device instead of the host.

`arm_layer_timer(target, rpc=..., tracker=..., key=...)` returns a *timer* with the contract of
`pack_sparse`'s injected `timer`: layers -> {layer: {alternative: stats}}. Every alternative of
every layer (dense, CSR, each BSR block shape; `runtime.layer_formats.Candidate`) is built as a
Relax function into ONE library for the arm target, exactly as the artifact's kernels are
built, and then measured where the artifact will run:

- a board (`rpc` or `tracker` + `key`): the library is uploaded and each function timed with
  TVM's time_evaluator there; stats are real latency, `cost` = median ms.
- no board: the emulated aarch64 device (qemu-user, `runtime.arm_emulator`): each function's
  aarch64 instructions per call, counted by the qemu plugin (two runs per function, start-up
  removed: deterministic to a few instructions); `cost` = instructions. Latency under qemu is
  not ARM latency, so it only rides along as `median_ms` with `emulated: True`.
- neither usable (emulator not provisioned, no board): the host's TVM timings, the documented
  fallback; the timer's `where` says so, and so does every stat (`fallback: True`).

`where` (on the returned timer) is the sentence a report shows for "measured on".
The device backends are injectable (`counter`, `board`) so that the choice logic can be tested
without a device.
"""
from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from rwdeploy.runtime.layer_formats import Candidate, Layers, build_candidates, by_layer, candidates_of

# (library, function, input) -> (instructions per call, emulated ms per call)
Counter = Callable[[Path, str, np.ndarray], tuple[int, float]]
# (library, [(function, input)]) -> {function: (median_ms, min_ms, n)}
Board = Callable[[Path, Sequence[tuple[str, np.ndarray]]], dict[str, tuple[float, float, int]]]

INSTRUCTIONS = "aarch64 instructions"


class LayerTimer:
    """A pack_sparse timer with a description of where it measures."""

    def __init__(self, measure: Callable[[Layers], dict[str, dict[str, dict]]], where: str) -> None:
        self._measure = measure
        self.where = where

    def __call__(self, layers: Layers) -> dict[str, dict[str, dict]]:
        return self._measure(layers)


def emulator_counter() -> Counter:
    """Instruction counts on the emulated aarch64 device (`arm_emulator.count_instructions`)."""
    from rwdeploy.runtime import arm_emulator

    def count(lib: Path, function: str, x: np.ndarray) -> tuple[int, float]:
        c = arm_emulator.count_instructions(lib, x, iterations=(0, 1), repeats=1, function=function)
        return c.per_inference, c.emulated_ms_per_inference

    return count


def rpc_board(rpc: str | None, tracker: str | None, key: str | None, repeat: int = 15) -> Board:
    """Latency of each function on a board over TVM RPC (one upload for all)."""
    def run(lib: Path, calls: Sequence[tuple[str, np.ndarray]]) -> dict[str, tuple[float, float, int]]:
        import tvm
        from tvm import relax

        from rwdeploy.runtime.rpc import Device, _load_remote

        device = Device(rpc=rpc, tracker=tracker, key=key)
        session = device.connect()
        vm = relax.VirtualMachine(_load_remote(session, lib, device), session.cpu())
        out = {}
        for function, x in calls:
            xt = tvm.runtime.tensor(x, session.cpu())
            vm[function](xt)                                   # warm-up: first-call allocations
            res = sorted(vm.time_evaluator(function, session.cpu(), number=1, repeat=repeat,
                                           min_repeat_ms=0)(xt).results)
            out[function] = (float(np.median(res)) * 1e3, res[0] * 1e3, len(res))
        return out

    return run


def _inputs(cands: Sequence[Candidate]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {c.function: rng.standard_normal(c.input_shape()).astype(np.float32) for c in cands}


def _export(cands: Sequence[Candidate], target: Any, folder: Path) -> Path:
    """All candidates as one library for the arm target (the artifact's build and compiler)."""
    from rwdeploy.runtime.tvm_build import TvmArtifact, export

    executable = build_candidates(cands, target.tvm())
    art = TvmArtifact(target=target, path=None, build_s=0.0, export_s=0.0, size_bytes=None,
                      device_modules=[], executable=executable)
    return export(art, folder / "layer_candidates.so")


def _measure_counts(cands: Sequence[Candidate], lib: Path, counter: Counter, workers: int) -> dict[str, dict]:
    xs = _inputs(cands)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:   # qemu runs are single-threaded
        counts = list(pool.map(lambda c: counter(lib, c.function, xs[c.function]), cands))
    return {c.key: {"cost": float(n), "unit": INSTRUCTIONS, "insns": int(n), "median_ms": ms, "min_ms": ms,
                    "n": 1, "emulated": True} for c, (n, ms) in zip(cands, counts)}


def _measure_board(cands: Sequence[Candidate], lib: Path, board: Board) -> dict[str, dict]:
    xs = _inputs(cands)
    timed = board(lib, [(c.function, xs[c.function]) for c in cands])
    return {c.key: {"cost": timed[c.function][0], "unit": "ms", "median_ms": timed[c.function][0],
                    "min_ms": timed[c.function][1], "n": timed[c.function][2], "emulated": False}
            for c in cands}


def arm_layer_timer(target: str = "arm", *, rpc: str | None = None, tracker: str | None = None,
                    key: str | None = None, counter: Counter | None = None, board: Board | None = None,
                    workers: int | None = None) -> LayerTimer:
    """The per-layer format timer for an arm-family target (see the module doc)."""
    from rwdeploy.runtime import arm_emulator
    from rwdeploy.runtime.targets import get_target

    tgt = get_target(target)
    if board is None and (rpc is not None or tracker is not None):
        board = rpc_board(rpc, tracker, key)
    if board is not None:
        label = rpc if rpc else (f"{key}@{tracker}" if tracker else "the given board")
        where = f"arm device {label} over TVM RPC: latency of each layer's kernels built for {tgt.name}"
    elif counter is not None or arm_emulator.is_provisioned(arm_emulator.home()):
        counter = counter or emulator_counter()
        where = (f"emulated aarch64 device (qemu-user): {INSTRUCTIONS} per call of each layer's kernels "
                 f"built for {tgt.name} (emulated latency is not ARM latency)")
    else:
        return host_fallback_timer(target, reason="no --rpc/--tracker board and the arm emulator is not "
                                                  "provisioned (`rwdeploy device arm-emulator provision`)")

    def measure(layers: Layers) -> dict[str, dict[str, dict]]:
        cands = candidates_of(layers)
        with tempfile.TemporaryDirectory(prefix="rwdeploy-layers-") as tmp:
            lib = _export(cands, tgt, Path(tmp))
            if board is not None:
                values = _measure_board(cands, lib, board)
            else:
                values = _measure_counts(cands, lib, counter, workers or os.cpu_count() or 1)
        return by_layer(cands, values)

    return LayerTimer(measure, where)


def host_fallback_timer(target: str, reason: str) -> LayerTimer:
    """The host's timings standing in for an arm device (documented fallback)."""
    from rwdeploy.runtime import tvm_sparse
    from rwdeploy.runtime.layer_formats import measure_layer_formats

    cpu = tvm_sparse.host_target()

    def measure(layers: Layers) -> dict[str, dict[str, dict]]:
        out = measure_layer_formats(layers, cpu)
        for alts in out.values():
            for stats in alts.values():
                stats["fallback"] = True
        return out

    return LayerTimer(measure, f"host {cpu.attrs.get('mcpu', 'cpu')} via TVM, {tvm_sparse.threads()} threads "
                               f"(fallback for target {target!r}: {reason})")
