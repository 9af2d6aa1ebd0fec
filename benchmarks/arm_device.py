"""The arm columns of benchmarks/targets.py: emulated (or RPC) latency and instruction counts.

`targets.py` calls `arm_row(name, variant, path, module, x)` for every `model.arm.so` it
builds (its ARM_HOOKS). Without a device (`--rpc`), the library runs on the emulated aarch64
device, started once for the whole benchmark and stopped at exit if this script started it:
latency there is qemu's, labelled `emulated`; the comparable figure is aarch64 instructions
per inference (qemu's instruction-count plugin, start-up removed, two measurements).
"""
from __future__ import annotations

import atexit
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rwdeploy.runtime import arm_emulator
from rwdeploy.runtime.rpc import Device, measure_remote

_device: Device | None = None
RPC: str | None = None  # set by targets.py --rpc HOST:PORT: a real board instead of the emulator
REPEAT = 10


def _get_device() -> Device:
    global _device
    if _device is None:
        if RPC:
            _device = Device(rpc=RPC)
        else:
            before = arm_emulator.status()
            st = before if before.running else arm_emulator.start(progress=print)
            if not before.running:
                atexit.register(arm_emulator.stop)
            _device = Device(rpc=st.address, emulated=True)
    return _device


def arm_row(name: str, variant: str, path: Path, module: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    device = _get_device()
    with torch.no_grad():
        ref = module(x).numpy()
    m = measure_remote(path, x.numpy(), ref, device, repeat=REPEAT)
    row: dict[str, Any] = {
        "arm_device": device.label, "emulated": device.emulated,
        "arm_latency": {"median_ms": round(m.latency.median_ms, 3), "p90_ms": round(m.latency.p90_ms, 3),
                        "n": m.latency.n},
        "arm_max_err": m.max_abs_err,
    }
    if device.emulated:
        c = arm_emulator.count_instructions(path, x.numpy())
        row["instructions"] = c.to_dict()
    print(f"{name:10s} {variant:8s} arm  {'emulated ' if device.emulated else ''}"
          f"{m.latency.median_ms:9.2f} ms" + (f"  {row['instructions']['insns_per_inference']:>13,} insns"
                                               if "instructions" in row else ""), flush=True)
    return row


def arm_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The arm table: per model, original vs slim latency on the device and instruction counts."""
    arm = [r for r in rows if "arm_latency" in r]
    if not arm:
        return []
    emulated = any(r["emulated"] for r in arm)
    lines = ["", "## arm (aarch64)" + (": emulated device (qemu-user on this machine)" if emulated else ""), ""]
    if emulated:
        lines += ["Emulated latency is qemu's, not ARM latency. Instructions per inference (qemu's "
                  "instruction-count plugin, start-up removed; two measurements, spread shown) are the "
                  "reproducible figure to compare original and slim.", ""]
    lines += ["| model | variant | target | latency median ms (p90) | n | aarch64 insns / inference | "
              "two measurements differ by | slim / original insns |", "|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["target"]): r["instructions"]["insns_per_inference"]
            for r in arm if r["variant"] == "original" and "instructions" in r}
    for r in arm:
        lat = r["arm_latency"]
        ins = r.get("instructions")
        ratio = "-"
        if ins and r["variant"] != "original" and (r["model"], r["target"]) in base:
            ratio = f"{ins['insns_per_inference'] / base[(r['model'], r['target'])]:.2f}"
        lines.append(f"| {r['model']} | {r['variant']} | {r['target']}{' (emulated)' if r['emulated'] else ''} | "
                     f"{lat['median_ms']:.2f} ({lat['p90_ms']:.2f}) | {lat['n']} | "
                     f"{ins['insns_per_inference']:,} | {max(ins['samples']) - min(ins['samples']):,} insns | {ratio} |" if ins else
                     f"| {r['model']} | {r['variant']} | {r['target']} | {lat['median_ms']:.2f} ({lat['p90_ms']:.2f}) | "
                     f"{lat['n']} | - | - | - |")
    return lines
