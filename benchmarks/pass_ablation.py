"""One of rwdeploy's TVM passes on and off, whole models against ONNX Runtime.

    python benchmarks/pass_ablation.py                         # in-place epilogues: resnet18, resnet20, mobilenet_v2
    python benchmarks/pass_ablation.py --pass reshape-sink --models "" --batches 1 \
        --timm vit_tiny_patch16_224,deit_tiny_patch16_224
    python benchmarks/pass_ablation.py --pass box-tile --models resnet18 --rate 0.7 --batches 8
    python benchmarks/pass_ablation.py --pass winograd --models resnet18,vgg16_bn,resnet56,resnet20 --batches 1,8
    python benchmarks/pass_ablation.py --pass row-winograd --rate 0.7 --models resnet20,resnet56,resnet18 --batches 1,8
    python benchmarks/pass_ablation.py --pass pool-rows --rate 0.7 --models lenet5,vgg16_bn,resnet18 --batches 1,8
    python benchmarks/pass_ablation.py --pass row-winograd-flat --rate 0.7 --models resnet20,resnet56 --batches 1,8
    python benchmarks/pass_ablation.py --pass split-reduction --rate 0.7 --models lenet5,vgg16_bn --batches 1
    python benchmarks/pass_ablation.py --pass batch-split-tiers --rate 0.7 --models mobilenet_v2,resnet18 --batches 8

Passes (`--pass`):
- `inplace-epilogue`: a kernel whose epilogue reads a tensor nothing reads afterwards (a residual
  conv's shortcut) writes its output over it (`tvm_inplace_epilogue`); off, every kernel writes a
  fresh tensor. Counted: the kernel functions of the shipped build that write in place.
- `reshape-sink`: elementwise ops computed before the reshapes that feed them, so that a
  transformer MLP's GELU and residual add fuse into its matmuls (`tvm_reshape_sink`). Counted:
  the build's distinct kernel functions (a ViT's 12 blocks call the same ones).
- `injective-inline`: a kernel of data-movement stages (reshape, transpose, slice) reads its
  source directly instead of through intermediate copies (`tvm_injective`). Counted: the kernel
  functions left unscheduled.
- `box-tile`: where no run of output rows fills a register tile to `LATENCY_FMAS`, the tile is a
  box across rows or images (`tvm_schedule.pixel_box`); off, runs of rows only. Counted: the
  layers whose register tile is a box.
- `padded-copy`: a pixel conv's padded input copy runs its interior columns as one vectorised
  loop (`tvm_pixel_conv.vectorize_padded_copy`); off, a select per element. Counted: the copies
  so vectorised.
- `winograd`: 3x3 stride-1 convs with enough input channels run as Winograd F(2x2, 3x3) or
  F(4x4, 3x3) where it pays (`tvm_winograd.choose_winograd`); off, all as direct register-tiled
  convs. Counted: the distinct conv shapes (weight, output shape) that went Winograd.
- `row-winograd`: 3x3 stride-1 pixel-vectorised (few-channel) convs run as Winograd F(2, 3) or
  F(4, 3) along the columns (`tvm_row_winograd.choose_row_winograd`); off, as direct pixel convs.
  Counted: the distinct output sizes (H, W) that went that way.
- `row-winograd-flat`: a pixel conv on a flattened map (rows shorter than a vector: an 8x8 map)
  runs as row Winograd folded, its row tiles side by side in the vectors
  (`tvm_row_winograd.conv2d_nchw_row_winograd(folded=True)`); off, as the flat direct conv.
  Counted: the distinct flat output sizes (H, W) that went folded.
- `split-reduction`: a batch-1 dense layer of one or two output vectors (a classifier of few
  classes) sums its reduction in independent slices (`tvm_split_reduction`); off, one chain of
  FMAs per output vector. Counted: the dense layers so split.
- `pool-rows`: a channel-major (NCHW) max pool's row pass in explicit vectors
  (`tvm_pool.vectorize_row_pass`); off, its loop is left to LLVM's vectoriser. Counted: the
  pools so vectorised.
- `batch-split-tiers`: a batch's leading layers run per image up to a cut placed after the last
  tensor of half the core's L2 or more, else of twice it (`tvm_batch_split.LARGE_TENSOR_TIERS`),
  where that leaves at least two convs per image (`MIN_CONVS_PER_IMAGE`); off, twice the L2
  only and any cut (the single threshold before the tiers). Counted: the convs run per image.

`--rate R` builds the slim model instead: the smallest-L2 filters of every prunable channel
group zeroed at rate R and removed (`--align off`), as `structured.py` does.

Each zoo model (random weights, trained-looking batch norms as in `structured.py`) and each timm
architecture (random weights, its default input size; needs the test extra) is built for the cpu
target with the pass off and on. Both builds are checked against torch (and for kernels left
unscheduled), the model is exported once to ONNX, and all three are timed interleaved in turns
(`time_interleaved`), so the host's drift hits all alike.
Results: benchmarks/results/NAME.json and NAME.md with os.getloadavg() before and after.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rwdeploy import models
from rwdeploy.passes.channel_groups import analyze_channel_groups
from rwdeploy.passes.trace import trace_model
from rwdeploy.runtime import (tvm_batch_split, tvm_build, tvm_injective, tvm_inplace_epilogue, tvm_pool,
                              tvm_reshape_sink, tvm_row_winograd, tvm_schedule, tvm_winograd)
from rwdeploy.runtime.environment import environment
from rwdeploy.runtime.latency import time_interleaved
from rwdeploy.runtime.onnx_export import export_onnx
from rwdeploy.runtime.ort_runner import OrtRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured import (REDUCED_INPUT, ours, prunable_conv_groups, randomize_batchnorm,  # noqa: E402
                        require_scheduled, run_in_tempdir, zero_smallest_filters, zoo_models)
from targets import timm_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@contextlib.contextmanager
def _replaced(module: Any, attr: str, value: Any) -> Any:
    """`module.attr` is `value` inside the block, what it was after."""
    saved = getattr(module, attr)
    setattr(module, attr, value)
    try:
        yield
    finally:
        setattr(module, attr, saved)


@contextlib.contextmanager
def _batch_split_untiered() -> Any:
    """The batch split as it was before its tiers: twice the core's cache only, any cut."""
    with _replaced(tvm_batch_split, "LARGE_TENSOR_TIERS", tvm_batch_split.LARGE_TENSOR_TIERS[-1:]), \
            _replaced(tvm_batch_split, "MIN_CONVS_PER_IMAGE", 0):
        yield


def _no_op_pass() -> Any:
    import tvm

    return tvm.transform.module_pass(lambda mod, _ctx: mod, opt_level=0, name="rwdeploy.NoOp")


class _Counted:
    """Wraps a schedule helper and counts, per build, the distinct cases in which it applied:
    `applied(args, result)` gives a key for such a call, None otherwise (the legaliser and the
    schedule both ask `register_tile` for the same layer's tile)."""

    def __init__(self, module: Any, attr: str, applied: Any) -> None:
        self.module, self.attr, self.applied = module, attr, applied
        self.inner = getattr(module, attr)
        self.keys: set[Any] = set()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.inner(*args, **kwargs)
        key = self.applied(args, result)
        if key is not None:
            self.keys.add(key)
        return result

    def install(self) -> None:
        setattr(self.module, self.attr, self)


def _box_key(args: tuple[Any, ...], tile: Any) -> Any:
    """A box tile's layer: its pixels are not the run of whole rows `pixel_tile` gives that count."""
    extents = list(args[0])
    if tile.pixels == tuple(tvm_schedule.pixel_tile(extents, math.prod(tile.pixels))):
        return None
    return (tuple(extents), tile)


def _copy_key(args: tuple[Any, ...], vectorised: bool) -> Any:
    return len(_COPIES.keys) if vectorised else None   # one call per copy


def _winograd_key(args: tuple[Any, ...], chosen: Any) -> Any:
    return (tuple(args[0]), tuple(args[-1])) if chosen is not None else None   # (weight, output shape)


_BOXES = _Counted(tvm_schedule, "register_tile", _box_key)
_COPIES = _Counted(tvm_schedule, "vectorize_padded_copy", _copy_key)
_WINOGRAD = _Counted(tvm_winograd, "choose_winograd", _winograd_key)
_ROW_WINOGRAD = _Counted(tvm_row_winograd, "choose_row_winograd",
                         lambda args, chosen: args[3:5] if chosen is not None else None)  # output (H, W)
_FOLDED = _Counted(tvm_row_winograd, "choose_row_winograd",
                   lambda args, chosen: args[3:5] if chosen is not None and args[-1] else None)  # flat (H, W)
_POOLS = _Counted(tvm_pool, "vectorize_row_pass", lambda args, done: len(_POOLS.keys) if done else None)
_SPLITS = _Counted(tvm_schedule, "split_one_pixel_reduction",
                   lambda args, block: len(_SPLITS.keys) if block is not args[1] else None)


def _convs_before(args: tuple[Any, ...], cut: Any) -> Any:
    """The convs a batch-split cut leaves per image (None: no cut)."""
    return None if cut is None else tvm_batch_split.convs_through(list(args[0].body.blocks[0].bindings), cut)


_CUTS = _Counted(tvm_batch_split, "choose_cut", _convs_before)
_COUNTED = (_BOXES, _COPIES, _WINOGRAD, _ROW_WINOGRAD, _FOLDED, _POOLS, _SPLITS, _CUTS)
for _counted in _COUNTED:
    _counted.install()


def _all_kernels(art: Any) -> int:
    return sum(len(v) for k, v in art.kernels.items() if k not in ("notes", "in place") and isinstance(v, list))


# --pass NAME -> (how to switch it off for one build, what is counted in the build it is on in, its label)
PASSES = {
    "inplace-epilogue": (lambda: _replaced(tvm_inplace_epilogue, "reads_only_where_written",
                                           lambda *func_and_params: False),
                         lambda art: len(art.kernels.get("in place", [])), "kernels in place"),
    "reshape-sink": (lambda: _replaced(tvm_reshape_sink, "reshape_sink_pass", _no_op_pass),
                     _all_kernels, "kernel functions"),
    "injective-inline": (lambda: _replaced(tvm_injective, "schedule_injective", lambda func: None),
                         lambda art: len(art.kernels.get("unscheduled", [])), "kernel functions left unscheduled"),
    "box-tile": (lambda: _replaced(tvm_schedule, "pixel_box", tvm_schedule.pixel_tile),
                 lambda art: len(_BOXES.keys), "layers with box register tiles"),
    "padded-copy": (lambda: _replaced(tvm_schedule, "vectorize_padded_copy", lambda sch, block, lanes: False),
                    lambda art: len(_COPIES.keys), "padded copies vectorised"),
    "winograd": (lambda: _replaced(tvm_winograd, "choose_winograd", lambda *layer: None),
                 lambda art: len(_WINOGRAD.keys), "conv shapes run as Winograd"),
    "row-winograd": (lambda: _replaced(tvm_row_winograd, "choose_row_winograd", lambda *layer: None),
                     lambda art: len(_ROW_WINOGRAD.keys), "pixel conv shapes run as row Winograd"),
    "row-winograd-flat": (lambda: _replaced(tvm_row_winograd, "choose_row_winograd", _row_winograd_unflat()),
                          lambda art: len(_FOLDED.keys), "flat-map conv shapes run as folded row Winograd"),
    "split-reduction": (lambda: _replaced(tvm_schedule, "split_one_pixel_reduction", lambda sch, red, vectors: red),
                        lambda art: len(_SPLITS.keys), "dense layers with split reductions"),
    "pool-rows": (lambda: _replaced(tvm_pool, "vectorize_row_pass", lambda sch, lanes: False),
                  lambda art: len(_POOLS.keys), "NCHW max pools with vectorised row passes"),
    "batch-split-tiers": (_batch_split_untiered,
                          lambda art: max(_CUTS.keys, default=0), "convs run per image"),
}


def _row_winograd_unflat() -> Any:
    """`choose_row_winograd` as it was before folding: flat maps go direct."""
    chosen = tvm_row_winograd.choose_row_winograd

    def choose(kernel: Any, strides: Any, dilation: Any, out_height: int, out_width: int, lanes: int,
               flat: bool) -> Any:
        return None if flat else chosen(kernel, strides, dilation, out_height, out_width, lanes, flat)

    return choose


def build(net: torch.nn.Module, x: torch.Tensor, pass_name: str, on: bool, threads: int) -> Any:
    """A cpu build of `net` with the pass `pass_name` on or off."""
    for counted in _COUNTED:
        counted.keys.clear()
    with (contextlib.nullcontext() if on else PASSES[pass_name][0]()):
        art = tvm_build.build(net, x, "cpu", threads=threads)
    require_scheduled(art, f"the build with {pass_name} {'on' if on else 'off'}")
    return art


def _model(name: str, timm: bool, rate: float = 0.0) -> tuple[torch.nn.Module, tuple[int, ...]]:
    if timm:
        return timm_model(name)
    torch.manual_seed(0)
    net = models.create(name)
    randomize_batchnorm(net, seed=1)
    shape = REDUCED_INPUT.get(name, models.input_shape(name))
    if not rate:
        return net.eval(), shape
    example = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    net.eval()
    groups = prunable_conv_groups(net, analyze_channel_groups(trace_model(net, example).gm, example))
    zero_smallest_filters(net, groups, rate)
    return ours(net, example, "off", measure=False)[0].eval(), shape


def run(name: str, timm: bool, batch: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    net, shape = _model(name, timm, args.rate)
    x = torch.randn(batch, *shape[1:], generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        want = net(x).numpy()
    scale = max(float(np.abs(want).max()), 1e-12)
    calls, counted = {}, {}
    for label, on in (("off", False), ("on", True)):
        art = build(net, x, args.pass_name, on, args.threads)
        calls[label], got = tvm_build.bind_local(art, x)
        err = float(np.abs(got - want).max()) / scale
        if err > 1e-4:
            raise RuntimeError(f"{name}: the build with {args.pass_name} {label} disagrees with torch "
                               f"(max rel error {err:.1e})")
        counted[label] = PASSES[args.pass_name][1](art)
    path = workdir / f"{name}_b{batch}.onnx"
    export_onnx(net, x, path)
    calls["ort"] = OrtRunner(path, threads=args.threads).bind(x.numpy())
    warm = time_interleaved(calls, warmup=args.warmup, min_runs=args.runs, max_runs=max(args.runs, 20000),
                            min_time_s=args.min_time, calls_per_turn=args.turn)
    ms = {label: warm[label].median_ms for label in calls}
    print(f"{name} b{batch}: {args.pass_name} on / off {ms['on'] / ms['off']:.3f}, "
          f"TVM/ORT {ms['off'] / ms['ort']:.3f} -> {ms['on'] / ms['ort']:.3f}", file=sys.stderr)
    return {"model": name, "source": "timm" if timm else "zoo", "rate": args.rate,
            "input_shape": [batch, *shape[1:]], "ms": ms,
            "counted": counted, "on_vs_off": ms["on"] / ms["off"],
            "vs_ort": {label: ms[label] / ms["ort"] for label in ("off", "on")}}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    counted = PASSES[meta["pass"]][2]
    lines = [f"| model | input | {counted} off -> on | TVM off ms | TVM on ms | ORT ms | on ÷ off | "
             "TVM/ORT off -> on |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        model = r["model"] + (f" {r['rate']:.0%}" if r.get("rate") else "")
        lines.append(f"| {model} ({r['source']}) | {'×'.join(map(str, r['input_shape']))} | "
                     f"{r['counted']['off']} -> {r['counted']['on']} | {ms['off']:.3f} | {ms['on']:.3f} | "
                     f"{ms['ort']:.3f} | {r['on_vs_off']:.3f} | {r['vs_ort']['off']:.2f} -> {r['vs_ort']['on']:.2f} |")
    load = ", ".join(f"{v:.2f}" for v in meta["loadavg_before"])
    after = ", ".join(f"{v:.2f}" for v in meta["loadavg_after"])
    lines += ["", f"rwdeploy's cpu TVM build with `{meta['pass']}` off and on (`benchmarks/pass_ablation.py`, "
              f"see its docstring); vs ONNX Runtime {meta['environment']['onnxruntime']}; {meta['threads']} "
              f"thread(s); interleaved in turns of 1 untimed + {meta['turn']} timed calls, medians; "
              f"{meta['environment']['cpu']}; load average before: {load}; after: {after}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pass", dest="pass_name", choices=sorted(PASSES), default="inplace-epilogue",
                   help="the pass switched off in one build (default: inplace-epilogue)")
    p.add_argument("--models", default="resnet18,resnet20,mobilenet_v2",
                   help=f"zoo models (\"\" for none): {', '.join(models.list_models())}")
    p.add_argument("--timm", default="", help="comma list of timm architectures (random weights, default "
                                              "input size; needs the test extra)")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--rate", type=float, default=0.0,
                   help="zoo models pruned at this rate and slimmed (--align off); 0: the dense models")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=30, help="timed calls of each build at least")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--turn", type=int, default=5, help="timed calls of one build in a row, after an untimed one")
    p.add_argument("--min-time", dest="min_time", type=float, default=10.0,
                   help="seconds of interleaved timing at least, per model and batch")
    p.add_argument("--name", default=None, help="stem of the result files (NAME.json, NAME.md; default: "
                                                   "the pass, e.g. inplace_epilogue)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    names = [(m, False) for m in (zoo_models(p, args.models) if args.models else [])]
    names += [(m, True) for m in args.timm.split(",") if m]
    if not names:
        p.error("--models and --timm are both empty: name at least one model")
    if not 0.0 <= args.rate < 1.0:
        p.error(f"--rate {args.rate}: a fraction of filters in [0, 1), e.g. 0.7")
    try:
        batches = [int(v) for v in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches {args.batches!r}: comma-separated integers, e.g. 1,8")
    tvm_build.set_threads(args.threads)
    torch.set_num_threads(args.threads)
    name = args.name or args.pass_name.replace("-", "_")
    meta: dict[str, Any] = {"benchmark": "pass_ablation", "pass": args.pass_name, "rate": args.rate,
                            "threads": args.threads,
                            "turn": args.turn, "batches": batches, "environment": environment()}
    return run_in_tempdir(meta, lambda tmp: [run(m, t, b, args, tmp) for m, t in names for b in batches],
                          markdown, args.out, name)


if __name__ == "__main__":
    raise SystemExit(main())
