"""Zoo models, original vs 50% filter-pruned slim, per target.

    python benchmarks/targets.py        # lenet5, resnet20, resnet56, vgg16_bn, mobilenet_v2; batch 1
    python benchmarks/targets.py --models resnet20 --batches 1,8 --threads 1
    python benchmarks/targets.py --models "" --timm efficientnet_b0,resnet50 --targets cpu

cpu: ONNX Runtime (CPU provider) and TVM (`model.cpu.so`, scheduled kernels) latency,
median/p90/n, same thread count, timed in alternating rounds (same load), outputs
checked against torch; TVM/ORT ratio.
arm and gpu: build time and artifact size of `model.arm.so` / `model.gpu.so` (no device
here; the gpu row says the latency step was skipped without a GPU, or measures when one is
present). Results: benchmarks/results/targets.json and targets.md, with os.getloadavg() -
numbers from a shared, loaded machine are noisy.

"slim" here is the zoo architecture with half the filters in every prunable layer (CIFAR
ResNets at width 8, VGG with halved widths, LeNet-5 10-25-250, MobileNetV2 width 0.5): the
shape a 50% filter-pruned model has after `remove_zero_channels` (which is how `compile`
produces it). Random weights: latency does not depend on the values. ResNet-18/50 have no
width option in the zoo and are left out.

Extension point for the arm device: append a function to `ARM_HOOKS`; it is called with
(model name, variant, path of model.arm.so, torch module, example input) and returns fields
merged into that arm row. With `arm` in --targets, `benchmarks/arm_device.py` is that hook:
latency on the device (--rpc HOST:PORT, else the emulated aarch64 device, labelled emulated)
and aarch64 instructions per inference from qemu's plugin. Arm-only run, kept beside the cpu
results: `python benchmarks/targets.py --targets arm --name targets_arm`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

ArmHook = Callable[[str, str, Path, nn.Module, torch.Tensor], dict[str, Any]]
ARM_HOOKS: list[ArmHook] = []  # see the module docstring


def slim_model(name: str) -> nn.Module:
    """The zoo network with half the filters of every prunable layer."""
    import rwdeploy.models as zoo
    from rwdeploy.models.cifar import _VGG16, VGG, CifarResNet
    from rwdeploy.models.lenet import LeNet5

    if name.startswith("resnet") and zoo.input_shape(name)[-1] == 32:
        return CifarResNet(int(name[len("resnet"):]), width=8).eval()
    if name == "vgg16_bn":
        return VGG(tuple(v if v == "M" else v // 2 for v in _VGG16)).eval()
    if name == "lenet5":
        m = LeNet5()
        m.conv1, m.conv2 = nn.Conv2d(1, 10, 5), nn.Conv2d(10, 25, 5)
        m.fc1, m.fc2 = nn.Linear(25 * 4 * 4, 250), nn.Linear(250, 10)
        return m.eval()
    if name == "mobilenet_v2":
        return zoo.create(name, width_mult=0.5)
    raise SystemExit(f"no slim variant defined for {name!r} in this benchmark")


def _row_latency(stats: Any) -> dict[str, Any]:
    return {"median_ms": round(stats.median_ms, 4), "p90_ms": round(stats.p90_ms, 4), "n": stats.n}


class Timing:
    """Wall-clock and thread-CPU latency of one runtime, pooled over the rounds."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def stats(self, warmup: int) -> Any:
        from rwdeploy.runtime.latency import LatencyStats

        return LatencyStats.from_samples(self.wall, warmup), LatencyStats.from_samples(self.cpu, warmup)


def interleaved(runs: list[Callable[[], Any]], rounds: int, warmup: int = 5,
                min_runs: int = 10, min_time_s: float = 0.3) -> list[Timing]:
    """Time each callable in alternating rounds (samples pooled per callable).

    On a shared machine the load changes from second to second: alternating the runtimes
    exposes them to the same load. Besides wall time, the calling thread's CPU time per call
    is kept: with one thread both runtimes compute on the calling thread, and CPU time does
    not count the time the scheduler gave to other processes.
    """
    timings = [Timing() for _ in runs]
    for _ in range(rounds):
        for run, out in zip(runs, timings):
            for _ in range(warmup):
                run()
            start, n = time.perf_counter(), 0
            while n < min_runs or time.perf_counter() - start < min_time_s:
                c0, t0 = time.thread_time(), time.perf_counter()
                run()
                out.wall.append(time.perf_counter() - t0)
                out.cpu.append(time.thread_time() - c0)
                n += 1
    return timings


def timm_model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A timm architecture with random weights (no download) and its default input shape."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "conformance"))
    from torchvision_shim import import_timm

    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    return model, (1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))


def bench_model(name: str, batches: list[int], threads: int, work: Path,
                targets: list[str], rounds: int = 5,
                real: tuple[nn.Module, tuple[int, ...]] | None = None) -> list[dict[str, Any]]:
    """`real`: a (timm) model and its input shape, timed as it is (variant "original");
    else the zoo architecture `name` and its slim variant."""
    import tvm

    import rwdeploy.models as zoo
    from rwdeploy.runtime import tvm_build
    from rwdeploy.runtime.onnx_export import export_onnx
    from rwdeploy.runtime.ort_runner import OrtRunner

    rows: list[dict[str, Any]] = []
    torch.manual_seed(0)
    variants = {"original": real[0]} if real else {"original": zoo.create(name), "slim": slim_model(name)}
    input_shape = real[1] if real else zoo.input_shape(name)
    for variant, module in variants.items():
        params = sum(p.numel() for p in module.parameters())
        for batch in batches:
            shape = (batch, *input_shape[1:])
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                ref = module(x).numpy()
            base = {"model": name, "variant": variant, "batch": batch, "params": params}
            if "cpu" in targets:
                onnx_path = work / f"{name}.{variant}.b{batch}.onnx"
                export_onnx(module, x, onnx_path)
                ort = OrtRunner(onnx_path, threads=threads)
                ort_err = float(np.abs(ort.run(x.numpy()) - ref).max())
                art = tvm_build.build(module, x, "cpu", out_dir=work / f"{name}.{variant}.b{batch}",
                                      threads=threads)
                tvm_err = float(np.abs(tvm_build.run_local(art, x) - ref).max())
                scale = float(np.abs(ref).max()) or 1.0
                if max(tvm_err, ort_err) > 1e-3 * scale:  # never report the speed of a wrong output
                    raise SystemExit(f"{name} {variant}: outputs differ from torch "
                                     f"(TVM {tvm_err:.3g}, ORT {ort_err:.3g})")
                tvm_main = tvm_build.load_local(art)
                tvm_x = tvm.runtime.tensor(x.numpy())
                feed = x.numpy()
                ort_t, tvm_t = interleaved([lambda: ort.run(feed), lambda: tvm_main(tvm_x)], rounds)
                (ort_stats, ort_cpu), (tvm_stats, tvm_cpu) = ort_t.stats(5), tvm_t.stats(5)
                rows.append({**base, "target": "cpu", "threads": threads,
                             "ort": _row_latency(ort_stats), "ort_max_err": ort_err,
                             "tvm": _row_latency(tvm_stats), "tvm_max_err": tvm_err,
                             "ort_cpu_ms": round(ort_cpu.median_ms, 4),
                             "tvm_cpu_ms": round(tvm_cpu.median_ms, 4),
                             "tvm_over_ort": round(tvm_stats.median_ms / ort_stats.median_ms, 3),
                             "tvm_over_ort_cpu": round(tvm_cpu.median_ms / ort_cpu.median_ms, 3),
                             "build_s": round(art.build_s, 2), "size_bytes": art.size_bytes,
                             "kernels": art.to_dict()["kernels"]})
                print(f"{name:10s} {variant:8s} b{batch} cpu  wall ORT {ort_stats.median_ms:8.3f} "
                      f"TVM {tvm_stats.median_ms:8.3f} ms ({tvm_stats.median_ms / ort_stats.median_ms:4.2f}x)"
                      f"  cpu-time ORT {ort_cpu.median_ms:8.3f} TVM {tvm_cpu.median_ms:8.3f} ms "
                      f"({tvm_cpu.median_ms / ort_cpu.median_ms:4.2f}x)", flush=True)
            if batch != batches[0]:
                continue  # arm/gpu rows: build figures, once per variant
            for target in (t for t in targets if t != "cpu"):
                art = tvm_build.build(module, x, target,
                                      out_dir=work / f"{name}.{variant}.{target}")
                row = {**base, "target": target, "build_s": round(art.build_s, 2),
                       "export_s": round(art.export_s, 2), "size_bytes": art.size_bytes,
                       "device_modules": art.device_modules, "notes": list(art.target.notes)}
                if target == "gpu":
                    if art.target.check("run"):
                        stats, err = tvm_build.measure_local(art, x, ref)
                        row.update(tvm=_row_latency(stats), tvm_max_err=err)
                    else:
                        row["latency"] = "skipped: no CUDA GPU on this machine"
                if art.target.family == "arm":
                    for hook in ARM_HOOKS:
                        row.update(hook(name, variant, art.path, module, x))
                rows.append(row)
                print(f"{name:10s} {variant:8s} b{batch} {target:4s} build {art.build_s:6.1f} s  "
                      f"{art.size_bytes / 1e6:6.2f} MB", flush=True)
    return rows


def markdown(doc: dict[str, Any]) -> str:
    env = doc["environment"]
    lines = [
        "# Targets benchmark",
        "",
        f"Machine: {env['cpu']} ({env['logical_cores']} cores), load average before/after "
        f"{doc['loadavg_before']} / {doc['loadavg_after']} (shared machine: noisy).",
        f"TVM target `{doc['cpu_target']}`, {doc['threads']} thread(s) for TVM and ORT. "
        "slim = half the filters per prunable layer (the shape of a 50% filter-pruned model). "
        f"ORT and TVM timed in {doc['rounds']} alternating rounds (same load).",
        "",
        "## cpu latency",
        "",
        "Wall: median ms (p90, n). CPU: median thread CPU time per inference, which leaves out",
        "the time the scheduler gave to other processes; the 1.5x verdict uses it.",
        "",
        "| model | variant | batch | ORT wall | TVM wall | ORT CPU | TVM CPU | TVM/ORT wall "
        "| TVM/ORT CPU | within 1.5x |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        if r["target"] != "cpu":
            continue
        o, t = r["ort"], r["tvm"]
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['batch']} "
            f"| {o['median_ms']:.3f} ({o['p90_ms']:.3f}, {o['n']}) "
            f"| {t['median_ms']:.3f} ({t['p90_ms']:.3f}, {t['n']}) "
            f"| {r['ort_cpu_ms']:.3f} | {r['tvm_cpu_ms']:.3f} | {r['tvm_over_ort']:.2f} "
            f"| {r['tvm_over_ort_cpu']:.2f} | {'yes' if r['tvm_over_ort_cpu'] <= 1.5 else 'no'} |")
    lines += ["", "## builds (arm, gpu)", "", "| model | variant | target | build s | size MB | notes |",
              "|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        if r["target"] == "cpu":
            continue
        note = "; ".join(r.get("notes", []) + ([r["latency"]] if "latency" in r else []))
        lines.append(f"| {r['model']} | {r['variant']} | {r['target']} | {r['build_s']:.1f} | "
                     f"{r['size_bytes'] / 1e6:.2f} | {note} |")
    if any("arm_latency" in r for r in doc["rows"]):
        from arm_device import arm_markdown

        lines += arm_markdown(doc["rows"])
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="lenet5,resnet20,resnet56,vgg16_bn,mobilenet_v2")
    ap.add_argument("--timm", default="", help="comma list of timm architectures (random weights, default "
                    "input size), timed as they are: the dense model on each runtime (needs the test extra)")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--targets", default="cpu,arm,gpu")
    ap.add_argument("--rounds", type=int, default=5,
                    help="alternating ORT/TVM timing rounds per model (samples pooled)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="targets", help="stem of the result files (NAME.json, NAME.md)")
    ap.add_argument("--rpc", default=None, metavar="HOST:PORT",
                    help="arm: measure on this device's TVM RPC server instead of the emulated one")
    args = ap.parse_args(argv)
    if "arm" in args.targets.split(","):
        import arm_device  # benchmarks/arm_device.py: emulated/RPC latency + instruction counts

        arm_device.RPC = args.rpc
        ARM_HOOKS.append(arm_device.arm_row)
    from rwdeploy.runtime.environment import environment
    from rwdeploy.runtime.targets import get_target
    from rwdeploy.runtime.tvm_build import set_threads

    set_threads(args.threads)
    torch.set_num_threads(args.threads)
    load_before = [round(v, 2) for v in os.getloadavg()]
    t0 = time.time()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        batches = [int(b) for b in args.batches.split(",")]
        for name in [m for m in args.models.split(",") if m]:
            rows += bench_model(name, batches, args.threads, Path(tmp), args.targets.split(","), args.rounds)
        for name in [m for m in args.timm.split(",") if m]:
            rows += bench_model(name, batches, args.threads, Path(tmp), args.targets.split(","), args.rounds,
                                real=timm_model(name))
    doc = {"benchmark": "targets", "rows": rows, "threads": args.threads, "rounds": args.rounds,
           "cpu_target": get_target("cpu", threads=args.threads).tvm_target,
           "loadavg_before": load_before, "loadavg_after": [round(v, 2) for v in os.getloadavg()],
           "seconds": round(time.time() - t0, 1), "environment": environment(),
           "command": "python benchmarks/targets.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
