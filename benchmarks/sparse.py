"""Unstructured sparsity end to end: rwdeploy's packed TVM builds against the best dense runtime.

Sections (`--sections`, default all but arm):
  e2e     VGG-16-BN (CIFAR), ResNet-18 and MobileNetV2 (ImageNet layouts) with 90 / 95 %
          irregular sparsity in every conv and Linear (magnitude, per layer), batch 1:
          ONNX Runtime dense, torch dense (BN folded), rwdeploy's dense TVM build, and the
          packed TVM build (`pack_sparse --sparse auto`, formats measured on this host), both
          built by the product's `tvm_build.build`. Plus, for the packed build, the thread CPU
          time of every call of one inference by category (sparse conv kernels with their fused
          epilogues, conv input layout transforms, dense layers left, layout conversions,
          pooling, other ops, VM) and per layer.
  layers  single layers (Linear 4096->1024, conv 3x3 256@14x14, conv 1x1 512@7x7) at several
          sparsities: ORT / torch / TVM dense, torch CSR, rwdeploy CSR and BSR kernels, and
          the format pack_sparse chooses from those measurements.
  int8    sparse and int8 together: the pruned model with 8-bit fixed-point weights (per
          output channel), as ONNX Runtime QDQ (int8 dense), TVM's build of that QDQ file
          (int8 dense), the packed TVM build with float values and with int8 values.
  onnx    the 4096->1024 Linear in ONNX Runtime: compact CSR file vs dense file.
  arm     (no timing; instruction counts) ResNet-18 and MobileNetV2 at 90 % built for
          `--target arm`: aarch64 instructions per inference on the emulated device, dense
          TVM vs packed TVM with every layer's format chosen by instruction counts on that
          device (`runtime.arm_layer_timer`). Written to `<name>_arm.{json,md}`.

Timing: all alternatives of a row in one process, interleaved (R rounds, each timing every
alternative once in a short burst); median and min over rounds, of wall time and of the
calling thread's CPU time (robust to other processes; every runtime here runs on the calling
thread at 1 thread). The load average is recorded per row. Timed sections hold
/tmp/rwdeploy-timing.lock while they time (one model / case at a time), so that no two timing
runs on this machine overlap.

  python benchmarks/sparse.py                          # e2e, layers, int8, onnx (~40 min)
  python benchmarks/sparse.py --sections arm           # aarch64 instruction counts (~30 min)
  python benchmarks/sparse.py --sections e2e --models resnet18 --sparsities 0.95 --rounds 11
  python benchmarks/sparse.py --sections e2e --models timm:mobilenetv3_large_100,timm:efficientnet_b0 \
      --sparsities 0.9 --name sparse_timm                 # published architectures (bench extra)
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LOCK = "/tmp/rwdeploy-timing.lock"
MODELS = ("vgg16_bn", "resnet18", "mobilenet_v2")
CASES = {
    "linear": {"kind": "linear", "in": 4096, "out": 1024},
    "conv3x3": {"kind": "conv", "in": 256, "out": 256, "k": 3, "hw": 14, "pad": 1},
    "conv1x1": {"kind": "conv", "in": 512, "out": 512, "k": 1, "hw": 7, "pad": 0},
}
LAYER_SPARSITIES = (0.5, 0.9, 0.95, 0.99)
BLOCK_PATTERNS = {"linear": [(1, 4), (4, 1)], "conv3x3": [(4, 1)], "conv1x1": [(4, 1)]}


# ----------------------------------------------------------------------------- shared helpers

@contextlib.contextmanager
def timing_lock():
    """Hold the machine-wide timing lock (flock) while timing."""
    with open(LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _prune(w, sparsity: float, block=(1, 1), seed: int = 0):
    """Zero the smallest-magnitude blocks of w viewed as a matrix (rows = dim 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    w2 = w.reshape(w.shape[0], -1)
    br, bc = block
    score = w2.abs().reshape(w2.shape[0] // br, br, w2.shape[1] // bc, bc).sum((1, 3))
    score = score + 1e-6 * torch.rand(score.shape, generator=g)       # break ties
    k = int(round(sparsity * score.numel()))
    keep = torch.ones(score.numel(), dtype=torch.bool)
    keep[score.flatten().argsort()[:k]] = False
    mask = keep.reshape(score.shape).repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return (w2 * mask).reshape(w.shape)


def sparsified_model(name: str, sparsity: float, *, int8: bool = False):
    """A zoo model in eval mode with `sparsity` irregular zeros in every conv and Linear (BN kept);
    `int8`: then weights on the 8-bit per-output-channel power-of-two grid (as `prune --quantize 8`)."""
    import torch

    from rwdeploy.quant.fixed_point import fake_quantize

    torch.manual_seed(0)
    model = _create(name)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(_prune(m.weight, sparsity))
                if int8:
                    m.weight.copy_(fake_quantize(m.weight, 8, axis=0))
    _recalibrate_batch_norms(model, input_shape(name))
    return model


def _create(name: str):
    """A zoo model, or "timm:<name>": a timm architecture (random weights; the bench extra)."""
    from rwdeploy import models

    if not name.startswith("timm:"):
        return models.create(name).eval()
    shim = str(Path(__file__).resolve().parent.parent / "tests" / "conformance")
    if shim not in sys.path:
        sys.path.insert(0, shim)
    from torchvision_shim import import_timm   # timm imports torchvision, which needs two op schemas

    return import_timm().create_model(name[5:], pretrained=False).eval()


def input_shape(name: str) -> tuple[int, ...]:
    from rwdeploy import models

    return (1, 3, 224, 224) if name.startswith("timm:") else models.input_shape(name)


def _recalibrate_batch_norms(model, shape: tuple[int, ...], batches: int = 4) -> None:
    """Set every BatchNorm's statistics to those of the pruned model on random inputs.

    Zeroing 90 % of a randomly initialised network's weights shrinks its activations about
    threefold a layer; with the initial statistics (mean 0, variance 1) MobileNetV2's output
    was its classifier's bias alone (activations ~1e-13 by the last conv), so comparing a
    build's output with torch's checked nothing. Recalibrated, every layer's output keeps
    unit scale. Timing is unaffected (no kernel depends on the values)."""
    import torch

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None            # cumulative average over the calibration batches
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn((4, *shape[1:]), generator=g))
    model.eval()
    for bn in norms:
        bn.momentum = 0.1


def _interleaved(fns: dict, rounds: int, target_s: float = 0.005) -> dict:
    """Median/min ms per call of each callable (wall and thread CPU time), timed round-robin
    in short bursts so that load changes hit every alternative alike."""
    calls = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(target_s / max(time.perf_counter() - t0, 1e-7)))
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = calls[name]
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(n):
                fn()
            cpu[name].append((time.thread_time() - c0) / n)
            wall[name].append((time.perf_counter() - t0) / n)
    return {name: {"median_ms": statistics.median(wall[name]) * 1e3, "min_ms": min(wall[name]) * 1e3,
                   "cpu_median_ms": statistics.median(cpu[name]) * 1e3, "cpu_min_ms": min(cpu[name]) * 1e3,
                   "n": rounds, "calls_per_sample": calls[name]} for name in fns}


def _ort_session(module, x, threads: int, tmp: Path):
    from rwdeploy.runtime.onnx_export import export_onnx
    from rwdeploy.runtime.ort_runner import OrtRunner

    path = tmp / f"m{time.monotonic_ns()}.onnx"
    export_onnx(module, x, path)
    return OrtRunner(path, threads=threads).bind(x.numpy())


def _vm(executable):
    import tvm

    return tvm.relax.VirtualMachine(executable, tvm.cpu())


def _rel_err(y, ref) -> float:
    import numpy as np

    return float(np.abs(y - ref).max() / max(float(np.abs(ref).max()), 1e-30))


def _speedups(t: dict, fast: str, dense: tuple[str, ...]) -> dict:
    """Speed-up of `fast` over the best of `dense` for each statistic (best chosen per statistic)."""
    out = {}
    for stat in ("median_ms", "min_ms", "cpu_median_ms", "cpu_min_ms"):
        best = min(dense, key=lambda k: t[k][stat])
        out[stat] = {"best_dense": best, "speedup": t[best][stat] / t[fast][stat]}
    return out


# ----------------------------------------------------------------------------- e2e

def _layer_descriptions(module, x) -> dict[str, str]:
    """kernel symbol -> what it computes, from the Relax import of `module`."""
    from rwdeploy.runtime.tvm_build import import_relax

    mod = import_relax(module, x)
    return {gv.name_hint: str(f.attrs["rwdeploy.layer"]) for gv, f in mod.functions.items()
            if f.attrs is not None and "rwdeploy.layer" in f.attrs}


def run_e2e(args, threads: int, tmp: Path) -> list[dict]:
    import torch
    import tvm
    from torch.fx.experimental.optimization import fuse

    from rwdeploy.passes.pack_sparse import pack_sparse
    from rwdeploy.runtime.tvm_build import build
    from rwdeploy.runtime.tvm_profile import by_category, profile_calls
    from rwdeploy.sparse.timing import HostLayerTimer

    rows = []
    for name in args.models:
        for sparsity in args.sparsities:
            with timing_lock():
                load0 = os.getloadavg()
                model = sparsified_model(name, sparsity)
                traced = torch.fx.symbolic_trace(model)
                x = torch.randn(input_shape(name), generator=torch.Generator().manual_seed(2))
                with torch.no_grad():
                    ref = model(x).numpy()
                t0 = time.perf_counter()
                res = pack_sparse(traced, x, timer=HostLayerTimer())   # --sparse auto, measured on this host
                pack_s = time.perf_counter() - t0
                packed = res.gm
                art_packed = build(packed, x, "cpu", threads=threads)
                art_dense = build(traced, x, "cpu", threads=threads)
                vm_packed, vm_dense = _vm(art_packed.executable), _vm(art_dense.executable)
                xt = tvm.runtime.tensor(x.numpy())
                errs = {"tvm:packed": _rel_err(vm_packed["main"](xt).numpy(), ref),
                        "tvm:dense": _rel_err(vm_dense["main"](xt).numpy(), ref)}
                folded = fuse(traced)                        # torch's best: BN folded into the convs
                fns = {"ort:dense": _ort_session(traced, x, threads, tmp),
                       "torch:dense": lambda: folded(x),
                       "tvm:dense": lambda f=vm_dense["main"]: f(xt),
                       "tvm:packed": lambda f=vm_packed["main"]: f(xt)}
                with torch.no_grad():
                    t = _interleaved(fns, args.rounds, target_s=0.02)
                # the profile needs the VM's interpreter: a bytecode build of the same packed model
                profiled = build(packed, x, "cpu", threads=threads, exec_mode="bytecode")
                calls = profile_calls(_vm(profiled.executable), "main", xt, runs=5)
                load1 = os.getloadavg()
            desc = _layer_descriptions(packed, x)
            rec = res.record
            row = {"model": name, "batch": 1, "threads": threads, "sparsity": sparsity, "times": t,
                   "speedup": _speedups(t, "tvm:packed", ("ort:dense", "torch:dense", "tvm:dense")),
                   "max_rel_err": errs, "formats": {l.name: l.chosen for l in rec.layers},
                   "format_counts": {f: sum(1 for l in rec.layers if l.chosen == f)
                                     for f in sorted({l.chosen for l in rec.layers})},
                   "packed_layers": len(rec.packed), "layers": len(rec.layers),
                   "bytes_saved": rec.bytes_saved(), "pack_pass_s": pack_s,
                   "build_s": {"packed": art_packed.build_s, "dense": art_dense.build_s},
                   "breakdown_ms": by_category(calls),
                   "calls": [{"symbol": c.symbol, "category": c.category, "ms": c.ms,
                              "layer": desc.get(c.symbol, "")} for c in calls],
                   "loadavg_start": load0, "loadavg_end": load1}
            rows.append(row)
            s = row["speedup"]
            print(f"e2e {name} {sparsity:.2f} t{threads}: packed {t['tvm:packed']['median_ms']:.3f} ms | best dense "
                  f"{s['median_ms']['best_dense']} {t[s['median_ms']['best_dense']]['median_ms']:.3f} ms | "
                  f"{s['median_ms']['speedup']:.2f}x (cpu-time min {s['cpu_min_ms']['speedup']:.2f}x) | "
                  f"{row['packed_layers']}/{row['layers']} packed | err {errs['tvm:packed']:.1e} | "
                  f"load {load0[0]:.1f}", flush=True)
    return rows


# ----------------------------------------------------------------------------- layers

def _layer(case: dict, sparsity: float, block=(1, 1)):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if case["kind"] == "linear":
        layer = nn.Linear(case["in"], case["out"])
    else:
        layer = nn.Conv2d(case["in"], case["out"], case["k"], padding=case["pad"])
    with torch.no_grad():
        layer.weight.copy_(_prune(layer.weight, sparsity, block))
    return layer.eval()


def _input(case: dict, batch: int):
    import torch

    shape = (batch, case["in"]) if case["kind"] == "linear" else (batch, case["in"], case["hw"], case["hw"])
    return torch.randn(shape, generator=torch.Generator().manual_seed(1))


def _torch_csr(layer, x):
    import torch
    import torch.nn.functional as F

    w = layer.weight.detach()
    ws = w.reshape(w.shape[0], -1).to_sparse_csr()
    if isinstance(layer, torch.nn.Linear):
        xt = x.t().contiguous()
        return lambda: torch.sparse.mm(ws, xt)
    k, pad = layer.kernel_size, layer.padding

    def run():
        cols = F.unfold(x, k, padding=pad)                 # (B, C*k*k, L)
        return torch.stack([torch.sparse.mm(ws, c) for c in cols])
    return run


def _chosen(layer, x, timings: dict) -> str:
    """The format pack_sparse picks for this layer, fed this row's measurements."""
    import torch

    from rwdeploy.passes.pack_sparse import pack_sparse

    gm = torch.fx.symbolic_trace(torch.nn.Sequential(layer))
    res = pack_sparse(gm, x, timer=lambda layers: {name: dict(timings) for name, *_ in layers})
    return res.record.layers[0].chosen


def run_layers(args, threads: int, tmp: Path) -> list[dict]:
    import numpy as np
    import torch
    import tvm

    from rwdeploy.passes.ops import module_layer_view
    from rwdeploy.passes.pack_sparse import _candidates
    from rwdeploy.runtime import tvm_sparse
    from rwdeploy.runtime.layer_formats import Candidate, build_candidates

    rows = []
    for cname in args.cases:
        case = CASES[cname]
        for batch in args.batches:
            x = _input(case, batch)
            patterns = [(s, (1, 1)) for s in args.layer_sparsities] + [(0.95, b) for b in BLOCK_PATTERNS[cname]]
            for sparsity, block in patterns:
                with timing_lock():
                    load0 = os.getloadavg()
                    layer = _layer(case, sparsity, block)
                    with torch.no_grad():
                        ref = layer(x).numpy()
                    formats = _candidates(module_layer_view(layer, "", layer))
                    cands = [Candidate("dense", layer, tuple(x.shape))]
                    cands += [Candidate(f, layer, tuple(x.shape), m, i + 1) for i, (f, m) in enumerate(formats.items())]
                    vm = _vm(build_candidates(cands, tvm_sparse.host_target()))
                    xs = {c.key: tvm.runtime.tensor(
                        np.ascontiguousarray(x.numpy().transpose(0, 2, 3, 1) if c.input_shape() != tuple(x.shape)
                                             else x.numpy())) for c in cands}
                    err = {}
                    for c in cands:
                        y = vm[c.function](xs[c.key]).numpy()
                        y = y.transpose(0, 3, 1, 2) if y.shape != ref.shape else y
                        err[c.key] = _rel_err(y, ref)
                    # each function handle fetched once, as a caller holds it (a lookup per
                    # call, vm[name], costs ~2 us: a twentieth of a packed Linear)
                    fns = {("tvm:dense" if c.key == "dense" else f"rw:{c.key}"):
                           (lambda f=vm[c.function], v=xs[c.key]: f(v)) for c in cands}
                    fns["ort:dense"] = _ort_session(layer, x, threads, tmp)
                    with torch.no_grad():
                        fns["torch:dense"] = (lambda: layer(x))
                        fns["torch:csr"] = _torch_csr(layer, x)
                        t = _interleaved(fns, args.rounds)
                    load1 = os.getloadavg()
                rw = {("dense" if k == "tvm:dense" else k[3:]): v for k, v in t.items() if k.startswith(("rw:", "tvm:"))}
                chosen = _chosen(layer, x, rw)
                key = "tvm:dense" if chosen == "dense" else f"rw:{chosen}"
                row = {"case": cname, "batch": batch, "threads": threads,
                       "pattern": "irregular" if block == (1, 1) else f"block{block[0]}x{block[1]}",
                       "sparsity": sparsity, "nnz": int((layer.weight != 0).sum()), "times": t, "chosen": chosen,
                       "speedup": _speedups(t, key, ("ort:dense", "torch:dense", "tvm:dense")),
                       "speedup_vs_torch_csr": t["torch:csr"]["median_ms"] / t[key]["median_ms"],
                       "max_rel_err": err, "loadavg_start": load0, "loadavg_end": load1}
                rows.append(row)
                s = row["speedup"]["median_ms"]
                print(f"{cname:8s} b{batch} {row['pattern']:9s} {sparsity:.2f}: chosen {chosen} "
                      f"{t[key]['median_ms']:.3f} ms | best dense {s['best_dense']} "
                      f"{t[s['best_dense']]['median_ms']:.3f} ms | {s['speedup']:.2f}x | load {load0[0]:.1f}",
                      flush=True)
    return rows


# ----------------------------------------------------------------------------- int8

def run_int8(args, threads: int, tmp: Path) -> list[dict]:
    import onnx
    import torch
    import tvm

    from rwdeploy.passes.pack_sparse import pack_sparse
    from rwdeploy.quant.export import export_float_onnx, write_qdq_onnx
    from rwdeploy.quant.tvm_qdq import build_onnx
    from rwdeploy.runtime.ort_runner import OrtRunner
    from rwdeploy.runtime.tvm_build import build
    from rwdeploy.sparse.quantize import quantize_packed
    from rwdeploy.sparse.timing import HostLayerTimer

    rows = []
    for name in args.int8_models:
        sparsity = args.int8_sparsity
        with timing_lock():
            load0 = os.getloadavg()
            model = sparsified_model(name, sparsity, int8=True)
            traced = torch.fx.symbolic_trace(model)
            x = torch.randn(input_shape(name), generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                ref = model(x).numpy()
            packed = pack_sparse(traced, x, timer=HostLayerTimer()).gm
            packed8, qrec = quantize_packed(packed, per_row=True)
            vm_f = _vm(build(packed, x, "cpu", threads=threads).executable)
            vm_q = _vm(build(packed8, x, "cpu", threads=threads).executable)
            qdq = tmp / f"{name}.qdq.onnx"
            write_qdq_onnx(export_float_onnx(model, x), qdq, bits=8, per_channel=True)
            ort_q = OrtRunner(qdq, threads=threads)
            _, run_tvm_qdq = build_onnx(onnx.load(str(qdq)))
            xt, xn = tvm.runtime.tensor(x.numpy()), x.numpy()
            errs = {"tvm:packed_float": _rel_err(vm_f["main"](xt).numpy(), ref),
                    "tvm:packed_int8": _rel_err(vm_q["main"](xt).numpy(), ref),
                    "ort:int8_dense_qdq": _rel_err(ort_q.run(xn), ref),
                    "tvm:int8_dense_qdq": _rel_err(run_tvm_qdq(xn), ref)}
            fns = {"ort:dense": _ort_session(traced, x, threads, tmp), "ort:int8_dense_qdq": ort_q.bind(xn),
                   "tvm:int8_dense_qdq": lambda: run_tvm_qdq(xn),
                   "tvm:packed_float": lambda: vm_f["main"](xt), "tvm:packed_int8": lambda: vm_q["main"](xt)}
            t = _interleaved(fns, args.rounds, target_s=0.02)
            load1 = os.getloadavg()
        bytes_f = sum(l.bytes_before for l in qrec.layers)
        bytes_q = sum(l.bytes_after for l in qrec.layers)
        row = {"model": name, "sparsity": sparsity, "threads": threads, "times": t, "max_rel_err": errs,
               "packed_bytes_float": bytes_f, "packed_bytes_int8": bytes_q,
               "max_abs_value_change": max((l.max_abs_change for l in qrec.layers), default=0.0),
               "loadavg_start": load0, "loadavg_end": load1}
        rows.append(row)
        m = {k: v["median_ms"] for k, v in t.items()}
        print(f"int8 {name} {sparsity:.2f}: packed int8 {m['tvm:packed_int8']:.3f} | packed float "
              f"{m['tvm:packed_float']:.3f} | int8 dense ORT {m['ort:int8_dense_qdq']:.3f} TVM "
              f"{m['tvm:int8_dense_qdq']:.3f} ms | load {load0[0]:.1f}", flush=True)
    return rows


# ----------------------------------------------------------------------------- onnx

def run_onnx(args, threads: int, tmp: Path) -> list[dict]:
    """The 4096->1024 Linear in ONNX Runtime: dense file vs compact file (CSR folded at load)."""
    import torch

    from rwdeploy.runtime.onnx_export import export_onnx
    from rwdeploy.runtime.ort_runner import OrtRunner
    from rwdeploy.sparse import CsrLinear

    case, rows = CASES["linear"], []
    x = _input(case, 1)
    for sparsity in (0.9, 0.95, 0.99):
        layer = _layer(case, sparsity)
        dense_path, compact_path = tmp / "dense.onnx", tmp / "compact.onnx"
        export_onnx(layer, x, dense_path)
        export_onnx(torch.nn.Sequential(CsrLinear.from_dense(layer)), x, compact_path)
        fns = {"ort:dense": OrtRunner(dense_path, threads=threads).bind(x.numpy()),
               "ort:compact": OrtRunner(compact_path, threads=threads).bind(x.numpy())}
        with timing_lock():
            load0 = os.getloadavg()
            t = _interleaved(fns, args.rounds)
        rows.append({"sparsity": sparsity, "threads": threads, "times": t,
                     "dense_bytes": dense_path.stat().st_size, "compact_bytes": compact_path.stat().st_size,
                     "size_ratio": compact_path.stat().st_size / dense_path.stat().st_size, "loadavg": load0})
    return rows


# ----------------------------------------------------------------------------- arm

def run_arm(args, threads: int, tmp: Path) -> list[dict]:
    """aarch64 instructions per inference, dense vs packed (formats chosen on the arm device)."""
    import numpy as np
    import torch

    from rwdeploy.passes.pack_sparse import pack_sparse
    from rwdeploy.runtime import arm_emulator
    from rwdeploy.runtime.arm_layer_timer import arm_layer_timer
    from rwdeploy.runtime.tvm_build import build

    arm_emulator.provision()
    rows = []
    for name in args.arm_models:
        sparsity = args.arm_sparsity
        model = sparsified_model(name, sparsity)
        traced = torch.fx.symbolic_trace(model)
        x = torch.randn(input_shape(name), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            ref = model(x).numpy()
        timer = arm_layer_timer("arm")
        t0 = time.perf_counter()
        res = pack_sparse(traced, x, target="arm", timer=timer)
        choose_s = time.perf_counter() - t0
        row = {"model": name, "sparsity": sparsity, "measured_on": res.record.measured_on,
               "formats": {l.name: l.chosen for l in res.record.layers},
               "layer_costs": {l.name: l.measured_cost for l in res.record.layers},
               "cost_unit": res.record.layers[0].cost_unit if res.record.layers else "",
               "format_counts": {f: sum(1 for l in res.record.layers if l.chosen == f)
                                 for f in sorted({l.chosen for l in res.record.layers})},
               "choose_s": choose_s, "variants": {}}
        for variant, module in (("dense", traced), ("packed", res.gm)):
            art = build(module, x, "arm", out_dir=tmp / f"{name}-{variant}")
            c = arm_emulator.count_instructions(art.path, x.numpy(), iterations=(0, 1), repeats=2)
            row["variants"][variant] = {
                "insns_per_inference": c.per_inference, "samples": list(c.samples),
                "emulated_ms_per_inference": c.emulated_ms_per_inference, "library_bytes": art.size_bytes,
                "max_rel_err": _rel_err(np.asarray(c.output).reshape(ref.shape), ref)}
        row["insns_ratio_dense_over_packed"] = (row["variants"]["dense"]["insns_per_inference"]
                                                / row["variants"]["packed"]["insns_per_inference"])
        rows.append(row)
        v = row["variants"]
        print(f"arm {name} {sparsity:.2f}: dense {v['dense']['insns_per_inference'] / 1e6:.1f} M insns, packed "
              f"{v['packed']['insns_per_inference'] / 1e6:.1f} M ({row['insns_ratio_dense_over_packed']:.2f}x fewer); "
              f"formats {row['format_counts']} chosen in {choose_s:.0f} s", flush=True)
    return rows


RUNNERS = {"e2e": run_e2e, "layers": run_layers, "int8": run_int8, "onnx": run_onnx, "arm": run_arm}


def worker(args) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    threads = int(os.environ["TVM_NUM_THREADS"])
    torch.set_num_threads(threads)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for section in args.sections:
            out[section] = RUNNERS[section](args, threads, Path(tmp))
    Path(args.worker_out).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- report

def _ms(t: dict, key: str) -> str:
    return f"{t[key]['median_ms']:.3f} ({t[key]['min_ms']:.3f})"


def _x(s: dict) -> str:
    return (f"{s['median_ms']['speedup']:.2f}x ({s['min_ms']['speedup']:.2f}x) | "
            f"{s['cpu_median_ms']['speedup']:.2f}x ({s['cpu_min_ms']['speedup']:.2f}x)")


def markdown(result: dict) -> str:
    env = result["environment"]
    lines = ["# Unstructured sparsity: rwdeploy's packed TVM builds vs the best dense runtime", "",
             f"Machine: {env.get('cpu')} ({env.get('logical_cores')} logical cores, shared; load average per row). "
             f"Command: `{result['command']}`. Times in ms per inference: median (min) of {result['rounds']} "
             "interleaved rounds. Speed-ups over the best dense runtime of each row (ONNX Runtime, torch, "
             "rwdeploy's dense TVM build; the best is taken per statistic): wall median (wall min) | "
             "thread-CPU-time median (thread-CPU-time min).", ""]
    if result.get("e2e"):
        lines += ["## End to end (irregular sparsity in every conv and Linear, batch 1)", "",
                  "| model | sparsity | threads | ORT dense | torch dense | TVM dense | TVM packed | packed vs best dense "
                  "(wall med (min) \\| cpu med (min)) | formats | err | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["e2e"]:
            t = r["times"]
            fmts = ", ".join(f"{k} {v}" for k, v in r["format_counts"].items())
            lines.append(f"| {r['model']} | {r['sparsity']:.2f} | {r['threads']} | {_ms(t, 'ort:dense')} | "
                         f"{_ms(t, 'torch:dense')} | {_ms(t, 'tvm:dense')} | {_ms(t, 'tvm:packed')} | "
                         f"{_x(r['speedup'])} | {fmts} | {r['max_rel_err']['tvm:packed']:.0e} | "
                         f"{r['loadavg_start'][0]:.1f} |")
        lines += ["", "### Where the packed build's time goes (thread CPU ms per inference, instrumented)", "",
                  "| model | sparsity | " + " | ".join(r_ for r_ in result["e2e"][0]["breakdown_ms"]) + " | sum |",
                  "|---|---|" + "---|" * (len(result["e2e"][0]["breakdown_ms"]) + 1)]
        for r in result["e2e"]:
            b = r["breakdown_ms"]
            lines.append(f"| {r['model']} | {r['sparsity']:.2f} | " + " | ".join(f"{v:.3f}" for v in b.values())
                         + f" | {sum(b.values()):.3f} |")
        for r in result["e2e"]:
            lines += ["", f"<details><summary>{r['model']} at {r['sparsity']:.2f}: every call</summary>", "",
                      "| # | kernel | category | ms | layer |", "|---|---|---|---|---|"]
            lines += [f"| {i} | {c['symbol']} | {c['category']} | {c['ms']:.4f} | {c['layer']} |"
                      for i, c in enumerate(r["calls"]) if c["category"] != "vm"]
            lines += ["", "</details>"]
    if result.get("layers"):
        lines += ["", "## Single layers", "",
                  "| case | batch | pattern | sparsity | ORT dense | torch dense | TVM dense | torch CSR | rw CSR | "
                  "rw BSR (best) | chosen | vs best dense | vs torch CSR | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["layers"]:
            t = r["times"]
            bsr = {k: v for k, v in t.items() if k.startswith("rw:bsr")}
            best_bsr = min(bsr, key=lambda k: bsr[k]["median_ms"]) if bsr else None
            key = "tvm:dense" if r["chosen"] == "dense" else f"rw:{r['chosen']}"
            lines.append(
                f"| {r['case']} | {r['batch']} | {r['pattern']} | {r['sparsity']:.2f} | {_ms(t, 'ort:dense')} | "
                f"{_ms(t, 'torch:dense')} | {_ms(t, 'tvm:dense')} | {_ms(t, 'torch:csr')} | {_ms(t, 'rw:csr')} | "
                + (f"{_ms(t, best_bsr)} {best_bsr[3:]}" if best_bsr else "-")
                + f" | {r['chosen']} {t[key]['median_ms']:.3f} | {_x(r['speedup'])} | "
                f"{r['speedup_vs_torch_csr']:.2f}x | {r['loadavg_start'][0]:.1f} |")
    if result.get("int8"):
        lines += ["", "## Sparse and int8 together (8-bit per-channel weights, same pruned model)", "",
                  "| model | sparsity | ORT float dense | ORT int8 dense (QDQ) | TVM int8 dense (QDQ) | TVM packed float | "
                  "TVM packed int8 | packed bytes float -> int8 | err int8 packed | load |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["int8"]:
            t = r["times"]
            lines.append(f"| {r['model']} | {r['sparsity']:.2f} | {_ms(t, 'ort:dense')} | {_ms(t, 'ort:int8_dense_qdq')} | "
                         f"{_ms(t, 'tvm:int8_dense_qdq')} | {_ms(t, 'tvm:packed_float')} | {_ms(t, 'tvm:packed_int8')} | "
                         f"{r['packed_bytes_float'] / 1e6:.2f} -> {r['packed_bytes_int8'] / 1e6:.2f} MB | "
                         f"{r['max_rel_err']['tvm:packed_int8']:.0e} | {r['loadavg_start'][0]:.1f} |")
    if result.get("onnx"):
        lines += ["", "## ONNX Runtime: 4096->1024 Linear, compact CSR file (folded at load) vs dense file", "",
                  "| sparsity | compact / dense file | ORT dense | ORT compact | load |", "|---|---|---|---|---|"]
        for r in result["onnx"]:
            t = r["times"]
            lines.append(f"| {r['sparsity']:.2f} | {r['size_ratio']:.3f} | {_ms(t, 'ort:dense')} | "
                         f"{_ms(t, 'ort:compact')} | {r['loadavg'][0]:.1f} |")
    if result.get("arm"):
        lines += ["", "## arm: aarch64 instructions per inference (emulated device, deterministic)", "",
                  "| model | sparsity | dense TVM | packed TVM | fewer | formats (chosen on the device) | err |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["arm"]:
            v = r["variants"]
            fmts = ", ".join(f"{k} {n}" for k, n in r["format_counts"].items())
            lines.append(f"| {r['model']} | {r['sparsity']:.2f} | {v['dense']['insns_per_inference'] / 1e6:.1f} M | "
                         f"{v['packed']['insns_per_inference'] / 1e6:.1f} M | {r['insns_ratio_dense_over_packed']:.2f}x | "
                         f"{fmts} | {v['packed']['max_rel_err']:.0e} |")
        lines += ["", "Formats measured on: " + "; ".join(sorted({r["measured_on"] for r in result["arm"]}))]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="e2e,layers,int8,onnx", help="comma list of e2e,layers,int8,onnx,arm")
    ap.add_argument("--threads", default="1", help="comma list; 'all' = every logical core")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--sparsities", default="0.9,0.95", help="e2e sparsities")
    ap.add_argument("--cases", default=",".join(CASES), help="single-layer cases")
    ap.add_argument("--batches", default="1", help="single-layer batch sizes")
    ap.add_argument("--layer-sparsities", default=",".join(map(str, LAYER_SPARSITIES)))
    ap.add_argument("--int8-models", default="resnet18,mobilenet_v2")
    ap.add_argument("--int8-sparsity", type=float, default=0.95)
    ap.add_argument("--arm-models", default="resnet18,mobilenet_v2")
    ap.add_argument("--arm-sparsity", type=float, default=0.9)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--name", default="sparse", help="results file stem (arm: <name>_arm)")
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.sections = [s for s in args.sections.split(",") if s]
    args.models = [m for m in args.models.split(",") if m]
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s]
    args.cases = [c for c in args.cases.split(",") if c]
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.layer_sparsities = [float(s) for s in args.layer_sparsities.split(",") if s]
    args.int8_models = [m for m in args.int8_models.split(",") if m]
    args.arm_models = [m for m in args.arm_models.split(",") if m]
    if args.worker_out:
        worker(args)
        return

    from rwdeploy.io import atomic_file
    from rwdeploy.runtime.environment import environment

    result = {"benchmark": "sparse", "rounds": args.rounds, "environment": environment(),
              "loadavg_start": os.getloadavg(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              **{s: [] for s in args.sections}}
    for th in args.threads.split(","):
        n = os.cpu_count() if th == "all" else int(th)
        env = {**os.environ, "TVM_NUM_THREADS": str(n), "OMP_NUM_THREADS": str(n)}
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker-out", out], env=env, check=True)
        part = json.loads(Path(out).read_text())
        os.unlink(out)
        for section, rows in part.items():
            result[section] += rows
    result["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    name = f"{args.name}_arm" if args.sections == ["arm"] else args.name
    with atomic_file(RESULTS / f"{name}.json") as p:
        p.write_text(json.dumps(result, indent=1))
    md = markdown(result)
    with atomic_file(RESULTS / f"{name}.md") as p:
        p.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
