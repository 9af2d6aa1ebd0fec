"""Streamed weights on TVM: the whole model built with and without software prefetch (at several
distances) and with and without its unaligned reductions padded into streams, against ONNX
Runtime, warm and cold.

    python benchmarks/streamed_weights.py                  # resnet18 112x112, vgg16_bn, batch 1
    python benchmarks/streamed_weights.py --models mobilenet_v2 --distances 0,512 --batches 1,8
    python benchmarks/streamed_weights.py --rate 0.3 --distances 512 --unpadded   # slim, --align off

Each zoo model (random weights, trained-looking batch norms as in `structured.py`; with `--rate
R` its smallest filters zeroed at R and removed with `--align off`, as `structured.py` does) is
built for the cpu target once per distance (`tvm_weight_prefetch.PREFETCH_AHEAD_BYTES`; 0
builds it without prefetches), with `--unpadded` once more at the default distance with
`tvm_schedule.streamed_reduction` off (a streamed conv whose input channels are not a multiple
of `WEIGHT_STREAMS` then runs as one stream), and exported once to ONNX; every build's output
is checked against torch.
All of them are then timed interleaved in turns with warm caches (`time_interleaved`), and then
each call alone after 400 MB were written (cold caches, `stages.time_after_flush`), so the
host's drift hits all alike. Only layers whose weights are streamed (`tvm_schedule.
streams_weights`: over 1 MB, 512-bit vectors) differ between the builds: on a host without
AVX-512 all builds are the same program.
Results: benchmarks/results/NAME.json and NAME.md with os.getloadavg() before and after.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rwdeploy import models
from rwdeploy.runtime import tvm_build, tvm_schedule, tvm_weight_prefetch
from rwdeploy.runtime.environment import environment
from rwdeploy.runtime.latency import time_interleaved
from rwdeploy.runtime.onnx_export import export_onnx
from rwdeploy.runtime.ort_runner import OrtRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stages import MemoryWriter, time_after_flush  # noqa: E402
from structured import (REDUCED_INPUT, ours, prunable_conv_groups, randomize_batchnorm, run_in_tempdir,  # noqa: E402
                        require_scheduled, zero_smallest_filters, zoo_models)

RESULTS = Path(__file__).resolve().parent / "results"


def build_with_distance(net: torch.nn.Module, x: torch.Tensor, ahead_bytes: int, threads: int,
                        padded: bool = True) -> Any:
    """A cpu build of `net` whose streamed weights are prefetched `ahead_bytes` ahead (0: none),
    its unaligned streamed reductions padded into streams unless `padded` is off."""
    default, rounding = tvm_weight_prefetch.PREFETCH_AHEAD_BYTES, tvm_schedule.streamed_reduction
    tvm_weight_prefetch.PREFETCH_AHEAD_BYTES = ahead_bytes
    if not padded:
        tvm_schedule.streamed_reduction = lambda inputs, weight_bytes, lanes: inputs
    try:
        return tvm_build.build(net, x, "cpu", threads=threads)
    finally:
        tvm_weight_prefetch.PREFETCH_AHEAD_BYTES, tvm_schedule.streamed_reduction = default, rounding


def slim_model(net: torch.nn.Module, example: torch.Tensor, rate: float) -> torch.nn.Module:
    """`net` with its smallest filters zeroed at `rate` and removed, no channel kept (`--align off`)."""
    from rwdeploy.passes.channel_groups import analyze_channel_groups
    from rwdeploy.passes.trace import trace_model

    zeroed = copy.deepcopy(net)
    analysis = analyze_channel_groups(trace_model(zeroed, example).gm, example)
    zero_smallest_filters(zeroed, prunable_conv_groups(zeroed, analysis), rate)
    return ours(zeroed, example, "off", measure=False)[0].eval()


def _variants(args: argparse.Namespace) -> list[tuple[str, int, bool]]:
    builds = [(f"tvm {d}", d, True) for d in args.distances]
    if args.unpadded:
        builds.append((f"tvm {tvm_weight_prefetch.PREFETCH_AHEAD_BYTES} unpadded",
                       tvm_weight_prefetch.PREFETCH_AHEAD_BYTES, False))
    return builds


def run(model_name: str, batch: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    net = models.create(model_name)
    randomize_batchnorm(net, seed=1)
    net.eval()
    shape = REDUCED_INPUT.get(model_name, models.input_shape(model_name))
    if args.rate:
        net = slim_model(net, torch.randn(shape, generator=torch.Generator().manual_seed(2)), args.rate)
    x = torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        want = net(x).numpy()
    scale = max(float(np.abs(want).max()), 1e-12)
    calls = {}
    for name, ahead, padded in _variants(args):
        art = build_with_distance(net, x, ahead, args.threads, padded)
        require_scheduled(art, f"{model_name}: the build {name!r}")
        calls[name], got = tvm_build.bind_local(art, x)
        err = float(np.abs(got - want).max()) / scale
        if err > 1e-4:
            raise RuntimeError(f"{model_name}: the build {name!r} disagrees with torch (max rel error {err:.1e})")
        print(f"{model_name} b{batch}: built {name}", file=sys.stderr)
    path = workdir / f"{model_name}_b{batch}.onnx"
    export_onnx(net, x, path)
    calls["ort"] = OrtRunner(path, threads=args.threads).bind(x.numpy())
    warm = time_interleaved(calls, warmup=args.warmup, min_runs=args.runs, max_runs=max(args.runs, 5000),
                            min_time_s=args.min_time, calls_per_turn=args.turn)
    cold = time_after_flush(calls, MemoryWriter(args.flush_mb << 20), min_runs=args.runs, min_time_s=args.min_time)
    rows = []
    base = next(iter(calls))
    for name in calls:
        parts = name.split()
        rows.append({"build": name, "ahead_bytes": None if name == "ort" else int(parts[1]),
                     "reduction_padded": None if name == "ort" else "unpadded" not in parts,
                     "warm_ms": warm[name].median_ms, "cold_ms": cold[name].median_ms,
                     "warm_vs_first": warm[name].median_ms / warm[base].median_ms,
                     "cold_vs_first": cold[name].median_ms / cold[base].median_ms,
                     "warm_vs_ort": warm[name].median_ms / warm["ort"].median_ms,
                     "cold_vs_ort": cold[name].median_ms / cold["ort"].median_ms})
    label = model_name if not args.rate else f"{model_name} slim {args.rate:.0%} (align off)"
    return {"model": label, "input_shape": [batch, *shape[1:]], "rows": rows}


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    first = f"{meta['distances'][0]} B"
    lines = []
    for res in results:
        lines += [f"### {res['model']} {'×'.join(map(str, res['input_shape']))}", "",
                  f"| build | warm ms | cold ms | warm ÷ {first} | cold ÷ {first} | warm ÷ ORT | cold ÷ ORT |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            label = "ONNX Runtime" if r["ahead_bytes"] is None else (
                "TVM, no prefetch" if r["ahead_bytes"] == 0 else f"TVM, {r['ahead_bytes']} B ahead")
            if r["reduction_padded"] is False:
                label += ", unaligned reductions one stream"
            lines.append(f"| {label} | {r['warm_ms']:.3f} | {r['cold_ms']:.3f} | {r['warm_vs_first']:.3f} | "
                         f"{r['cold_vs_first']:.3f} | {r['warm_vs_ort']:.3f} | {r['cold_vs_ort']:.3f} |")
        lines.append("")
    load = ", ".join(f"{v:.2f}" for v in meta["loadavg_before"])
    after = ", ".join(f"{v:.2f}" for v in meta["loadavg_after"])
    lines.append(f"rwdeploy's cpu TVM build, streamed weights prefetched the given bytes ahead "
                 f"(default {meta['default_ahead_bytes']}), vs ONNX Runtime {meta['environment']['onnxruntime']}, "
                 f"{meta['threads']} thread(s); warm: interleaved in turns of 1 untimed + {meta['turn']} timed calls; "
                 f"cold: each call timed alone after {meta['flush_mb']} MB were written; medians; "
                 f"{meta['environment']['cpu']}; load average before: {load}; after: {after}.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,vgg16_bn", help=f"zoo models: {', '.join(models.list_models())}")
    p.add_argument("--batches", default="1")
    p.add_argument("--distances", default="0,256,512,1024",
                   help="bytes ahead, comma-separated; the first is the baseline of the ÷ columns (0 = no prefetch)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="time the slim model instead: smallest filters zeroed at this rate, removed with --align off")
    p.add_argument("--unpadded", action="store_true",
                   help="also build with unaligned streamed reductions left as one stream (streamed_reduction off)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=30, help="timed calls of each build at least")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--turn", type=int, default=10, help="warm: timed calls of one build in a row, after an untimed one")
    p.add_argument("--min-time", dest="min_time", type=float, default=20.0,
                   help="seconds of timing at least, warm and cold each, per model and batch")
    p.add_argument("--flush-mb", dest="flush_mb", type=int, default=400,
                   help="MB written before each cold call (400 empties this machine's L3)")
    p.add_argument("--name", default="streamed_weights", help="stem of the result files (NAME.json, NAME.md)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    names = zoo_models(p, args.models)
    try:
        args.distances = [int(v) for v in args.distances.split(",")]
    except ValueError:
        p.error(f"--distances {args.distances!r}: give whole byte counts, e.g. 0,512")
    if any(d < 0 for d in args.distances) or not args.distances:
        p.error("--distances: byte counts of 0 or more")
    if not 0.0 <= args.rate < 1.0:
        p.error(f"--rate {args.rate}: a pruning rate in [0, 1), e.g. 0.3 (0 = the original model)")
    tvm_build.set_threads(args.threads)
    torch.set_num_threads(args.threads)
    meta: dict[str, Any] = {"benchmark": "streamed_weights", "threads": args.threads, "turn": args.turn,
                            "flush_mb": args.flush_mb, "distances": args.distances, "rate": args.rate,
                            "default_ahead_bytes": tvm_weight_prefetch.PREFETCH_AHEAD_BYTES,
                            "environment": environment()}
    return run_in_tempdir(meta, lambda tmp: [run(m, int(b), args, tmp) for m in names for b in args.batches.split(",")],
                          markdown, args.out, args.name)


if __name__ == "__main__":
    raise SystemExit(main())
