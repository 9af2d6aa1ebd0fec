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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

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


def _emulator_messages(message: str) -> None:
    """Provisioning (first use, about a minute) and start-up messages, on stderr."""
    if message.startswith(("downloading", "fetching", "installing", "cross-building", "starting", "stopped")):
        print(f"arm-emulator: {message}", file=sys.stderr, flush=True)


def stage_arm_measure(ctx: Any) -> None:
    """Compile-pipeline stage for the arm targets (after the TVM build stage).

    Reads the shipped libraries from `ctx.tvm_artifacts` ((variant, batch) -> TvmArtifact;
    those with a `path` were exported), the device from `ctx.options.rpc/tracker/key`, and adds
    latency rows plus `device`, `measurements` and `instructions` to the report's
    `targets[<target>]` section. Only the shipped batch size is measured: at emulated speed a
    batch-8 resnet takes a minute.
    """
    import torch

    opts = ctx.options
    name = opts.target
    section = ctx.sections.setdefault("targets", {}).setdefault(name, {})
    notes = section.setdefault("notes", [])
    variants = []
    for (variant, batch), art in ctx.tvm_artifacts.items():
        module = getattr(ctx, variant, None)  # ctx.original / ctx.slim / ctx.packed
        if art.path is None or module is None:
            continue
        x = ctx.loaded.example_input(batch=batch, seed=opts.seed)
        with torch.no_grad():
            ref = module(x).detach().numpy()
        variants.append((x.numpy(), ArmVariant(variant, Path(art.path), ref)))
    if not variants:
        notes.append("arm measurement skipped: no exported library")
        return
    x = variants[0][0]
    results = measure_arm([v for _, v in variants], x, target=name, rpc=getattr(opts, "rpc", None),
                          tracker=getattr(opts, "tracker", None), key=getattr(opts, "key", None),
                          repeat=max(5, min(opts.runs, 30)), progress=_emulator_messages)
    m = results[0].measurement
    section["device"] = {"address": m.device, "emulated": m.emulated}
    if m.emulated:
        notes.append("measured on the emulated aarch64 device (no --rpc given): qemu-user on this machine, "
                     "so latency is emulated, not ARM latency; compare variants by aarch64 instructions per "
                     "inference")
    section["measurements"] = {r.variant: r.to_dict() for r in results}
    if any(r.instructions is not None for r in results):
        section["instructions"] = instruction_section(results)
        for variant, c in section["instructions"]["per_variant"].items():
            notes.append(f"{variant}: {c['insns_per_inference']:,} aarch64 instructions per inference "
                         f"(two measurements differ by {max(c['samples']) - min(c['samples']):,})")
    ctx.latency.extend(r.latency_row() for r in results)
