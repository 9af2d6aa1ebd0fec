"""Measuring the `arm` targets' libraries: on a device over TVM RPC, or on the emulated one.

With `--rpc HOST:PORT` (or `--tracker HOST:PORT --key KEY`) the built libraries run on that
device. Without either, they run on the emulated aarch64 device (`arm_emulator`), and every
result says `emulated: true`; beside the emulated latency go aarch64 instructions per
inference, the figure that is reproducible across machines and runs.

If `arm_device` had to start the emulator, it stops it again afterwards, so a compile leaves no
process behind; an emulator the user started (`rwdeploy device arm-emulator start`) is reused
and left running. The compile stage that uses this is `rwdeploy.tvm_stages.stage_arm_measure`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from rwdeploy.runtime import arm_emulator
from rwdeploy.runtime.latency import LatencyRow
from rwdeploy.runtime.rpc import Device, RemoteMeasurement, measure_remote_all

Progress = Callable[[str], None]


@dataclass(frozen=True)
class ArmVariant:
    """One built library to measure: `variant` is original | slim | packed."""

    variant: str
    library: Path
    reference_output: np.ndarray


@dataclass
class ArmResult:
    variant: str
    target: str
    batch: int
    threads: int | None
    measurement: RemoteMeasurement
    instructions: arm_emulator.InstructionCount | None

    def latency_row(self) -> LatencyRow:
        """A row of the report's `latency` section."""
        m = self.measurement
        return LatencyRow("tvm", self.target, self.variant, self.batch, self.threads, m.latency,
                          emulated=m.emulated, device=m.device, max_abs_err=m.max_abs_err, max_rel_err=m.max_rel_err)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"variant": self.variant, "target": self.target, "batch": self.batch,
                               "threads": self.threads, **self.measurement.to_dict()}
        if self.instructions is not None:
            out["instructions"] = self.instructions.to_dict()
        return out


@contextlib.contextmanager
def arm_device(
    rpc: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
    *,
    progress: Progress = lambda _: None,
) -> Iterator[tuple[Device, int | None]]:
    """The device to measure on, and its thread count when known (the emulator's)."""
    if rpc is not None or tracker is not None:
        yield Device(rpc=rpc, tracker=tracker, key=key), None
        return
    progress("no --rpc/--tracker given: measuring on the emulated aarch64 device (qemu-user); "
             "its latency is emulated, not ARM latency: compare the instruction counts")
    before = arm_emulator.status()
    st = before if before.running else arm_emulator.start(progress=progress)
    # A server registered with a tracker takes only tracker-brokered sessions.
    device = Device(tracker=st.tracker, key=st.key, emulated=True) if st.tracker else \
        Device(rpc=st.address, emulated=True)
    try:
        yield device, st.threads
    finally:
        if not before.running:
            arm_emulator.stop()
            progress("stopped the emulated device (start it with `rwdeploy device arm-emulator start` "
                     "to keep it between runs)")


def measure_arm(
    variants: list[ArmVariant],
    example_input: np.ndarray,
    *,
    target: str = "arm",
    rpc: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
    tolerance: float = 1e-4,
    count_instructions: bool | None = None,
    repeat: int = 15,
    progress: Progress = lambda _: None,
) -> list[ArmResult]:
    """Measure every variant (timed in alternation, outputs checked to `tolerance`); instruction
    counts by default only on the emulated device.

    `count_instructions=True` also counts them when a real device is given (the emulator must
    be provisioned for that; it is what runs the counting).
    """
    x = np.ascontiguousarray(example_input, dtype=np.float32)
    results = []
    with arm_device(rpc, tracker, key, progress=progress) as (device, threads):
        count = device.emulated if count_instructions is None else count_instructions
        progress(f"{target}: running {', '.join(v.library.name for v in variants)} on {device.label}"
                 f"{' (emulated)' if device.emulated else ''}")
        measured = measure_remote_all({v.variant: (v.library, v.reference_output) for v in variants}, x, device,
                                      tolerance=tolerance, repeat=repeat)
        for v in variants:
            insns = None
            if count:
                progress(f"{target}/{v.variant}: counting aarch64 instructions per inference (qemu plugin)")
                insns = arm_emulator.count_instructions(v.library, x)
            results.append(ArmResult(v.variant, target, int(x.shape[0]), threads, measured[v.variant], insns))
    return results


def instruction_section(results: list[ArmResult]) -> dict[str, Any]:
    """The `instructions` entry of the report's `targets` section: per variant, and ratios."""
    by_variant = {r.variant: r.instructions.to_dict() for r in results if r.instructions is not None}
    out: dict[str, Any] = {"per_variant": by_variant}
    base = by_variant.get("original", {}).get("insns_per_inference")
    if base:
        out["relative_to_original"] = {k: v["insns_per_inference"] / base for k, v in by_variant.items()}
    return out
