"""Compile-pipeline stages for TVM targets: build original + slim, measure on the arm device.

`rwdeploy.compile.TARGET_STAGES` lists them per target. They read the traced original and the
slim model from the context and add files, latency rows and a `targets` report section:

* `stage_build_tvm`: both variants through `runtime.tvm_build.build` for `options.target`;
  the slim one is the deliverable `model.<target>.so`, the original goes beside it as
  `original.<target>.so` so that the two can be measured against each other.
* `stage_measure_arm`: both libraries over TVM RPC (`--rpc` / `--tracker --key`), or on the
  emulated aarch64 device when neither is given (then labelled `emulated` and accompanied by
  aarch64 instructions per inference), via `runtime.arm_measure`.

TVM modules are built for the example input's batch size (static shapes), so the TVM rows
are at that batch only.
"""
from __future__ import annotations

from typing import Any

import torch

from rwdeploy.runtime.arm_measure import ArmVariant, instruction_section, measure_arm

VARIANTS = ("original", "slim")


def _library_name(variant: str, target: str) -> str:
    return f"model.{target}.so" if variant == "slim" else f"original.{target}.so"


def stage_build_tvm(ctx: Any) -> None:
    from rwdeploy.runtime import tvm_build

    target = ctx.options.target
    section = ctx.sections.setdefault("targets", {}).setdefault(target, {})
    builds: dict[str, Any] = {}
    for variant, module in zip(VARIANTS, (ctx.original, ctx.slim)):
        art = tvm_build.build(module, ctx.example_input, target)
        tvm_build.export(art, ctx.path(_library_name(variant, target)))
        ctx.artifacts[variant] = art
        entry = art.to_dict()
        entry.pop("path", None)  # absolute path into the temporary work folder
        builds[variant] = entry
        ctx.files[f"tvm_{variant}"] = {"path": art.path.name, "bytes": art.size_bytes, "target": target}
    section["build"] = builds
    section["batch"] = int(ctx.example_input.shape[0])


def stage_measure_arm(ctx: Any) -> None:
    opts = ctx.options
    x = ctx.example_input.detach().numpy()
    with torch.no_grad():
        refs = {"original": ctx.original(ctx.example_input), "slim": ctx.slim(ctx.example_input)}
    variants = [ArmVariant(v, ctx.artifacts[v].path, refs[v].detach().numpy()) for v in VARIANTS]
    results = measure_arm(variants, x, target=opts.target, rpc=opts.rpc, tracker=opts.tracker,
                          key=opts.key, repeat=max(5, min(opts.runs, 30)))
    section = ctx.sections.setdefault("targets", {}).setdefault(opts.target, {})
    section["device"] = {"address": results[0].measurement.device, "emulated": results[0].measurement.emulated}
    if results[0].measurement.emulated:
        section["device"]["note"] = ("qemu-user emulation on this machine: latency is emulated, not ARM "
                                     "latency; compare variants by instructions per inference")
    section["measurements"] = {r.variant: r.to_dict() for r in results}
    if any(r.instructions is not None for r in results):
        section["instructions"] = instruction_section(results)
    ctx.latency.extend(r.latency_row() for r in results)
