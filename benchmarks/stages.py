"""Where inside a model one runtime beats the other: rwdeploy's TVM build vs ONNX Runtime, per stage.

    python benchmarks/stages.py                                   # resnet18 at 112x112, batch 1
    python benchmarks/stages.py --model vgg16_bn --batches 1,8
    python benchmarks/stages.py --model mobilenet_v2 --input 1,3,224,224 --name stages_mbv2

A zoo model (random weights, trained-looking batch norms as in `structured.py`) is cut into
stages along its top-level children, a Sequential child expanded into its own children: a new
stage starts at each child that holds a conv or Linear, and the others (batch norms,
activations, pools) join the stage before. Where the model's forward flattens before its first
Linear, a flatten is put there. Running the stages in order must reproduce the model's output
(checked, else the model is refused: its forward is not a chain of its children).

Each stage is built alone (`tvm_build.build`, target cpu) and exported alone to ONNX, on the
activation the stages before it produce; every stage on both runtimes, and the whole model on
both, is then timed interleaved in turns (`time_interleaved`), so the host's drift hits all
alike. A stage alone pays for what the whole model does once (its input and output layout
conversions on TVM) and, called back to back, finds its weights still cached, which inside a
model whose weights exceed the caches it does not: so the stages' sum is not the whole model's
time, and `--flush-mb N` times each call alone after N MB were written (400 puts every weight
out of this machine's L3). The per-stage TVM/ORT ratios say which layers a runtime wins.
Results: benchmarks/results/NAME.json and NAME.md with os.getloadavg() before and after.

    python benchmarks/stages.py --flush-mb 400 --min-time 40 --name stages_resnet18_cold
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from rwdeploy import models
from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.environment import environment
from rwdeploy.runtime.latency import LatencyStats, time_interleaved
from rwdeploy.runtime.onnx_export import export_onnx
from rwdeploy.runtime.ort_runner import OrtRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured import REDUCED_INPUT, randomize_batchnorm, run_in_tempdir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _children(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential):
            out += [(f"{name}.{sub}", m) for sub, m in child.named_children()]
        else:
            out.append((name, child))
    return out


def _holds_layer(module: nn.Module) -> bool:
    return any(isinstance(m, _LAYERS) for m in module.modules())


def split_stages(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Sequential]]:
    """The model's stages, as named Sequentials whose chain computes the model's output on `x`."""
    children = _children(model)
    first_linear = next((i for i, (_, m) in enumerate(children) if isinstance(m, nn.Linear)), None)
    attempts = [children]
    if first_linear is not None:
        attempts.append(children[:first_linear] + [("flatten", nn.Flatten())] + children[first_linear:])
    with torch.no_grad():
        want = model(x)
        for chain in attempts:
            try:
                y = x
                for _, m in chain:
                    y = m(y)
            except RuntimeError:  # shapes do not chain without the flatten
                continue
            if y.shape == want.shape and torch.allclose(y, want, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
                break
        else:
            raise SystemExit(f"stages.py: {type(model).__name__}'s forward is not a chain of its children "
                             "(residual or branching top level); pick a model whose top level runs in order")
    stages: list[list[tuple[str, nn.Module]]] = []
    for name, m in chain:
        if not stages or (_holds_layer(m) and any(_holds_layer(c) for _, c in stages[-1])):
            stages.append([])
        stages[-1].append((name, m))
    return [("+".join(n for n, _ in st), nn.Sequential(*(m for _, m in st)).eval()) for st in stages]


def _check_output(runtime: str, stage: str, got: np.ndarray, want: np.ndarray) -> None:
    err = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))
    if err > 1e-4:
        raise RuntimeError(f"{runtime} of stage {stage} disagrees with torch: max rel error {err:.1e}")


def run(model_name: str, shape: tuple[int, ...], batch: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    net = models.create(model_name)
    randomize_batchnorm(net, seed=1)
    net.eval()
    x = torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(batch))
    stages = split_stages(net, x)
    calls: dict[str, Any] = {}
    inputs = x
    for i, (name, stage) in enumerate([*stages, ("whole model", net)]):
        if name == "whole model":
            inputs = x
        with torch.no_grad():
            want = stage(inputs).numpy()
        art = tvm_build.build(stage, inputs, "cpu", threads=args.threads)
        calls[f"tvm {name}"], got = tvm_build.bind_local(art, inputs)
        _check_output("TVM build", name, got, want)
        path = workdir / f"{model_name}_b{batch}_{i}.onnx"
        export_onnx(stage, inputs, path)
        runner = OrtRunner(path, threads=args.threads)
        _check_output("ONNX Runtime session", name, runner.run(inputs.numpy()), want)
        calls[f"ort {name}"] = runner.bind(inputs.numpy())
        print(f"{model_name} b{batch}: built {name}", file=sys.stderr)
        inputs = torch.from_numpy(want)
    if args.flush_mb:
        stats = time_after_flush(calls, MemoryWriter(args.flush_mb << 20), min_runs=args.runs, min_time_s=args.min_time)
    else:
        stats = time_interleaved(calls, warmup=args.warmup, min_runs=args.runs, max_runs=max(args.runs, 2000),
                                 min_time_s=args.min_time, calls_per_turn=args.turn)
    rows = []
    for name, _ in [*stages, ("whole model", net)]:
        tvm_ms, ort_ms = stats[f"tvm {name}"].median_ms, stats[f"ort {name}"].median_ms
        rows.append({"stage": name, "tvm_ms": tvm_ms, "ort_ms": ort_ms, "tvm_over_ort": tvm_ms / ort_ms,
                     "n": min(stats[f"tvm {name}"].n, stats[f"ort {name}"].n)})
    return {"model": model_name, "input_shape": [batch, *shape[1:]], "stages": rows}


class MemoryWriter:
    """A call that writes `n_bytes` of memory: what it evicts from the caches, the next call reads
    from further out (8 MB: out of L2 here; some hundred MB: out of L3)."""

    def __init__(self, n_bytes: int) -> None:
        self.buffer = np.zeros(max(1, n_bytes // 8))

    def __call__(self) -> None:
        self.buffer += 1.0


def time_after_flush(calls: dict[str, Callable[[], Any]], flush: Callable[[], None], *, min_runs: int,
                     min_time_s: float) -> dict[str, LatencyStats]:
    """Each call timed alone right after an untimed `flush` (a `MemoryWriter`), the callables
    taking turns: the latency a stage has when its weights and input come from where other
    traffic left them, as inside a model whose weights do not fit the caches."""
    for call in calls.values():  # first calls (allocation, lazy set-up) untimed
        call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    while min(map(len, samples.values())) < min_runs or time.perf_counter() - start < min_time_s:
        for name, call in calls.items():
            flush()
            t0 = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - t0)
    return {name: LatencyStats.from_samples(s, warmup=1) for name, s in samples.items()}


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = []
    for res in results:
        lines += [f"### {res['model']} {'×'.join(map(str, res['input_shape']))}", "",
                  "| stage | TVM ms | ORT ms | TVM/ORT |", "|---|---|---|---|"]
        lines += [f"| {r['stage']} | {r['tvm_ms']:.3f} | {r['ort_ms']:.3f} | {r['tvm_over_ort']:.3f} |"
                  for r in res["stages"]]
        lines.append("")
    load = ", ".join(f"{v:.2f}" for v in meta["loadavg_before"])
    after = ", ".join(f"{v:.2f}" for v in meta["loadavg_after"])
    lines.append(f"rwdeploy's cpu TVM build vs ONNX Runtime {meta['environment']['onnxruntime']} (CPU provider, "
                 f"input and outputs bound once), {meta['threads']} thread(s), every stage of both runtimes and "
                 + (f"the whole model taking turns, each call timed alone after {meta['flush_mb']} MB were written "
                    "(cold caches), medians; " if meta.get("flush_mb") else
                    f"the whole model interleaved in turns of 1 untimed + {meta['turn']} timed calls, medians; ")
                 + f"{meta['environment']['cpu']}; load average before: {load}; after: {after}. Each stage is "
                 "built alone, with its own input/output layout conversions: the stages do not sum to the whole.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18", help=f"a zoo model: {', '.join(models.list_models())}")
    p.add_argument("--input", default=None, help="input shape N,C,H,W (default: the zoo's; resnet18 112x112)")
    p.add_argument("--batches", default="1")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=30, help="timed calls of each stage at least")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--turn", type=int, default=10, help="timed calls of one stage in a row, after an untimed one")
    p.add_argument("--min-time", dest="min_time", type=float, default=10.0,
                   help="seconds of interleaved timing at least, per batch size")
    p.add_argument("--flush-mb", dest="flush_mb", type=int, default=0,
                   help="write this many MB before each timed call, every call timed alone (cold caches: 8 empties "
                        "L2 here, 400 L3; --turn and --warmup then do not apply); 0 = warm, in turns")
    p.add_argument("--name", default="stages", help="stem of the result files (NAME.json, NAME.md)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if args.model not in models.list_models():
        p.error(f"--model {args.model!r} is not a zoo model; choose one of {', '.join(models.list_models())}")
    shape = (tuple(int(v) for v in args.input.split(",")) if args.input
             else REDUCED_INPUT.get(args.model, models.input_shape(args.model)))
    tvm_build.set_threads(args.threads)
    torch.set_num_threads(args.threads)
    meta: dict[str, Any] = {"benchmark": "stages", "threads": args.threads, "turn": args.turn, "flush_mb": args.flush_mb,
                            "environment": environment()}
    return run_in_tempdir(meta, lambda tmp: [run(args.model, shape, int(b), args, tmp) for b in args.batches.split(",")],
                          markdown, args.out, args.name)


if __name__ == "__main__":
    raise SystemExit(main())
