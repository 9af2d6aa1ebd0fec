"""Batch-1 Linear layers (the classifiers of the zoo models and their slim versions) in
rwdeploy's TVM build, with and without the four-register output padding of one-pixel layers
(`tvm_schedule.single_row_width`), against ONNX Runtime, torch and numpy, one thread.

    python benchmarks/linear_b1.py                       # default shapes
    python benchmarks/linear_b1.py --shapes 1280x1000,384x1000

All variants of a shape are timed in one interleaved run (turns of 1 untimed + 20 timed calls:
each layer's steady state, as when it runs alone); outputs checked against torch. Results:
benchmarks/results/linear_b1.{json,md}, with the load average.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rwdeploy.runtime import tvm_build, tvm_schedule  # noqa: E402
from rwdeploy.runtime.environment import environment  # noqa: E402
from rwdeploy.runtime.latency import time_interleaved  # noqa: E402
from rwdeploy.runtime.onnx_export import export_onnx  # noqa: E402
from rwdeploy.runtime.ort_runner import OrtRunner  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (in, out): MobileNetV2's classifier and its 70 % slim's, LeNet-5's fc1 and its 70 % slim's,
# VGG-16-BN (CIFAR)'s classifier layers, a 4096 -> 1024 layer
DEFAULT_SHAPES = "1280x1000,384x1000,800x500,240x150,512x512,512x10,4096x1024"


def _tvm_call(model: nn.Module, x: torch.Tensor, single_row: bool) -> tuple[Callable[[], Any], np.ndarray]:
    """The rwdeploy cpu build of `model`, with or without `single_row_width`."""
    original = tvm_schedule.single_row_width
    if not single_row:
        tvm_schedule.single_row_width = tvm_schedule.padded_width
    try:
        art = tvm_build.build(model, x, "cpu", threads=1)
    finally:
        tvm_schedule.single_row_width = original
    return tvm_build.bind_local(art, x)


def run_shape(k: int, n: int, workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.Linear(k, n).eval()
    x = torch.randn(1, k)
    with torch.no_grad():
        want = model(x).numpy()
    calls: dict[str, Callable[[], Any]] = {}
    errors: dict[str, float] = {}
    for label, single_row in (("tvm", True), ("tvm one-register tiles", False)):
        calls[label], got = _tvm_call(model, x, single_row)
        errors[label] = float(np.abs(got - want).max())
    path = workdir / f"linear_{k}x{n}.onnx"
    export_onnx(model, x, path)
    ort = OrtRunner(path, threads=1)
    calls["onnxruntime"] = ort.bind(x.numpy())
    errors["onnxruntime"] = float(np.abs(ort.run(x.numpy()) - want).max())

    def torch_call() -> None:
        with torch.no_grad():
            model(x)

    w, b, xv = model.weight.detach().numpy(), model.bias.detach().numpy(), x.numpy()[0]
    calls["torch"], calls["numpy"] = torch_call, lambda: w @ xv + b
    for label, err in errors.items():
        if err > 1e-3 * max(1.0, float(np.abs(want).max())):
            raise RuntimeError(f"{label} disagrees with torch on {k}x{n}: max abs error {err:.1e}")
    stats = time_interleaved(calls, warmup=20, min_runs=args.runs, max_runs=max(args.runs, 20000),
                             min_time_s=args.min_time, calls_per_turn=20)
    return {"in": k, "out": n, "max_abs_error": errors,
            "latency": {v: {"median_us": st.median_ms * 1e3, "p90_us": st.p90_ms * 1e3, "n": st.n}
                        for v, st in stats.items()}}


def to_markdown(doc: dict[str, Any]) -> str:
    variants = list(doc["rows"][0]["latency"]) if doc["rows"] else []
    lines = ["# Batch-1 Linear layers", "",
             "| in -> out | " + " | ".join(f"{v} us" for v in variants) + " | one-register / tvm | tvm / best other |",
             "|---|" + "---|" * (len(variants) + 2)]
    for r in doc["rows"]:
        lat = {v: r["latency"][v]["median_us"] for v in variants}
        others = min(lat[v] for v in variants if not v.startswith("tvm"))
        lines.append(f"| {r['in']} -> {r['out']} | " + " | ".join(f"{lat[v]:.2f}" for v in variants)
                     + f" | {lat['tvm one-register tiles'] / lat['tvm']:.2f} | {lat['tvm'] / others:.2f} |")
    load = ", ".join(f"{x:.2f}" for x in doc["loadavg_before"])
    lines += ["", f"Median microseconds per call, 1 thread, batch 1, all variants of a row interleaved in turns of "
              f"1 untimed + 20 timed calls; {doc['environment']['cpu']}; load average before: {load}, after: "
              + ", ".join(f"{x:.2f}" for x in doc["loadavg_after"]) + ". `tvm one-register tiles` is the same "
              "build without `single_row_width` (output channels padded to half a register only)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of INxOUT")
    p.add_argument("--runs", type=int, default=200, help="timed calls of each variant at least")
    p.add_argument("--min-time", dest="min_time", type=float, default=2.0, help="seconds per shape at least")
    p.add_argument("--name", default="linear_b1", help="stem of the result files")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    doc: dict[str, Any] = {"benchmark": "linear_b1", "loadavg_before": list(os.getloadavg()),
                           "environment": environment(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k, n in shapes:
            row = run_shape(k, n, Path(tmp), args)
            doc["rows"].append(row)
            lat = row["latency"]
            print(f"{k}x{n}: " + ", ".join(f"{v} {s['median_us']:.2f} us" for v, s in lat.items()), flush=True)
    doc["loadavg_after"] = list(os.getloadavg())
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(doc, indent=1))
    md = to_markdown(doc)
    (args.out / f"{args.name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
