"""Structured pruning, measured: zoo models at 30/50/70% filter sparsity, dense vs slim.

For each model and rate, the smallest-L2 filters of every prunable conv channel group are
zeroed (conv weights only: biases and BatchNorm keep non-trivial values, so removed channels
still carry constants), then:

* ours: trace -> analyze -> remove_zero_channels; wall time, params, MACs, max error against
  the zeroed model;
* torch-pruning (where installed): its DependencyGraph prunes the same channels; wall time,
  params, max error against the zeroed model (it drops the removed channels' constants);
* ONNX Runtime CPU latency, zeroed dense vs our slim model, at each batch size, and the ratio
  (latency speed-up / MAC reduction): 1.0 means the runtime turns every saved MAC into time.

Each row also gives the bytes the slim model stores (state_dict: parameters + buffers such as
folded constants) and its ONNX file size, relative to the zeroed dense model's.

Writes benchmarks/results/structured.json and .md (or under --out) and prints the table. The machine is
shared, so the JSON records os.getloadavg() before and after; read latencies with that in mind.

    python benchmarks/structured.py                      # all models (resnet18 at 112x112)
    python benchmarks/structured.py --models lenet5,resnet20 --runs 10
    python benchmarks/structured.py --models resnet20,resnet56 --rates 0.5 --out benchmarks/results/border_kernels
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from rwdeploy import models
from rwdeploy.io import atomic_file
from rwdeploy.passes.channel_groups import analyze_channel_groups
from rwdeploy.passes.layer_stats import layer_stats, totals
from rwdeploy.passes.remove_zero_channels import remove_zero_channels
from rwdeploy.passes.trace import trace_model
from rwdeploy.passes.whole_model_alignment import choose_alignment
from rwdeploy.runtime.align_timing import OrtLayerTimer, OrtModelTimer, TvmModelTimer, target_lanes
from rwdeploy.passes.verify import compare_on
from rwdeploy.runtime.environment import environment
from rwdeploy.runtime.latency import time_interleaved
from rwdeploy.runtime.onnx_export import export_onnx
from rwdeploy.runtime import tvm_build
from rwdeploy.runtime.ort_runner import OrtRunner

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODELS = "lenet5,resnet20,resnet56,vgg16_bn,mobilenet_v2,resnet18"
# ResNet-18 at 224x224 and batch 8 takes ~1 s per single-thread run on this machine; at
# 112x112 the whole benchmark fits in a few minutes and the layer shapes keep their ratios.
REDUCED_INPUT = {"resnet18": (1, 3, 112, 112)}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def randomize_batchnorm(module: nn.Module, seed: int) -> None:
    """Trained-looking BN statistics and affine parameters (a fresh BN is the identity and its
    shift is zero, which would hide what dropping a channel's constant costs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)


def _channel_index(slice_: Any, channel: int) -> list[int]:
    idx = slice_.indices[channel]
    return [int(i) for i in idx] if isinstance(idx, (list, tuple)) else [int(idx)]


def prunable_conv_groups(module: nn.Module, analysis: Any) -> list[Any]:
    """Groups that may be removed and whose every producer is a convolution's weight."""
    owners = dict(module.named_modules())
    out = []
    for g in analysis.groups:
        producers = [s for s in g.slices if s.role == "producer"]
        if g.pinned or not producers:
            continue
        if all(isinstance(owners.get(s.tensor.rsplit(".", 1)[0]), _CONVS) for s in producers):
            out.append(g)
    return out


def zero_smallest_filters(module: nn.Module, groups: list[Any], rate: float) -> list[tuple[str, list[int]]]:
    """Zero `rate` of each group's channels, those with the smallest L2 norm over all the
    group's producer weights. A group channel may span several tensor channels (a GroupNorm
    group, a head): it is zeroed whole. Returns, per zeroed group, one producing conv and the
    filter indices zeroed in it (what another pruner is asked to remove)."""
    params = dict(module.named_parameters())
    zeroed: list[tuple[str, list[int]]] = []
    with torch.no_grad():
        for g in groups:
            producers = [s for s in g.slices if s.role == "producer"]
            k = int(round(rate * g.size))
            if k == 0 or k >= g.size:  # never empty a group completely: the net would be cut
                continue
            norms = torch.zeros(g.size)
            for s in producers:
                w = params[s.tensor]
                for c in range(g.size):
                    norms[c] += w.index_select(s.dim, torch.tensor(_channel_index(s, c))).pow(2).sum()
            chosen = torch.argsort(norms)[:k].tolist()
            handle = None
            for s in producers:
                idx = sorted(i for c in chosen for i in _channel_index(s, c))
                params[s.tensor].index_fill_(s.dim, torch.tensor(idx), 0.0)
                if handle is None and s.dim == 0:
                    handle = (s.tensor.rsplit(".", 1)[0], idx)
            if handle is not None:
                zeroed.append(handle)
    return zeroed


def _worst_error(reference: nn.Module, candidate: nn.Module, probes: list[torch.Tensor]) -> tuple[float, float]:
    check = compare_on(reference, candidate, probes, tolerance=0.0)  # the compile's definition of the error
    return check.max_abs, check.max_rel


def ours(zeroed: nn.Module, example: torch.Tensor, align: str = "off", threads: int = 1,
         measure: bool = True, target: str = "onnx", batch: int = 1,
         ) -> tuple[nn.Module, float, int, dict[str, Any] | None]:
    """Our slim model, the pass's wall time, the zero channels kept for alignment, and for `auto`
    the whole-model choice (as `compile --target TARGET --align-batch BATCH` makes it: the
    candidates timed as whole models at `batch`, interleaved, in ORT by `OrtModelTimer` for onnx,
    as TVM builds by `TvmModelTimer` for cpu; the per-group plan's groups by `OrtLayerTimer`);
    with `measure` off, auto is the per-group plan by the cost model, as `compile --no-measure`."""
    t0 = time.perf_counter()
    gm = trace_model(zeroed, example).gm
    analysis = analyze_channel_groups(gm, example)
    if align == "auto" and measure:
        timed = (example[:1] if batch == 1
                 else torch.randn(batch, *example.shape[1:], generator=torch.Generator().manual_seed(batch)))
        timer = (TvmModelTimer(timed, "cpu", threads=threads) if target == "cpu"
                 else OrtModelTimer(timed, "onnx", threads=threads))
        result = choose_alignment(gm, example, measurer=timer, lanes=target_lanes(target), analysis=analysis,
                                  layer_measurer=OrtLayerTimer(target, threads=threads), batch=batch)
    else:
        result = remove_zero_channels(gm, example, analysis=analysis, align=align, lanes=target_lanes("onnx"))
    al = result.record.alignment
    kept = sum(g.kept_for_alignment for g in al.groups) if al else 0
    return result.gm, time.perf_counter() - t0, kept, al.whole_model if al else None


def torch_pruning_prune(zeroed: nn.Module, example: torch.Tensor,
                        filters: list[tuple[str, list[int]]]) -> tuple[nn.Module, float]:
    """torch-pruning removes the same channels: one pruning group per zeroed channel group,
    rooted at one of its producing convs (its DependencyGraph finds the coupled layers)."""
    import torch_pruning as tp

    model = copy.deepcopy(zeroed)
    t0 = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False)
    modules = dict(model.named_modules())
    for name, idxs in filters:
        group = graph.get_pruning_group(modules[name], tp.prune_conv_out_channels, idxs=idxs)
        if graph.check_pruning_group(group):
            group.prune()
    return model, time.perf_counter() - t0


def measure_variants(variants: dict[str, nn.Module], example: torch.Tensor, workdir: Path,
                     args: argparse.Namespace, tvm_variants: dict[int, dict[str, nn.Module]] | None = None,
                     ) -> tuple[dict[int, dict[str, Any]], dict[str, int]]:
    """ORT latency of every model per batch size, their calls alternating (dense, slim, dense,
    ...) so that load drifting on a shared machine hits all alike; and their ONNX file sizes.
    With --tvm, each variant's TVM build too (`tvm_variants[batch]` replaces some at that batch:
    auto's TVM choice, timed at that batch)."""
    runners, sizes = {}, {}
    for variant, module in variants.items():
        path = workdir / f"{variant}.onnx"
        sizes[variant] = export_onnx(module, example, path).size_bytes
        runners[variant] = OrtRunner(path, threads=args.threads)
    out: dict[int, dict[str, Any]] = {}
    for b in args.batches:
        x = torch.randn(b, *example.shape[1:], generator=torch.Generator().manual_seed(b))
        calls = {v: r.bind(x.numpy()) for v, r in runners.items()}
        if args.tvm:  # rwdeploy's cpu build of each variant at this batch, timed in the same rounds
            for variant, module in {**variants, **(tvm_variants or {}).get(b, {})}.items():
                art = tvm_build.build(module, x, "cpu", threads=args.threads)
                calls[f"tvm {variant}"], got = tvm_build.bind_local(art, x)
                with torch.no_grad():
                    want = module(x).numpy()
                err = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-12))
                if err > 1e-4:
                    raise RuntimeError(f"TVM build of {variant} disagrees with torch: max rel error {err:.1e}")
        stats = time_interleaved(calls, warmup=args.warmup, min_runs=args.runs, max_runs=max(args.runs, 2000),
                                 min_time_s=args.min_time, calls_per_turn=args.turn)
        out[b] = {v: {"median_ms": st.median_ms, "p90_ms": st.p90_ms, "n": st.n} for v, st in stats.items()}
    return out, sizes


def run_case(name: str, rate: float, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    shape = REDUCED_INPUT.get(name, models.input_shape(name))
    torch.manual_seed(0)
    net = models.create(name)
    randomize_batchnorm(net, seed=1)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    probes = [example] + [torch.randn(4, *shape[1:], generator=torch.Generator().manual_seed(3 + i)) for i in range(2)]

    gm = trace_model(net, example).gm
    groups = prunable_conv_groups(net, analyze_channel_groups(gm, example))
    zeroed = copy.deepcopy(net)
    filters = zero_smallest_filters(zeroed, groups, rate)

    slim, our_s, our_kept, our_whole = ours(zeroed, example, args.aligns[0], args.threads, not args.no_measure)
    our_err = _worst_error(zeroed, slim, probes)
    t_dense, t_slim = totals(zeroed, layer_stats(zeroed, example)), totals(slim, layer_stats(slim, example))
    row: dict[str, Any] = {
        "model": name, "input_shape": list(shape), "rate": rate, "groups_pruned": len(groups),
        "filters_zeroed": sum(len(idx) for _, idx in filters),
        "params_dense": t_dense.params, "params_slim": t_slim.params,
        "macs_dense": t_dense.macs, "macs_slim": t_slim.macs,
        "state_bytes_dense": _state_bytes(zeroed), "state_bytes_slim": _state_bytes(slim),
        "ours_s": our_s, "ours_max_abs": our_err[0], "ours_max_rel": our_err[1], "align": args.aligns[0],
        **({"kept_for_alignment": our_kept, "whole_model": our_whole} if our_whole else {}),
    }
    aligned: dict[str, nn.Module] = {}
    for align in args.aligns[1:]:  # the same zeroed model with channels kept for alignment
        aligned[align], _, kept, whole = ours(zeroed, example, align, args.threads, not args.no_measure)
        err = _worst_error(zeroed, aligned[align], probes)
        row.setdefault("aligned", {})[align] = {
            "kept_for_alignment": kept, "macs_slim": totals(aligned[align], layer_stats(aligned[align], example)).macs,
            "max_abs": err[0], "max_rel": err[1], **({"whole_model": whole} if whole else {})}
    # The MACs the pruning leaves (no zero channel kept): what `speedup_per_pruned_mac_reduction`
    # divides by, so that keeping channels for alignment cannot raise a ratio at equal speed.
    if args.aligns[0] == "off":
        row["macs_pruned"] = t_slim.macs
    elif "off" in row.get("aligned", {}):
        row["macs_pruned"] = row["aligned"]["off"]["macs_slim"]
    else:
        pruned = ours(zeroed, example, "off", args.threads, False)[0]
        row["macs_pruned"] = totals(pruned, layer_stats(pruned, example)).macs
    tvm_variants: dict[int, dict[str, nn.Module]] = {}
    tvm_macs: dict[int, int] = {}
    if args.tvm and "auto" in args.aligns and not args.no_measure:
        # what `compile --target cpu --align auto --align-batch B` ships: the candidates timed as
        # TVM builds at batch B, each batch's column (or batch 1's for every column: --align-batch first)
        for b in args.batches if args.align_batch == "each" else args.batches[:1]:
            timed_at = b if args.align_batch == "each" else 1
            tvm_auto, _, kept, whole = ours(zeroed, example, "auto", args.threads, True, target="cpu",
                                            batch=timed_at)
            err = _worst_error(zeroed, tvm_auto, probes)
            choice = {"kept_for_alignment": kept, "macs_slim": totals(tvm_auto, layer_stats(tvm_auto, example)).macs,
                      "max_abs": err[0], "max_rel": err[1], "whole_model": whole}
            if not tvm_variants:
                row["tvm_auto"] = choice  # the first batch's, where earlier runs kept their one choice
            row.setdefault("tvm_auto_by_batch", {})[str(timed_at)] = choice  # keyed by the batch it was timed at
            for used_at in (args.batches if args.align_batch == "first" else [b]):
                tvm_variants[used_at] = {"slim" if args.aligns[0] == "auto" else "align auto": tvm_auto}
                tvm_macs[used_at] = choice["macs_slim"]
    if args.torch_pruning:
        try:
            theirs, tp_s = torch_pruning_prune(zeroed, example, filters)
            tp_err = _worst_error(zeroed, theirs, probes)
            row.update(tp_s=tp_s, tp_max_abs=tp_err[0], tp_max_rel=tp_err[1],
                       tp_params=sum(p.numel() for p in theirs.parameters()))
        except Exception as err:  # record, do not hide: a failure is a result too
            row["tp_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if not args.no_measure:
        latency, sizes = measure_variants({"dense": zeroed, "slim": slim, **{f"align {a}": m for a, m in aligned.items()}},
                                          example, workdir, args, tvm_variants)
        row["onnx_bytes_dense"], row["onnx_bytes_slim"] = sizes["dense"], sizes["slim"]
        mac_reduction = t_dense.macs / t_slim.macs
        row["latency"] = {}
        for b, lat in latency.items():
            speedup = lat["dense"]["median_ms"] / lat["slim"]["median_ms"]
            row["latency"][str(b)] = {**lat, "speedup": speedup, "speedup_per_mac_reduction": speedup / mac_reduction,
                                      "speedup_per_pruned_mac_reduction": speedup * row["macs_pruned"] / t_dense.macs}
            for a in aligned:
                row["aligned"][a].setdefault("speedup", {})[str(b)] = lat["dense"]["median_ms"] / lat[f"align {a}"]["median_ms"]
                if f"tvm align {a}" in lat:
                    row["aligned"][a].setdefault("tvm_speedup", {})[str(b)] = (
                        lat["tvm dense"]["median_ms"] / lat[f"tvm align {a}"]["median_ms"])
            if "tvm slim" in lat:
                tvm_speedup = lat["tvm dense"]["median_ms"] / lat["tvm slim"]["median_ms"]
                shipped = tvm_macs[b] if "slim" in tvm_variants.get(b, {}) else t_slim.macs
                row["latency"][str(b)]["tvm"] = {"speedup": tvm_speedup,
                                                 "speedup_per_mac_reduction": tvm_speedup * shipped / t_dense.macs,
                                                 "speedup_per_pruned_mac_reduction":
                                                     tvm_speedup * row["macs_pruned"] / t_dense.macs,
                                                 "tvm_over_ort_slim": lat["tvm slim"]["median_ms"] / lat["slim"]["median_ms"]}
    return row


def _state_bytes(module: nn.Module) -> int:
    """Bytes of every stored tensor (parameters and buffers, e.g. folded constants)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    batches = meta["batches"]
    head = ["model", "rate", "params dense→slim", "MACs dense→slim", "stored / ONNX bytes slim÷dense"]
    tvm = meta.get("tvm")
    for b in batches:
        head += [f"ORT b{b} ms dense→slim", f"b{b} speed-up (÷MAC red.)"]
        if tvm:
            head += [f"TVM b{b} ms dense→slim", f"TVM b{b} speed-up (÷MAC red.)"]
    aligns = meta.get("aligns", ["off"])[1:]
    head += [f"b{b} speed-up, align {a}{' ORT / TVM' if tvm else ''} (kept)" for a in aligns for b in batches]
    choices = any("tvm_auto" in r for r in rows)
    if choices:
        head.append("auto's choice ORT / TVM (kept)")
    head += ["ours: s, max rel err", "torch-pruning: s, max rel err"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], f"{r['rate']:.0%}",
                 f"{_fmt_count(r['params_dense'])}→{_fmt_count(r['params_slim'])}",
                 f"{_fmt_count(r['macs_dense'])}→{_fmt_count(r['macs_slim'])}",
                 f"{r['state_bytes_slim'] / r['state_bytes_dense']:.1%} / "
                 + (f"{r['onnx_bytes_slim'] / r['onnx_bytes_dense']:.1%}" if "onnx_bytes_slim" in r else "-")]
        for b in batches:
            lat = r.get("latency", {}).get(str(b))
            if lat:
                cells += [f"{lat['dense']['median_ms']:.2f}→{lat['slim']['median_ms']:.2f}",
                          f"{lat['speedup']:.2f}× ({lat['speedup_per_mac_reduction']:.2f})"]
            else:
                cells += ["-", "-"]
            if tvm:
                t = (lat or {}).get("tvm")
                cells += ([f"{lat['tvm dense']['median_ms']:.2f}→{lat['tvm slim']['median_ms']:.2f}",
                           f"{t['speedup']:.2f}× ({t['speedup_per_mac_reduction']:.2f})"] if t else ["-", "-"])
        for a in aligns:
            al = r.get("aligned", {}).get(a, {})
            for b in batches:
                sp = al.get("speedup", {}).get(str(b))
                tsp = al.get("tvm_speedup", {}).get(str(b))
                chose = f", {al['whole_model']['chosen']}" if al.get("whole_model") else ""
                tvm_part = f" / TVM {tsp:.2f}×" if tsp is not None else ""
                cells.append(f"{sp:.2f}×{tvm_part} ({al['kept_for_alignment']}{chose})" if sp is not None else "-")
        if choices:
            ort = r if "whole_model" in r else r.get("aligned", {}).get("auto", {})
            cells.append(" / ".join([_choice(ort), _tvm_choices(r)]))
        cells.append(f"{r['ours_s']:.2f}, {r['ours_max_rel']:.1e}")
        if "tp_s" in r:
            cells.append(f"{r['tp_s']:.2f}, {r['tp_max_rel']:.1e}")
        else:
            cells.append(r.get("tp_error", "not installed"))
        lines.append("| " + " | ".join(cells) + " |")
    load = ", ".join(f"{x:.2f}" for x in meta["loadavg_before"])
    for label, key in (("ONNX Runtime", None), ("TVM", "tvm")) if tvm else (("ONNX Runtime", None),):
        for b in batches:
            for rate in sorted({r["rate"] for r in rows}):
                at = sorted(x for r in rows if r["rate"] == rate and (x := _ratio(r, b, key)) is not None)
                pruned = [x for r in rows if r["rate"] == rate
                          and (x := _ratio(r, b, key, "speedup_per_pruned_mac_reduction")) is not None]
                if at:
                    lines.append(f"- {label}, b{b}, {rate:.0%}: median speed-up ÷ MAC reduction "
                                 f"{statistics.median(at):.2f} over {len(at)} models"
                                 + (f" (÷ the pruning's MAC reduction, no channel kept: {statistics.median(pruned):.2f})"
                                    if len(pruned) == len(at) else ""))
    lines += ["", f"ONNX Runtime {meta['environment']['onnxruntime']}, CPU provider (input and outputs bound once), "
              f"{meta['threads']} thread(s), "
              f"median of ≥{meta['runs']} runs, " + _turns(meta.get("turn", 1)) + f"; {meta['environment']['cpu']}; load average before: {load}. "
              f"Inputs: {', '.join(f'{m} {s}' for m, s in meta['input_shapes'].items())}. "
              "Max relative error = max |slim − zeroed| / max |zeroed| over probe batches."
              + (" Align columns: speed-up over dense (zero channels kept for alignment; for auto, the candidate its "
                 "whole-model choice took: off, N=8, N=16 or per-group, timed at batch 1 before this run)."
                 if "auto" in aligns else "")
              + (" With auto, the ORT columns time the candidate `compile --target onnx` chooses (whole models "
                 "timed in ORT at batch 1), the TVM columns the one `compile --target cpu` chooses (timed as TVM "
                 + ("builds at the column's batch, `--align-batch B`); " if meta.get("align_batch", "first") == "each"
                    else "builds at batch 1); ")
                 + "each speed-up ÷ MAC reduction uses its own model's MACs."
                 if choices else "")
              + (" In parentheses after a median: the same speed-ups ÷ the pruning's own MAC reduction (the slim "
                 "model with no channel kept), which keeping channels for alignment cannot raise."
                 if any("macs_pruned" in r for r in rows) else "")]
    return "\n".join(lines) + "\n"


def _choice(c: dict[str, Any]) -> str:
    return f"{c['whole_model']['chosen']} ({c['kept_for_alignment']})" if c.get("whole_model") else "-"


def _tvm_choices(row: dict[str, Any]) -> str:
    """TVM's auto choice: one, or each batch's where they were timed per batch (b1 off (0), b8 ...)."""
    by_batch = row.get("tvm_auto_by_batch", {})
    if len(by_batch) > 1:
        return ", ".join(f"b{b} {_choice(c)}" for b, c in by_batch.items())
    return _choice(row.get("tvm_auto", {}))


def _turns(turn: int) -> str:
    if turn == 1:
        return "dense and slim calls alternating (each call starts with the caches the others left)"
    return (f"dense and slim alternating in turns of 1 untimed + {turn} timed calls "
            "(each model's steady state, as when it runs alone)")


def _ratio(row: dict[str, Any], batch: int, runtime: str | None,
           key: str = "speedup_per_mac_reduction") -> float | None:
    lat = row.get("latency", {}).get(str(batch))
    if not lat:
        return None
    return (lat if runtime is None else lat.get(runtime, {})).get(key)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--rates", default="0.3,0.5,0.7")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=30, help="timed runs of each model at least")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--min-time", dest="min_time", type=float, default=2.0,
                   help="seconds of alternating timed runs at least, per batch size")
    p.add_argument("--turn", type=int, default=1,
                   help="timed calls of one model in a row (after an untimed one) before the next model's turn: "
                        "1 = single calls alternating, each starting with the caches the other models left; "
                        "k > 1 = each model's steady state, as when it runs alone")
    p.add_argument("--no-measure", action="store_true")
    p.add_argument("--align", default="off",
                   help="comma list of compile --align values (off, N, auto); the first gives the main row, "
                        "the others are extra slim variants timed in the same interleaved run")
    p.add_argument("--align-batch", dest="align_batch", choices=("each", "first"), default="each",
                   help="with --tvm and auto: time TVM's auto candidates at each batch size, the model each "
                        "column times (compile --align-batch B), or at batch 1 for every column (runs before "
                        "this option)")
    p.add_argument("--tvm", action="store_true",
                   help="also build dense and slim with rwdeploy's cpu TVM build and time them in the same rounds")
    p.add_argument("--name", default="structured", help="stem of the result files (NAME.json, NAME.md)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batch.split(",")]
    args.aligns = [a.strip() for a in args.align.split(",") if a.strip()] or ["off"]
    try:
        import torch_pruning  # noqa: F401
        args.torch_pruning = True
    except ImportError:
        args.torch_pruning = False
        print("torch-pruning not installed (pip install '.[bench]'): its columns stay empty", file=sys.stderr)
    torch.set_num_threads(args.threads)

    meta: dict[str, Any] = {
        "benchmark": "structured", "batches": args.batches, "threads": args.threads, "runs": args.runs,
        "min_time_s": args.min_time, "loadavg_before": list(os.getloadavg()), "environment": environment(),
        "torch_pruning": _torch_pruning_version(), "input_shapes": {}, "aligns": args.aligns, "tvm": args.tvm,
        "turn": args.turn, "align_batch": args.align_batch,
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            meta["input_shapes"][name] = "×".join(map(str, REDUCED_INPUT.get(name, models.input_shape(name))[1:]))
            for rate in (float(r) for r in args.rates.split(",")):
                t0 = time.perf_counter()
                row = run_case(name, rate, args, Path(tmp))
                rows.append(row)
                print(f"{name} {rate:.0%}: MACs {row['macs_dense']:,} -> {row['macs_slim']:,}, ours err "
                      f"{row['ours_max_rel']:.1e}, tp err {row.get('tp_max_rel', float('nan')):.1e} "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    meta["loadavg_after"] = list(os.getloadavg())
    table = markdown(rows, meta)
    write_results(args.out, args.name, {**meta, "rows": rows}, table)
    print(table)
    return 0


def write_results(out: Path, name: str, document: dict[str, Any], table: str) -> None:
    """`out`/NAME.json (the document) and NAME.md (the table), each written whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(document, indent=2) + "\n")
    with atomic_file(out / f"{name}.md") as tmp:
        tmp.write_text(table)


def require_scheduled(artifact: Any, what: str) -> None:
    """Refuse a TVM build with a conv / dense kernel the CPU schedule left as plain loops (it
    records why in `kernels["notes"]`): timing it would compare a schedule failure, not a rule."""
    unscheduled = [n for n in artifact.kernels.get("notes", []) if "could not be scheduled" in n]
    if unscheduled:
        raise RuntimeError(f"{what}: {unscheduled[0]}")


def zoo_models(parser: argparse.ArgumentParser, value: str) -> list[str]:
    """The comma-separated zoo model names of a `--models` option; an unknown one is a usage error."""
    names = [m for m in value.split(",") if m]
    unknown = [m for m in names if m not in models.list_models()]
    if unknown:
        parser.error(f"--models: {', '.join(unknown)} not in the zoo; choose from {', '.join(models.list_models())}")
    return names


def run_in_tempdir(meta: dict[str, Any], produce: Callable[[Path], list[dict[str, Any]]],
                   markdown: Callable[[list[dict[str, Any]], dict[str, Any]], str], out: Path, name: str) -> int:
    """Record the load average around `produce(workdir)` (its results, made in a temporary
    directory), write them with `meta` as NAME.json / NAME.md and print the table."""
    meta["loadavg_before"] = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        results = produce(Path(tmp))
    meta["loadavg_after"] = list(os.getloadavg())
    table = markdown(results, meta)
    write_results(out, name, {**meta, "results": results}, table)
    print(table)
    return 0


def _torch_pruning_version() -> str | None:
    try:
        return metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
