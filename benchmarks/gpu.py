"""The `gpu` target on a real NVIDIA GPU: TVM's CUDA build of the zoo models (original and the
50%-slim shape) against PyTorch eager CUDA (and ONNX Runtime's CUDA provider where installed).

Two steps, because building needs TVM's compiler but no GPU, and running needs a GPU but only
TVM's runtime (as when a build host ships `model.gpu.so` to a GPU box):

    python benchmarks/gpu.py build DIR [--models lenet5,resnet20] [--batches 1,8] [--arch sm_90]
    python benchmarks/gpu.py cli DIR        # optional: `rwdeploy compile --target gpu` outputs
    python benchmarks/gpu.py measure DIR [--out benchmarks/results] [--name gpu]

`build` writes, per model/variant/batch, the artifact `rwdeploy compile --target gpu` ships
(`tvm_build.build(..., "gpu")`: without a driver on the build host its CUDA module is CUDA
source) and, with `--flavours source,cubin`, a second one whose kernels were compiled to a
cubin on the build host (`runtime.cuda_cubin`), plus the input and torch's CPU output (and,
with `--onnx`, the ONNX file). The GPU side rebuilds the torch models from the same seed and
checks that they reproduce that output before timing anything. `measure` checks each artifact's output against that torch output
(max |tvm - torch| <= 1e-4 * max|torch|, fp32 on both sides) and times it in alternation with
torch eager on the same GPU (TF32 off, so both compute in fp32), batch by batch. A row whose
output is wrong is reported as wrong, never timed. Load averages are recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # benchmarks.targets; an installed rwdeploy comes first
RESULTS = ROOT / "benchmarks" / "results"
TOLERANCE_REL = 1e-4


def calibrate_batchnorm(module: torch.nn.Module, shape: tuple[int, ...], seed: int = 2) -> None:
    """BatchNorm statistics from random batches, on the CPU.

    With freshly initialised statistics (mean 0, variance 1) a deep network's activations can
    vanish (MobileNetV2's features reach ~1e-7), and a network whose output is its last bias
    checks nothing. Calibrated statistics keep every layer's output at a trained-like scale.
    """
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    gen = torch.Generator().manual_seed(seed)
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # the cumulative average over the batches
        bn.train()
    with torch.no_grad():
        for _ in range(4):
            module(torch.randn((8, *shape[1:]), generator=gen))
    module.eval()


def _variants(name: str) -> dict[str, torch.nn.Module]:
    """The original and slim torch models, the same on the build host and the GPU machine."""
    import rwdeploy.models as zoo
    from benchmarks.targets import slim_model

    torch.manual_seed(0)
    variants = {"original": zoo.create(name).eval(), "slim": slim_model(name).eval()}
    for module in variants.values():
        calibrate_batchnorm(module, zoo.input_shape(name))
    return variants


def build(work: Path, models: list[str], batches: list[int], arch: str, flavours: list[str],
          onnx: bool = False) -> None:
    """Build into `work`, adding to the cases an earlier build there wrote."""
    import rwdeploy.models as zoo
    from rwdeploy.runtime import tvm_build
    from rwdeploy.runtime.onnx_export import export_onnx

    work.mkdir(parents=True, exist_ok=True)
    manifest_path = work / "manifest.json"
    cases = json.loads(manifest_path.read_text())["cases"] if manifest_path.exists() else []
    cases = [c for c in cases if not (c["model"] in models and c["batch"] in batches)]
    for name in models:
        for variant, module in _variants(name).items():
            for batch in batches:
                case = f"{name}.{variant}.b{batch}"
                x = torch.randn(batch, *zoo.input_shape(name)[1:],
                                generator=torch.Generator().manual_seed(1))
                with torch.no_grad():
                    ref = module(x).numpy()
                np.save(work / f"{case}.input.npy", x.numpy())
                np.save(work / f"{case}.ref.npy", ref)
                if onnx:
                    export_onnx(module, x, work / f"{case}.onnx")
                entry: dict[str, Any] = {"case": case, "model": name, "variant": variant,
                                         "batch": batch, "artifacts": {}}
                for flavour in flavours:
                    out = work / f"{case}.{flavour}"
                    if flavour == "cubin":  # a cubin where nvcc is installed and no driver
                        art = tvm_build.build(module, x, "gpu", gpu_arch=arch, out_dir=out)
                        if not art.cuda_binary:
                            raise SystemExit("cubin flavour: this host kept CUDA source (no nvcc?)")
                    else:  # what a build host without nvcc ships
                        os.environ["RWDEPLOY_CUDA_SOURCE"] = "1"
                        try:
                            art = tvm_build.build(module, x, "gpu", gpu_arch=arch, out_dir=out)
                        finally:
                            del os.environ["RWDEPLOY_CUDA_SOURCE"]
                    entry["artifacts"][flavour] = {
                        "file": str(art.path.relative_to(work)), "build_s": round(art.build_s, 2),
                        "size_bytes": art.size_bytes, "cuda_binary": art.cuda_binary}
                    print(f"{case:28s} {flavour:6s} build {art.build_s:5.1f} s "
                          f"cubin={art.cuda_binary} {art.size_bytes / 1e6:5.2f} MB", flush=True)
                cases.append(entry)
    import tvm

    manifest = {"arch": arch, "built_with": {"torch": torch.__version__, "tvm": tvm.__version__,
                                             "host": platform.node()}, "cases": cases}
    order = list(dict.fromkeys(c["model"] for c in cases))
    cases.sort(key=lambda c: (order.index(c["model"]), c["variant"], c["batch"]))
    manifest_path.write_text(json.dumps(manifest, indent=1))


def _zero_half_the_filters(module: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(3)
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d) and m.out_channels > 3:
            with torch.no_grad():
                m.weight[torch.randperm(m.out_channels, generator=gen)[: m.out_channels // 2]] = 0


def _zero_90_percent_of_the_weights(module: torch.nn.Module) -> None:
    """Irregular 90% in every conv/Linear weight of at least 5,000 entries."""
    gen = torch.Generator().manual_seed(3)
    for p in module.parameters():
        if p.dim() > 1 and p.numel() >= 5000:
            with torch.no_grad():
                p[torch.rand(p.shape, generator=gen) < 0.9] = 0


# name -> (zoo architecture, how the checkpoint is pruned, int8 weights per channel)
CLI_CASES = {
    "resnet20_filters50": ("resnet20", _zero_half_the_filters, False),
    "lenet5_irregular90": ("lenet5", _zero_90_percent_of_the_weights, False),
    "mobilenet_v2_irregular90": ("mobilenet_v2", _zero_90_percent_of_the_weights, False),
    "resnet20_filters50_int8": ("resnet20", _zero_half_the_filters, True),
}


def cli_build(work: Path, arch: str, cases: list[str]) -> None:
    """`rwdeploy compile CKPT --target gpu` as a user runs it, for each case: a pruned checkpoint
    (half the filters zeroed, or 90% irregular, which `--sparse auto` packs where it measures a
    gain); the probe input (batch 1, the shipped build's batch) and torch's output of the pruned
    model go beside the output folder."""
    import rwdeploy.models as zoo

    for case in cases:
        arch_name, prune, int8 = CLI_CASES[case]
        folder = work / "cli" / case
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        module = zoo.create(arch_name).eval()
        prune(module)
        calibrate_batchnorm(module, zoo.input_shape(arch_name))
        ckpt = folder / f"{case}.pt"
        if int8:
            from rwdeploy.io import Checkpoint, save_checkpoint
            from rwdeploy.quant import quantize_model

            spec = quantize_model(module, 8, per_channel=True)
            save_checkpoint(Checkpoint(arch_name, module.state_dict(), zoo.input_shape(arch_name),
                                       metadata={"quantization": spec.to_dict()}), ckpt)
        else:
            torch.save(module.state_dict(), ckpt)
        cmd = [sys.executable, "-m", "rwdeploy", "compile", str(ckpt), "--arch", arch_name,
               "--target", "gpu", "--gpu-arch", arch, "--out", str(folder / "out"),
               "--batch", "1", "--no-measure"]
        subprocess.run(cmd, check=True)
        x = torch.randn(zoo.input_shape(arch_name), generator=torch.Generator().manual_seed(9))
        probe = {"input": x.numpy()}
        with torch.no_grad():
            probe["output"] = module(x).numpy()
        qdq = folder / "out" / "slim.qdq.onnx"
        if qdq.exists():  # the int8 graph's own output, from ONNX Runtime on this host
            import onnxruntime as ort

            sess = ort.InferenceSession(str(qdq), providers=["CPUExecutionProvider"])
            probe["qdq_output"] = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
        np.savez(folder / "probe.npz", **probe)
        ckpt.unlink()  # the GPU side needs only the compile's output
        manifest_path = work / "manifest.json"
        if not manifest_path.exists():  # a cli-only folder: no zoo cases
            import tvm

            manifest_path.write_text(json.dumps({"arch": arch, "cases": [], "built_with": {
                "torch": torch.__version__, "tvm": tvm.__version__, "host": platform.node()}}))
        for extra in ("original.onnx", "slim.onnx", "slim.pt2", "slim.qdq.onnx", "slim.qdq.tvm.so"):
            (folder / "out" / extra).unlink(missing_ok=True)


def _check_cli(work: Path) -> list[dict[str, Any]]:
    """Each case's shipped `model.gpu.so` / `original.gpu.so` through rwdeploy's own loader."""
    from rwdeploy.runtime.targets import get_target
    from rwdeploy.runtime.tvm_build import TvmArtifact, measure_local

    rows = []
    for probe_path in sorted((work / "cli").glob("*/probe.npz")):
        folder = probe_path.parent
        probe = np.load(probe_path)
        x, ref = torch.from_numpy(probe["input"]), probe["output"]
        report = json.loads((folder / "out" / "report.json").read_text())
        packed = (report.get("sparse") or {}).get("packed_layers", 0)
        for name in ("model.gpu.so", "original.gpu.so", "slim.qdq.gpu.so"):
            path = folder / "out" / name
            if not path.exists():
                continue
            if name == "slim.qdq.gpu.so":  # the int8 graph: against its own (ORT) output
                ref = probe["qdq_output"]
            art = TvmArtifact(target=get_target("gpu"), path=path, build_s=0.0, export_s=0.0,
                              size_bytes=path.stat().st_size, device_modules=["cuda"])
            stats, err = measure_local(art, x, ref, warmup=20, min_runs=100, min_time_s=1.0)
            rel = err / (float(np.abs(ref).max()) or 1.0)
            rows.append({"case": folder.name, "file": name, "packed_layers": packed if name == "model.gpu.so" else 0,
                         "max_rel": rel, "exact": rel <= TOLERANCE_REL,
                         "median_ms": round(stats.median_ms, 4), "n": stats.n})
            print(f"cli {folder.name:26s} {name:16s} max rel {rel:.1e}  {stats.median_ms:.3f} ms", flush=True)
    return rows


def build_timm(work: Path, names: list[str], arch: str) -> None:
    """Published architectures (timm, random init made trained-looking as in the conformance
    suite) at batch 1 and their default input size: the gpu artifact and torch's CPU output.
    The GPU side checks and times TVM alone (timm there is another version: other weights)."""
    sys.path.insert(0, str(ROOT / "tests" / "conformance"))
    from conformance_prepare import make_trained_looking
    from torchvision_shim import import_timm

    from rwdeploy.runtime import tvm_build

    timm = import_timm()
    work.mkdir(parents=True, exist_ok=True)
    manifest_path = work / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {
        "arch": arch, "cases": [], "built_with": {"torch": torch.__version__, "host": platform.node()}}
    for name in names:
        torch.manual_seed(0)
        module = timm.create_model(name, pretrained=False).eval()
        shape = (1, *module.default_cfg["input_size"])
        make_trained_looking(module, shape, seed=1)
        case = f"{name}.timm.b1"
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = module(x).numpy()
        np.save(work / f"{case}.input.npy", x.numpy())
        np.save(work / f"{case}.ref.npy", ref)
        art = tvm_build.build(module, x, "gpu", gpu_arch=arch, out_dir=work / f"{case}.cubin")
        manifest["cases"] = [c for c in manifest["cases"] if c["case"] != case] + [{
            "case": case, "model": name, "variant": "timm", "batch": 1, "timm": True,
            "artifacts": {"cubin": {"file": str(art.path.relative_to(work)), "build_s": round(art.build_s, 2),
                                    "size_bytes": art.size_bytes, "cuda_binary": art.cuda_binary}}}]
        print(f"{case:28s} cubin  build {art.build_s:5.1f} s {art.size_bytes / 1e6:5.2f} MB", flush=True)
    import tvm

    manifest["built_with"]["tvm"] = tvm.__version__
    manifest_path.write_text(json.dumps(manifest, indent=1))


def _gpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "device": torch.cuda.get_device_name(0)}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _cuda_runtime() -> Any:
    """tvm.cuda(0), loading TVM's CUDA runtime library where only TVM's runtime is installed
    (`import tvm` loads it only together with the compiler)."""
    import tvm

    if getattr(tvm.base, "_RUNTIME_ONLY", False) and "tvm_runtime_cuda" not in tvm.base._LOADED_LIBS:
        from tvm_ffi.libinfo import load_lib_ctypes

        runtime_dir = Path(tvm.base._LOADED_LIBS["tvm_runtime"]._name).resolve().parent
        tvm.base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm", target_name="tvm_runtime_cuda", extra_lib_paths=[runtime_dir],
            mode="RTLD_LOCAL")
    return tvm.cuda(0)


def _load_vm(path: Path, dev: Any) -> Any:
    import tvm
    from tvm.runtime.vm import VirtualMachine  # the runtime's VM: no TVM compiler needed

    return VirtualMachine(tvm.runtime.load_module(str(path)), dev)["main"]


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {(lines[-1] if lines else '')[:300]}"


def _first(out: Any) -> np.ndarray:
    return out.numpy() if hasattr(out, "numpy") else _first(out[0])


def _ort_cuda_session(path: Path) -> Any | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    return ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])


def measure(work: Path, out_dir: Path, name: str) -> dict[str, Any]:
    import tvm

    import rwdeploy.models as zoo
    from rwdeploy.runtime.latency import time_interleaved

    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    manifest = json.loads((work / "manifest.json").read_text())
    dev = _cuda_runtime()
    if not dev.exist:
        raise SystemExit("measure: no CUDA device visible to TVM's runtime")
    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    modules: dict[tuple[str, str], torch.nn.Module] = {}
    for case in manifest["cases"]:
        model, variant, batch = case["model"], case["variant"], case["batch"]
        x_np = np.load(work / f"{case['case']}.input.npy")
        ref = np.load(work / f"{case['case']}.ref.npy")
        scale = float(np.abs(ref).max()) or 1.0
        runs: dict[str, Any] = {}
        row: dict[str, Any] = {"model": model, "variant": variant, "batch": batch, "artifacts": {}}
        if not case.get("timm"):  # zoo models: torch eager on the GPU beside TVM
            key = (model, variant)
            if key not in modules:  # the same seed as the build: the output check below proves it
                modules[key] = _variants(model)[variant].cuda().eval()
            module = modules[key]
            x_gpu = torch.from_numpy(x_np).cuda()

            def torch_run(module: Any = module, x_gpu: Any = x_gpu) -> None:
                with torch.no_grad():
                    module(x_gpu)
                torch.cuda.synchronize()

            with torch.no_grad():
                torch_err = float(np.abs(module(x_gpu).cpu().numpy() - ref).max())
            if torch_err > TOLERANCE_REL * scale:
                raise SystemExit(f"{case['case']}: torch on the GPU differs from the build host's "
                                 f"torch by {torch_err / scale:.2e} (max rel): not the same weights?")
            runs["torch"] = torch_run
            row["torch_max_rel"] = torch_err / scale
        for flavour, art in case["artifacts"].items():
            status: dict[str, Any] = {"cuda_binary": art["cuda_binary"]}
            try:
                main = _load_vm(work / art["file"], dev)
                x_tvm = tvm.runtime.tensor(x_np, dev)
                got = _first(main(x_tvm))
                err = float(np.abs(got - ref).max()) / scale
                status.update(loaded=True, max_rel=err, exact=err <= TOLERANCE_REL)
                if err <= TOLERANCE_REL:
                    def tvm_run(main: Any = main, x_tvm: Any = x_tvm) -> None:
                        main(x_tvm)
                        dev.sync()
                    runs[f"tvm_{flavour}"] = tvm_run
            except Exception as exc:  # a shipped artifact that does not load is the finding
                status.update(loaded=False, error=_one_line(exc))
            row["artifacts"][flavour] = status
        onnx_path = work / f"{case['case']}.onnx"
        sess = _ort_cuda_session(onnx_path) if onnx_path.exists() else None
        if sess is not None:
            feed = {sess.get_inputs()[0].name: x_np}
            ort_err = float(np.abs(sess.run(None, feed)[0] - ref).max()) / scale
            row["ort_cuda_max_rel"] = ort_err
            if ort_err <= TOLERANCE_REL:
                runs["ort_cuda"] = lambda: sess.run(None, feed)
        stats = time_interleaved(runs, warmup=20, min_runs=100, min_time_s=1.0) if runs else {}
        row["latency_ms"] = {k: {"median": round(s.median_ms, 4), "p90": round(s.p90_ms, 4),
                                 "min": round(s.min_ms, 4), "n": s.n} for k, s in stats.items()}
        rows.append(row)
        line = "  ".join(f"{k} {s.median_ms:7.3f}" for k, s in stats.items())
        print(f"{case['case']:28s} {line}  (ms median)", flush=True)
    cli_rows = _check_cli(work)
    doc = {"gpu": _gpu_info(), "built_with": manifest["built_with"], "arch": manifest["arch"],
           "tolerance_rel": TOLERANCE_REL, "loadavg_before": [round(v, 2) for v in load_before],
           "loadavg_after": [round(v, 2) for v in os.getloadavg()],
           "cpu_cores": os.cpu_count(), "rows": rows, "cli": cli_rows}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(doc, indent=1))
    (out_dir / f"{name}.md").write_text(markdown(doc))
    print(markdown(doc))
    return doc


def markdown(doc: dict[str, Any]) -> str:
    g = doc["gpu"]
    flavours = sorted({f for r in doc["rows"] for f in r["artifacts"]})
    runtimes = ["torch"] + [f"tvm_{f}" for f in flavours]
    if any("ort_cuda" in r["latency_ms"] for r in doc["rows"]):
        runtimes.append("ort_cuda")
    lines = [
        "# gpu target",
        "",
        f"GPU: {g['device']} ({g.get('nvidia_smi', '')}); torch {g['torch']} (CUDA {g['cuda']}), "
        f"{doc['cpu_cores']} CPU cores, load average before/after {doc['loadavg_before']} / "
        f"{doc['loadavg_after']}. Artifacts built for {doc['arch']} on a host without a GPU "
        f"(torch {doc['built_with']['torch']}, TVM {doc['built_with']['tvm']}).",
        "Median ms per inference (p90 in the JSON), the runtimes timed in alternation, each "
        "call synchronised with the device; fp32 everywhere (TF32 off). `tvm_source` is the "
        "artifact `compile --target gpu` writes on a host without a driver; `tvm_cubin` the one "
        "whose kernels were compiled to a cubin at build time. A runtime whose output is off by "
        f"more than {doc['tolerance_rel']:g}·max|y| from torch's CPU output is not timed.",
        "",
        "| model | variant | batch | " + " | ".join(runtimes) + " | TVM/torch | artifacts |",
        "|---|---|---|" + "---|" * (len(runtimes) + 2),
    ]
    for r in doc["rows"]:
        lat = r["latency_ms"]
        cells = [f"{lat[k]['median']:.3f}" if k in lat else "–" for k in runtimes]
        tvm_best = min((lat[k]["median"] for k in lat if k.startswith("tvm_")), default=None)
        ratio = f"{tvm_best / lat['torch']['median']:.2f}" if tvm_best and "torch" in lat else "–"
        notes = "; ".join(
            f"{f}: " + (f"max rel {a['max_rel']:.1e}" if a.get("loaded") else f"did not load ({a['error']})")
            for f, a in r["artifacts"].items())
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | " + " | ".join(cells)
                     + f" | {ratio} | {notes} |")
    if doc.get("cli"):
        lines += ["", "`rwdeploy compile CKPT --arch A --target gpu` on pruned checkpoints, the shipped "
                  "files loaded by rwdeploy's `tvm_build.measure_local` on this GPU and checked "
                  "against torch's output of the pruned model (`slim` = model.gpu.so, with the layers "
                  "`--sparse auto` packed; `original` = original.gpu.so, dense):", "",
                  "| case | file | packed layers | max rel error | median ms (b1) |", "|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['file']} | {r['packed_layers']} | {r['max_rel']:.1e} | "
                  f"{r['median_ms']:.3f} |" for r in doc["cli"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step", required=True)
    b = sub.add_parser("build", help="build the gpu artifacts (any machine with TVM)")
    b.add_argument("work", type=Path)
    b.add_argument("--models", default="lenet5,resnet20,resnet56,vgg16_bn,mobilenet_v2")
    b.add_argument("--batches", default="1,8")
    b.add_argument("--arch", default="sm_90")
    b.add_argument("--flavours", default="source,cubin")
    b.add_argument("--onnx", action="store_true", help="also export ONNX (for ORT's CUDA provider)")
    b.add_argument("--timm", default="", help="also these timm architectures (cubin, batch 1)")
    c = sub.add_parser("cli", help="rwdeploy compile --target gpu on a zeroed ResNet-20")
    c.add_argument("work", type=Path)
    c.add_argument("--arch", default="sm_90")
    c.add_argument("--cases", default=",".join(CLI_CASES))
    m = sub.add_parser("measure", help="check and time them (the GPU machine)")
    m.add_argument("work", type=Path)
    m.add_argument("--out", type=Path, default=RESULTS)
    m.add_argument("--name", default="gpu")
    args = ap.parse_args(argv)
    if args.step == "build":
        t0 = time.perf_counter()
        if args.models:
            build(args.work, args.models.split(","), [int(v) for v in args.batches.split(",")],
                  args.arch, args.flavours.split(","), args.onnx)
        if args.timm:
            build_timm(args.work, args.timm.split(","), args.arch)
        print(f"built in {time.perf_counter() - t0:.0f} s -> {args.work}")
    elif args.step == "cli":
        cli_build(args.work, args.arch, args.cases.split(","))
    else:
        measure(args.work, args.out, args.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
