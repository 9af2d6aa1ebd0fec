"""Unstructured sparsity: rwdeploy's CSR/BSR kernels against the best dense and torch CSR.

Layer cases (each at 50/80/90/95/98/99 % irregular sparsity and at block sparsity):
  linear   4096 -> 1024
  conv3x3  256 -> 256 at 14x14, padding 1
  conv1x1  512 -> 512 at 7x7
Columns, all measured in the same process and interleaved (R rounds, each timing every
alternative once, medians over rounds) so load changes hit all of them alike:
  best dense = min(ONNX Runtime, torch eager, rwdeploy's scheduled TIR dense kernel in TVM),
  torch CSR (torch.sparse.mm; conv via F.unfold), rwdeploy CSR / BSR (TIR kernels in TVM),
  and the format rwdeploy's `pack_sparse` chooses from those measurements.
End to end: LeNet-5 and VGG-16 (BN folded into the convs for every variant) with 95 %
irregular sparsity in every conv and Linear: dense ORT / torch vs the packed model built
with TVM (every layer through rwdeploy's kernels).

Each thread setting runs in its own process (TVM sizes its pool once, from TVM_NUM_THREADS).
Writes benchmarks/results/sparse.json and sparse.md; records os.getloadavg() per row.

  python benchmarks/sparse.py                       # full run (~10-15 min on 2 busy cores)
  python benchmarks/sparse.py --quick               # fewer sparsities, no VGG
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
CASES = {
    "linear": {"kind": "linear", "in": 4096, "out": 1024},
    "conv3x3": {"kind": "conv", "in": 256, "out": 256, "k": 3, "hw": 14, "pad": 1},
    "conv1x1": {"kind": "conv", "in": 512, "out": 512, "k": 1, "hw": 7, "pad": 0},
}
# block patterns: (rows, cols) of the zero/non-zero blocks, at 95 % block sparsity
BLOCK_PATTERNS = {"linear": [(1, 4), (4, 1)], "conv3x3": [(4, 1)], "conv1x1": [(4, 1)]}


# ----------------------------------------------------------------------------- worker side

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


def _ort_session(module, x, threads: int, tmp: Path):
    from rwdeploy.runtime.onnx_export import export_onnx
    from rwdeploy.runtime.ort_runner import OrtRunner

    path = tmp / f"m{time.monotonic_ns()}.onnx"
    export_onnx(module, x, path)
    runner = OrtRunner(path, threads=threads)
    feed = {runner.input_name: x.numpy()}
    return lambda: runner.session.run(None, feed)


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


def _interleaved(fns: dict, rounds: int, target_s: float = 0.005) -> dict:
    """Median/min ms per call of each callable, timed round-robin in short bursts.

    On a shared machine the median includes other people's load; the min over many short
    bursts estimates the uncontended time. Both are kept."""
    calls = {}
    for name, fn in fns.items():
        fn()
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(target_s / max(time.perf_counter() - t0, 1e-7)))
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            n = calls[name]
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - t0) / n)
    return {name: {"median_ms": statistics.median(s) * 1e3, "min_ms": min(s) * 1e3, "n": len(s)}
            for name, s in samples.items()}


def _tvm_fns(cands, target):
    """Callables running each candidate's kernel once (one build for all)."""
    import numpy as np
    import tvm

    from rwdeploy.runtime.tvm_kernels import kernel_for, scratch_shapes

    lib = tvm.compile(tvm.IRModule({c.spec.name(): kernel_for(c.spec) for c in cands}), target=target).mod
    dev = tvm.cpu()
    fns, outs = {}, {}
    for c in cands:
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), dev) for a in c.args]
        args += [tvm.runtime.tensor(np.zeros(s, np.float32), dev) for s in [*scratch_shapes(c.spec), c.out_shape]]
        f = lib[c.spec.name()]
        fns[c.key] = (lambda f=f, args=args: f(*args))
        outs[c.key] = args[-1]
    return fns, outs


def _chosen(layer, x, timings: dict) -> str:
    """The format pack_sparse picks for this layer, fed this row's measurements."""
    import torch

    from rwdeploy.passes.pack_sparse import pack_sparse

    def timer(layers):
        return {name: {alt: v for alt, v in timings.items()} for name, *_ in layers}

    gm = torch.fx.symbolic_trace(torch.nn.Sequential(layer))
    res = pack_sparse(gm, x, timer=timer)
    return res.record.layers[0].chosen


def run_layer_rows(args, threads: int, tmp: Path) -> list[dict]:
    import numpy as np
    import torch

    from rwdeploy.runtime import tvm_sparse
    from rwdeploy.passes.ops import module_layer_view
    from rwdeploy.passes.pack_sparse import _candidates

    target = tvm_sparse.host_target()
    rows = []
    for cname in args.cases:
        case = CASES[cname]
        for batch in args.batches:
            x = _input(case, batch)
            patterns = [(s, (1, 1)) for s in args.sparsities]
            patterns += [(0.95, b) for b in BLOCK_PATTERNS[cname]]
            dense_layer = _layer(case, 0.0)
            ort_dense = _ort_session(dense_layer, x, threads, tmp)   # dense speed is sparsity-blind
            for sparsity, block in patterns:
                load0 = os.getloadavg()
                layer = _layer(case, sparsity, block)
                with torch.no_grad():
                    ref = layer(x).numpy()
                shape = list(x.shape)
                formats = _candidates(module_layer_view(layer, "", layer))
                cands = [tvm_sparse.layer_candidate("rw:dense", layer, shape, None)]
                cands += [tvm_sparse.layer_candidate(f"rw:{f}", layer, shape, m) for f, m in formats.items()]
                for c in cands:          # real input, so outputs can be checked
                    c.args[0] = x.numpy().reshape(c.args[0].shape)
                    c.args[-1] = layer.bias.detach().numpy()
                fns, outs = _tvm_fns(cands, target)
                for f in fns.values():
                    f()
                err = {k: float(np.abs(v.numpy().reshape(ref.shape) - ref).max() / max(np.abs(ref).max(), 1e-30))
                       for k, v in outs.items()}
                fns["ort:dense"] = ort_dense
                with torch.no_grad():
                    fns["torch:dense"] = (lambda layer=layer: layer(x))
                    fns["torch:csr"] = _torch_csr(layer, x)
                t = _interleaved(fns, args.rounds)
                med = {k: v["median_ms"] for k, v in t.items()}
                dense_alts = {k: med[k] for k in ("ort:dense", "torch:dense", "rw:dense")}
                best_dense = min(dense_alts, key=dense_alts.get)
                rw_fmt = {k[3:]: v for k, v in t.items() if k.startswith("rw:")}
                chosen = _chosen(layer, x, rw_fmt)
                chosen_ms = med[f"rw:{chosen}"]
                bsr = {k: v for k, v in med.items() if k.startswith("rw:bsr")}
                best_bsr = min(bsr, key=bsr.get) if bsr else None
                row = {
                    "case": cname, "batch": batch, "threads": threads,
                    "pattern": "irregular" if block == (1, 1) else f"block{block[0]}x{block[1]}",
                    "sparsity": sparsity, "nnz": int((layer.weight != 0).sum()),
                    "best_dense": best_dense, "best_dense_ms": med[best_dense],
                    "ms": med, "min_ms": {k: v["min_ms"] for k, v in t.items()},
                    "best_bsr": best_bsr, "chosen": chosen, "chosen_ms": chosen_ms,
                    "speedup_vs_best_dense": med[best_dense] / chosen_ms,
                    "min_speedup_vs_best_dense": min(t[k]["min_ms"] for k in dense_alts) / t[f"rw:{chosen}"]["min_ms"],
                    "min_speedup_vs_torch_csr": t["torch:csr"]["min_ms"] / t[f"rw:{chosen}"]["min_ms"],
                    "speedup_vs_torch_csr": med["torch:csr"] / chosen_ms,
                    "csr_speedup_vs_best_dense": med[best_dense] / med["rw:csr"],
                    "csr_speedup_vs_torch_csr": med["torch:csr"] / med["rw:csr"],
                    "max_rel_err": err, "loadavg_start": load0, "loadavg_end": os.getloadavg(),
                }
                rows.append(row)
                print(_fmt_row(row), flush=True)
    return rows


def _stock_sparse_onnx(w) -> bytes:
    """y = x @ W.T computed per call by stock ops: Gather(x, col) * values, ScatterElements(add)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = w.detach().numpy()
    r, c = np.nonzero(w)
    n, k = w.shape
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])
    inits = [numpy_helper.from_array(c.astype(np.int64), "col"),
             numpy_helper.from_array(w[r, c].astype(np.float32)[None], "vals"),
             numpy_helper.from_array(r.astype(np.int64)[None], "rows"),
             numpy_helper.from_array(np.zeros((1, n), np.float32), "zeros")]
    nodes = [helper.make_node("Gather", ["x", "col"], ["xg"], axis=1),
             helper.make_node("Mul", ["xg", "vals"], ["p"]),
             helper.make_node("ScatterElements", ["zeros", "rows", "p"], ["y"], axis=1, reduction="add")]
    graph = helper.make_graph(nodes, "stock_sparse", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


def run_onnx_rows(args, threads: int, tmp: Path) -> list[dict]:
    """The 4096->1024 Linear in ONNX Runtime: dense file vs compact file (CSR folded at load)
    vs a stock-op sparse computation; file sizes. Batch 1."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from rwdeploy.runtime.onnx_export import export_onnx
    from rwdeploy.sparse import CsrLinear

    case, rows = CASES["linear"], []
    x = _input(case, 1)
    for sparsity in args.sparsities:
        layer = _layer(case, sparsity)
        dense_path, compact_path = tmp / "dense.onnx", tmp / "compact.onnx"
        export_onnx(layer, x, dense_path)
        export_onnx(torch.nn.Sequential(CsrLinear.from_dense(layer)), x, compact_path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        sessions = {"ort:dense": ort.InferenceSession(str(dense_path), opts),
                    "ort:compact": ort.InferenceSession(str(compact_path), opts)}
        sessions["ort:stock_sparse"] = ort.InferenceSession(_stock_sparse_onnx(layer.weight), opts)
        ref = layer(x).detach().numpy() - layer.bias.detach().numpy()
        feed = {"x": x.numpy()}
        err = float(np.abs(sessions["ort:stock_sparse"].run(None, feed)[0] - ref).max())
        fns = {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: x.numpy()})) for k, s in sessions.items()}
        t = _interleaved(fns, args.rounds)
        row = {"case": "linear", "batch": 1, "threads": threads, "sparsity": sparsity,
               "ms": {k: v["median_ms"] for k, v in t.items()}, "min_ms": {k: v["min_ms"] for k, v in t.items()},
               "dense_bytes": dense_path.stat().st_size, "compact_bytes": compact_path.stat().st_size,
               "stock_sparse_max_abs_err": err, "loadavg": os.getloadavg()}
        row["size_ratio"] = row["compact_bytes"] / row["dense_bytes"]
        rows.append(row)
        m = row["ms"]
        print(f"onnx linear {sparsity:.2f} t{threads}: file {row['size_ratio']:.3f} of dense | ORT dense "
              f"{m['ort:dense']:.3f} compact {m['ort:compact']:.3f} stock-op sparse {m['ort:stock_sparse']:.3f} ms",
              flush=True)
    return rows


def _sparsify_model(model, sparsity: float):
    import torch

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.copy_(_prune(m.weight, sparsity))
    return model


def run_e2e_rows(args, threads: int, tmp: Path) -> list[dict]:
    import numpy as np
    import torch
    import tvm
    from torch.fx.experimental.optimization import fuse

    from rwdeploy import models
    from rwdeploy.passes.pack_sparse import pack_sparse
    from rwdeploy.runtime import tvm_sparse
    from rwdeploy.sparse.timing import HostLayerTimer

    rows = []
    for name, batches in args.e2e:
        model = _sparsify_model(models.create(name).eval(), 0.95)
        dense = fuse(torch.fx.symbolic_trace(model))           # BN folded for every variant
        for batch in batches:
            load0 = os.getloadavg()
            shape = list(models.input_shape(name))
            shape[0] = batch
            x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
            t0 = time.perf_counter()
            res = pack_sparse(dense, x, timer=HostLayerTimer())
            pack_s = time.perf_counter() - t0
            packed = res.gm
            target = tvm_sparse.host_target()
            dev = tvm.cpu()

            def vm_of(module):
                mod = tvm_sparse.import_exported_program(torch.export.export(module, (x,)))
                return tvm.relax.VirtualMachine(tvm.compile(mod, target=target), dev)
            vm_packed, vm_dense = vm_of(packed), vm_of(dense)
            xt = tvm.runtime.tensor(x.numpy(), dev)
            with torch.no_grad():
                ref = dense(x).numpy()
            err = float(np.abs(vm_packed["main"](xt).numpy() - ref).max() / np.abs(ref).max())
            fns = {"ort:dense": _ort_session(dense, x, threads, tmp),
                   "torch:dense": lambda: dense(x),
                   "tvm:dense_rw_kernels": lambda: vm_dense["main"](xt),
                   "tvm:packed": lambda: vm_packed["main"](xt)}
            with torch.no_grad():
                t = _interleaved(fns, args.rounds, target_s=0.02)
            med = {k: v["median_ms"] for k, v in t.items()}
            best_dense = min(("ort:dense", "torch:dense"), key=med.get)
            rec = res.record
            row = {"model": name, "batch": batch, "threads": threads, "sparsity": 0.95,
                   "ms": med, "min_ms": {k: v["min_ms"] for k, v in t.items()},
                   "best_dense": best_dense, "best_dense_ms": med[best_dense],
                   "speedup_packed_vs_best_dense": med[best_dense] / med["tvm:packed"],
                   "min_speedup_packed_vs_best_dense": min(t[k]["min_ms"] for k in ("ort:dense", "torch:dense"))
                   / t["tvm:packed"]["min_ms"],
                   "formats": {l.name: l.chosen for l in rec.layers},
                   "packed_layers": len(rec.packed), "layers": len(rec.layers),
                   "bytes_saved": rec.bytes_saved(), "pack_pass_s": pack_s, "max_rel_err": err,
                   "loadavg_start": load0, "loadavg_end": os.getloadavg()}
            rows.append(row)
            print(f"e2e {name} b{batch} t{threads}: best dense {best_dense} {med[best_dense]:.3f} ms, "
                  f"packed TVM {med['tvm:packed']:.3f} ms ({row['speedup_packed_vs_best_dense']:.2f}x), "
                  f"{row['packed_layers']}/{row['layers']} packed, err {err:.1e}, load {load0[0]:.1f}", flush=True)
    return rows


def _fmt_row(r: dict) -> str:
    m = r["ms"]
    return (f"{r['case']:8s} b{r['batch']} t{r['threads']} {r['pattern']:9s} {r['sparsity']:.2f}: "
            f"best dense {r['best_dense']} {r['best_dense_ms']:.3f} | torch csr {m['torch:csr']:.3f} | "
            f"rw csr {m['rw:csr']:.3f} | bsr {r['best_bsr']} {m.get(r['best_bsr'], float('nan')):.3f} | "
            f"chosen {r['chosen']} {r['chosen_ms']:.3f} ({r['speedup_vs_best_dense']:.2f}x dense, "
            f"{r['speedup_vs_torch_csr']:.2f}x torch csr) | load {r['loadavg_start'][0]:.1f}")


def worker(args) -> None:
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    threads = int(os.environ["TVM_NUM_THREADS"])
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = {"onnx": run_onnx_rows(args, threads, Path(tmp)) if args.onnx else [],
               "layers": run_layer_rows(args, threads, Path(tmp)) if args.cases else [],
               "e2e": run_e2e_rows(args, threads, Path(tmp)) if args.e2e else []}
    Path(args.worker_out).write_text(json.dumps(out))


# ----------------------------------------------------------------------------- driver side

def markdown(result: dict) -> str:
    lines = ["# Unstructured sparsity: rwdeploy CSR/BSR vs best dense and torch CSR", "",
             f"Machine: {result['environment'].get('cpu')} ({result['environment'].get('logical_cores')} "
             f"logical cores, shared: load average recorded per row). Medians of {result['rounds']} "
             "interleaved rounds, ms per call.", "",
             "Speed-ups: median-based, then min-based in brackets (min over short bursts = the "
             "uncontended estimate).", "",
             "| case | batch | threads | pattern | sparsity | best dense (ms) | torch CSR | rw CSR | rw BSR (best) | "
             "chosen | chosen vs best dense | vs torch CSR | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["layers"]:
        m = r["ms"]
        bsr = f"{m[r['best_bsr']]:.3f} ({r['best_bsr'][3:]})" if r["best_bsr"] else "-"
        lines.append(
            f"| {r['case']} | {r['batch']} | {r['threads']} | {r['pattern']} | {r['sparsity']:.2f} | "
            f"{r['best_dense_ms']:.3f} ({r['best_dense']}) | {m['torch:csr']:.3f} | {m['rw:csr']:.3f} | {bsr} | "
            f"{r['chosen']} {r['chosen_ms']:.3f} | {r['speedup_vs_best_dense']:.2f}x "
            f"({r['min_speedup_vs_best_dense']:.2f}x) | {r['speedup_vs_torch_csr']:.2f}x "
            f"({r['min_speedup_vs_torch_csr']:.2f}x) | {r['loadavg_start'][0]:.1f} |")
    if result["onnx"]:
        lines += ["", "## ONNX Runtime: 4096->1024 Linear, batch 1 (compact file = CSR folded at load)", "",
                  "| sparsity | threads | compact / dense file | ORT dense | ORT compact | ORT stock-op sparse | load |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["onnx"]:
            m = r["ms"]
            lines.append(f"| {r['sparsity']:.2f} | {r['threads']} | {r['size_ratio']:.3f} | {m['ort:dense']:.3f} | "
                         f"{m['ort:compact']:.3f} | {m['ort:stock_sparse']:.3f} | {r['loadavg'][0]:.1f} |")
    if result["e2e"]:
        lines += ["", "## End to end (95 % irregular sparsity in every conv and Linear)", "",
                  "| model | batch | threads | ORT dense | torch dense | TVM dense (rw kernels) | TVM packed | "
                  "packed vs best dense | packed layers | bytes saved | load |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["e2e"]:
            m = r["ms"]
            lines.append(
                f"| {r['model']} | {r['batch']} | {r['threads']} | {m['ort:dense']:.3f} | {m['torch:dense']:.3f} | "
                f"{m['tvm:dense_rw_kernels']:.3f} | {m['tvm:packed']:.3f} | {r['speedup_packed_vs_best_dense']:.2f}x "
                f"({r['min_speedup_packed_vs_best_dense']:.2f}x) | "
                f"{r['packed_layers']}/{r['layers']} | {r['bytes_saved'] / 1e6:.2f} MB | {r['loadavg_start'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,all", help="comma list; 'all' = every logical core")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--sparsities", default=",".join(map(str, SPARSITIES)))
    ap.add_argument("--cases", default=",".join(CASES), help="comma list, or '' for none")
    ap.add_argument("--e2e", default="lenet5:1+8,vgg16_bn:1", help="model:batch+batch,... or ''")
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--no-onnx", dest="onnx", action="store_false", help="skip the ONNX Runtime rows")
    ap.add_argument("--quick", action="store_true", help="sparsities 0.5,0.95,0.99; LeNet only")
    ap.add_argument("--name", default="sparse", help="results file stem")
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.sparsities, args.e2e = "0.5,0.95,0.99", "lenet5:1+8"
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.sparsities = [float(s) for s in args.sparsities.split(",") if s]
    args.cases = [c for c in args.cases.split(",") if c]
    args.e2e = [(e.split(":")[0], [int(b) for b in e.split(":")[1].split("+")]) for e in args.e2e.split(",") if e]
    if args.worker_out:
        worker(args)
        return

    from rwdeploy.io import atomic_file
    from rwdeploy.runtime.environment import environment

    result = {"benchmark": "sparse", "rounds": args.rounds, "environment": environment(),
              "loadavg_start": os.getloadavg(), "onnx": [], "layers": [], "e2e": [],
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    for th in args.threads.split(","):
        n = os.cpu_count() if th == "all" else int(th)
        env = {**os.environ, "TVM_NUM_THREADS": str(n), "OMP_NUM_THREADS": str(n)}
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            out = f.name
        cmd = [sys.executable, __file__, "--worker-out", out, "--batches", ",".join(map(str, args.batches)),
               "--sparsities", ",".join(map(str, args.sparsities)), "--cases", ",".join(args.cases),
               "--e2e", ",".join(f"{m}:{'+'.join(map(str, b))}" for m, b in args.e2e),
               "--rounds", str(args.rounds), *([] if args.onnx else ["--no-onnx"])]
        subprocess.run(cmd, env=env, check=True)
        part = json.loads(Path(out).read_text())
        os.unlink(out)
        result["onnx"] += part["onnx"]
        result["layers"] += part["layers"]
        result["e2e"] += part["e2e"]
    result["loadavg_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    with atomic_file(RESULTS / f"{args.name}.json") as p:
        p.write_text(json.dumps(result, indent=1))
    md = markdown(result)
    with atomic_file(RESULTS / f"{args.name}.md") as p:
        p.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
