"""How a model's image reaches its first conv on TVM: through a transpose and a padded copy, or
read in place, whole models, against ONNX Runtime.

    python benchmarks/stem_input.py                          # the zoo's image models, dense and slim 70 %
    python benchmarks/stem_input.py --models mobilenet_v2 --rates 0,0.3,0.7 --batches 1,8

Each zoo model (random weights, trained-looking batch norms as in `structured.py`; at a rate R > 0
its smallest filters zeroed at R and removed with `--align off`) is built for the cpu target
three times: with the image transposed to NHWC and every padded conv copying its input into a
padded buffer, as before; with a few-channel conv that reads each input a few times reading its
padding in place (`tvm_schedule.inlines_padding`: a 3x3 stride-2 stem); and as shipped, that
conv also reading the NCHW image where it is instead of a transposed copy
(`tvm_input_layout.folds_transpose`). All builds are checked against torch (and for kernels
left unscheduled), exported once to ONNX, and timed interleaved in turns (`time_interleaved`),
so the host's drift hits all alike. On a host without AVX-512 the builds are the same program.
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
from rwdeploy.runtime import tvm_build, tvm_input_layout, tvm_schedule
from rwdeploy.runtime.environment import environment
from rwdeploy.runtime.latency import time_interleaved
from rwdeploy.runtime.onnx_export import export_onnx
from rwdeploy.runtime.ort_runner import OrtRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from streamed_weights import slim_model  # noqa: E402
from structured import REDUCED_INPUT, randomize_batchnorm, require_scheduled, run_in_tempdir, zoo_models  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# (name, padding read in place, image read as NCHW)
BUILDS = (("copies", False, False), ("padding in place", True, False), ("shipped", True, True))


def build(net: torch.nn.Module, x: torch.Tensor, name: str, in_place: bool, nchw: bool, threads: int) -> Any:
    """A cpu build of `net` with the stem's padding read in place or copied, and its image read as
    NCHW or transposed first."""
    rules = tvm_schedule.inlines_padding, tvm_input_layout.folds_transpose
    if not in_place:
        tvm_schedule.inlines_padding = lambda *shape_and_lanes: False
    if not nchw:
        tvm_input_layout.folds_transpose = lambda *channels_and_lanes: False
    try:
        art = tvm_build.build(net, x, "cpu", threads=threads)
    finally:
        tvm_schedule.inlines_padding, tvm_input_layout.folds_transpose = rules
    require_scheduled(art, f"the build {name!r}")
    return art


def run(model_name: str, rate: float, batch: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    net = models.create(model_name)
    randomize_batchnorm(net, seed=1)
    net.eval()
    shape = REDUCED_INPUT.get(model_name, models.input_shape(model_name))
    if rate:
        net = slim_model(net, torch.randn(shape, generator=torch.Generator().manual_seed(2)), rate)
    x = torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        want = net(x).numpy()
    scale = max(float(np.abs(want).max()), 1e-12)
    calls = {}
    for name, in_place, nchw in BUILDS:
        calls[name], got = tvm_build.bind_local(build(net, x, name, in_place, nchw, args.threads), x)
        err = float(np.abs(got - want).max()) / scale
        if err > 1e-4:
            raise RuntimeError(f"{model_name}: the build {name!r} disagrees with torch (max rel error {err:.1e})")
    path = workdir / f"{model_name}_{rate}_b{batch}.onnx"
    export_onnx(net, x, path)
    calls["ort"] = OrtRunner(path, threads=args.threads).bind(x.numpy())
    warm = time_interleaved(calls, warmup=args.warmup, min_runs=args.runs, max_runs=max(args.runs, 20000),
                            min_time_s=args.min_time, calls_per_turn=args.turn)
    ms = {name: warm[name].median_ms for name in calls}
    print(f"{model_name} {rate:.0%} b{batch}: shipped / copies {ms['shipped'] / ms['copies']:.3f}", file=sys.stderr)
    return {"model": model_name, "rate": rate, "input_shape": [batch, *shape[1:]], "ms": ms,
            "vs_copies": {name: ms[name] / ms["copies"] for name in ms if name != "ort"},
            "vs_ort": {name: ms[name] / ms["ort"] for name in ms if name != "ort"}}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = ["| model | rate | input | TVM copies ms | padding in place ms | shipped ms | ORT ms | "
             "in place ÷ copies | shipped ÷ copies | TVM/ORT copies -> shipped |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms, rel = r["ms"], r["vs_copies"]
        lines.append(f"| {r['model']} | {r['rate']:.0%} | {'×'.join(map(str, r['input_shape']))} | "
                     f"{ms['copies']:.3f} | {ms['padding in place']:.3f} | {ms['shipped']:.3f} | {ms['ort']:.3f} | "
                     f"{rel['padding in place']:.3f} | {rel['shipped']:.3f} | "
                     f"{r['vs_ort']['copies']:.2f} -> {r['vs_ort']['shipped']:.2f} |")
    load = ", ".join(f"{v:.2f}" for v in meta["loadavg_before"])
    after = ", ".join(f"{v:.2f}" for v in meta["loadavg_after"])
    lines += ["", f"rwdeploy's cpu TVM build: copies = the image transposed to NHWC and every padded conv's "
              f"input copied into a padded buffer; padding in place = a few-channel conv that reads each "
              f"input a few times reads its padding in place (`tvm_schedule.inlines_padding`); shipped = "
              f"that conv also reads the NCHW image where it is (`tvm_input_layout`). vs ONNX Runtime "
              f"{meta['environment']['onnxruntime']}; rate 0 = the original model, R > 0 = smallest filters "
              f"zeroed at R and removed (`--align off`); {meta['threads']} thread(s); interleaved in turns of "
              f"1 untimed + {meta['turn']} timed calls, medians; {meta['environment']['cpu']}; load average "
              f"before: {load}; after: {after}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="mobilenet_v2,resnet18,vgg16_bn,resnet20",
                   help=f"zoo models: {', '.join(models.list_models())}")
    p.add_argument("--rates", default="0,0.7", help="pruning rates, comma-separated (0 = the original model)")
    p.add_argument("--batches", default="1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=30, help="timed calls of each build at least")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--turn", type=int, default=10, help="timed calls of one build in a row, after an untimed one")
    p.add_argument("--min-time", dest="min_time", type=float, default=10.0,
                   help="seconds of interleaved timing at least, per model, rate and batch")
    p.add_argument("--name", default="stem_input", help="stem of the result files (NAME.json, NAME.md)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    names = zoo_models(p, args.models)
    try:
        rates = [float(v) for v in args.rates.split(",")]
        batches = [int(v) for v in args.batches.split(",")]
    except ValueError:
        p.error(f"--rates {args.rates!r} / --batches {args.batches!r}: comma-separated numbers, e.g. 0,0.7 and 1,8")
    if any(not 0.0 <= r < 1.0 for r in rates):
        p.error(f"--rates {args.rates}: pruning rates in [0, 1), e.g. 0,0.7 (0 = the original model)")
    tvm_build.set_threads(args.threads)
    torch.set_num_threads(args.threads)
    meta: dict[str, Any] = {"benchmark": "stem_input", "threads": args.threads, "turn": args.turn,
                            "rates": rates, "batches": batches, "environment": environment()}
    return run_in_tempdir(meta, lambda tmp: [run(m, r, b, args, tmp) for m in names for r in rates for b in batches],
                          markdown, args.out, args.name)


if __name__ == "__main__":
    raise SystemExit(main())
