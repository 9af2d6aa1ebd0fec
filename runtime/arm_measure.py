"""The measure stage of the `arm` targets: on a device over TVM RPC, or on the emulated one.

With `--rpc HOST:PORT` (or `--tracker HOST:PORT --key KEY`) the built libraries run on that
device. Without either, they run on the emulated aarch64 device (`arm_emulator`), and every
result says `emulated: true`; beside the emulated latency go aarch64 instructions per
inference, the figure that is reproducible across machines and runs.

If this stage had to start the emulator, it stops it again afterwards, so a compile leaves no
process behind; an emulator the user started (`rwdeploy device arm-emulator start`) is reused
and left running.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from rwdeploy.runtime import arm_emulator
from rwdeploy.runtime.rpc import Device, RemoteMeasurement, measure_remote

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

    def latency_row(self) -> dict[str, Any]:
        """A row of the report's `latency` section."""
        lat = self.measurement.latency
        return {
            "runtime": "tvm", "target": self.target, "variant": self.variant, "batch": self.batch,
            "median_ms": lat.median_ms, "p90_ms": lat.p90_ms, "n": lat.n, "threads": self.threads,
            "emulated": self.measurement.emulated, "device": self.measurement.device,
            "max_abs_err_vs_torch": self.measurement.max_abs_err,
        }

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
    try:
        yield Device(rpc=st.address, emulated=True), st.threads
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
    count_instructions: bool | None = None,
    repeat: int = 15,
    progress: Progress = lambda _: None,
) -> list[ArmResult]:
    """Measure every variant; instruction counts by default only on the emulated device.

    `count_instructions=True` also counts them when a real device is given (the emulator must
    be provisioned for that; it is what runs the counting).
    """
    x = np.ascontiguousarray(example_input, dtype=np.float32)
    results = []
    with arm_device(rpc, tracker, key, progress=progress) as (device, threads):
        count = device.emulated if count_instructions is None else count_instructions
        for v in variants:
            progress(f"{target}/{v.variant}: running {v.library.name} on {device.label}"
                     f"{' (emulated)' if device.emulated else ''}")
            m = measure_remote(v.library, x, v.reference_output, device, repeat=repeat)
            insns = None
            if count:
                progress(f"{target}/{v.variant}: counting aarch64 instructions per inference (qemu plugin)")
                insns = arm_emulator.count_instructions(v.library, x)
            results.append(ArmResult(v.variant, target, int(x.shape[0]), threads, m, insns))
    return results


def instruction_section(results: list[ArmResult]) -> dict[str, Any]:
    """The `instructions` entry of the report's `targets` section: per variant, and ratios."""
    by_variant = {r.variant: r.instructions.to_dict() for r in results if r.instructions is not None}
    out: dict[str, Any] = {"per_variant": by_variant}
    base = by_variant.get("original", {}).get("insns_per_inference")
    if base:
        out["relative_to_original"] = {k: v["insns_per_inference"] / base for k, v in by_variant.items()}
    return out


def reference_outputs(models: Mapping[str, Any], example_input: np.ndarray) -> dict[str, np.ndarray]:
    """torch outputs of each variant's module (the values the device must reproduce)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(example_input, dtype=np.float32))
    with torch.no_grad():
        return {name: m(x).detach().numpy() for name, m in models.items()}
