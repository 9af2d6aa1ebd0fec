"""Residual convs writing their output over the shortcut they add, or into a fresh tensor, on TVM:
whole models against ONNX Runtime.

    python benchmarks/inplace_epilogue.py                      # resnet18, resnet20, mobilenet_v2; b1, b8
    python benchmarks/inplace_epilogue.py --models "" --timm resnet50,vit_tiny_patch16_224 --batches 1

Each zoo model (random weights, trained-looking batch norms as in `structured.py`) and each timm
architecture (random weights, its default input size; needs the test extra) is built for the cpu
target twice: with every kernel writing a fresh output tensor, and as shipped, where a kernel
whose epilogue reads a tensor nothing reads afterwards writes over it
(`tvm_inplace_epilogue.inplace_epilogue_pass`). Both builds are checked against torch (and for
kernels left unscheduled), the model is exported once to ONNX, and all three are timed
interleaved in turns (`time_interleaved`), so the host's drift hits all alike.
Results: benchmarks/results/NAME.json and NAME.md with os.getloadavg() before and after.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rwdeploy import models
from rwdeploy.runtime import tvm_build, tvm_inplace_epilogue
from rwdeploy.runtime.environment import environment
from rwdeploy.runtime.latency import time_interleaved
from rwdeploy.runtime.onnx_export import export_onnx
from rwdeploy.runtime.ort_runner import OrtRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured import REDUCED_INPUT, randomize_batchnorm, require_scheduled, run_in_tempdir, zoo_models  # noqa: E402
from targets import timm_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build(net: torch.nn.Module, x: torch.Tensor, in_place: bool, threads: int) -> Any:
    """A cpu build of `net`, its residual epilogues writing over their shortcut or not."""
    rule = tvm_inplace_epilogue.reads_only_where_written
    if not in_place:
        tvm_inplace_epilogue.reads_only_where_written = lambda *func_and_params: False
    try:
        art = tvm_build.build(net, x, "cpu", threads=threads)
    finally:
        tvm_inplace_epilogue.reads_only_where_written = rule
    require_scheduled(art, "the build " + ("in place" if in_place else "with fresh outputs"))
    return art


def _model(name: str, timm: bool) -> tuple[torch.nn.Module, tuple[int, ...]]:
    if timm:
        return timm_model(name)
    torch.manual_seed(0)
    net = models.create(name)
    randomize_batchnorm(net, seed=1)
    return net.eval(), REDUCED_INPUT.get(name, models.input_shape(name))


def run(name: str, timm: bool, batch: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    net, shape = _model(name, timm)
    x = torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        want = net(x).numpy()
    scale = max(float(np.abs(want).max()), 1e-12)
    calls, in_place_kernels = {}, 0
    for label, in_place in (("fresh", False), ("in place", True)):
        art = build(net, x, in_place, args.threads)
        calls[label], got = tvm_build.bind_local(art, x)
        err = float(np.abs(got - want).max()) / scale
        if err > 1e-4:
            raise RuntimeError(f"{name}: the build {label!r} disagrees with torch (max rel error {err:.1e})")
        if in_place:
            in_place_kernels = len(art.kernels.get("in place", []))
    path = workdir / f"{name}_b{batch}.onnx"
    export_onnx(net, x, path)
    calls["ort"] = OrtRunner(path, threads=args.threads).bind(x.numpy())
    warm = time_interleaved(calls, warmup=args.warmup, min_runs=args.runs, max_runs=max(args.runs, 20000),
                            min_time_s=args.min_time, calls_per_turn=args.turn)
    ms = {label: warm[label].median_ms for label in calls}
    print(f"{name} b{batch}: in place / fresh {ms['in place'] / ms['fresh']:.3f}, "
          f"TVM/ORT {ms['fresh'] / ms['ort']:.3f} -> {ms['in place'] / ms['ort']:.3f}", file=sys.stderr)
    return {"model": name, "source": "timm" if timm else "zoo", "input_shape": [batch, *shape[1:]], "ms": ms,
            "kernels_in_place": in_place_kernels, "in_place_vs_fresh": ms["in place"] / ms["fresh"],
            "vs_ort": {label: ms[label] / ms["ort"] for label in ("fresh", "in place")}}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["| model | input | kernels in place | TVM fresh ms | TVM in place ms | ORT ms | in place ÷ fresh | "
             "TVM/ORT fresh -> in place |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['model']} ({r['source']}) | {'×'.join(map(str, r['input_shape']))} | "
                     f"{r['kernels_in_place']} | {ms['fresh']:.3f} | {ms['in place']:.3f} | {ms['ort']:.3f} | "
                     f"{r['in_place_vs_fresh']:.3f} | {r['vs_ort']['fresh']:.2f} -> {r['vs_ort']['in place']:.2f} |")
    load = ", ".join(f"{v:.2f}" for v in meta["loadavg_before"])
    after = ", ".join(f"{v:.2f}" for v in meta["loadavg_after"])
    lines += ["", f"rwdeploy's cpu TVM build: fresh = every kernel writes a new tensor; in place = a kernel whose "
              f"epilogue reads a tensor nothing reads afterwards (a residual conv's shortcut) writes its output "
              f"over it (`tvm_inplace_epilogue`); kernels in place = how many calls of the shipped build do. "
              f"vs ONNX Runtime {meta['environment']['onnxruntime']}; {meta['threads']} thread(s); interleaved "
              f"in turns of 1 untimed + {meta['turn']} timed calls, medians; {meta['environment']['cpu']}; "
              f"load average before: {load}; after: {after}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet20,mobilenet_v2",
                   help=f"zoo models (\"\" for none): {', '.join(models.list_models())}")
    p.add_argument("--timm", default="", help="comma list of timm architectures (random weights, default "
                                              "input size; needs the test extra)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=30, help="timed calls of each build at least")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--turn", type=int, default=5, help="timed calls of one build in a row, after an untimed one")
    p.add_argument("--min-time", dest="min_time", type=float, default=10.0,
                   help="seconds of interleaved timing at least, per model and batch")
    p.add_argument("--name", default="inplace_epilogue", help="stem of the result files (NAME.json, NAME.md)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    names = [(m, False) for m in (zoo_models(p, args.models) if args.models else [])]
    names += [(m, True) for m in args.timm.split(",") if m]
    if not names:
        p.error("--models and --timm are both empty: name at least one model")
    try:
        batches = [int(v) for v in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches {args.batches!r}: comma-separated integers, e.g. 1,8")
    tvm_build.set_threads(args.threads)
    torch.set_num_threads(args.threads)
    meta: dict[str, Any] = {"benchmark": "inplace_epilogue", "threads": args.threads, "turn": args.turn,
                            "batches": batches, "environment": environment()}
    return run_in_tempdir(meta, lambda tmp: [run(m, t, b, args, tmp) for m, t in names for b in batches],
                          markdown, args.out, args.name)


if __name__ == "__main__":
    raise SystemExit(main())
