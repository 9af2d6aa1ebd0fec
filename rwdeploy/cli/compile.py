"""`rwdeploy compile MODEL --target cpu --out DIR`: slim, verify, export, measure, report."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from rwdeploy.cli.common import load_from_cli, model_options
from rwdeploy.compile import TARGET_STAGES, CompileOptions, Stage, compile_model, pipeline
from rwdeploy.console import make_console
from rwdeploy.errors import OptionError
from rwdeploy.report import REPORT_MD, speedups


def parse_batches(text: str) -> tuple[int, ...]:
    """'1,8' -> (1, 8)."""
    try:
        batches = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        batches = ()
    if not batches or any(b < 1 for b in batches):
        raise OptionError(f"--batch {text!r} is not a list of batch sizes", hint="e.g. --batch 1,8")
    return batches


def default_out(model: str) -> Path:
    """`path/to/net.pt` -> `net-rwdeploy/` in the current folder (`zoo:NAME` -> `NAME-rwdeploy/`)."""
    stem = model.split(":", 1)[1] if model.startswith("zoo:") else Path(model).stem
    return Path(f"{stem}-rwdeploy")


class _StageProgress:
    """Drives a rich progress display (on stderr) from the pipeline's stage events."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.task: Any = None
        self.started = 0.0

    def __call__(self, stage: Stage, index: int, total: int, state: str) -> None:
        if self.task is None:
            self.task = self.progress.add_task("compile", total=total)
        if state == "start":
            self.started = time.perf_counter()
            self.progress.update(self.task, description=f"[{index + 1}/{total}] {stage.title}")
        else:
            self.progress.advance(self.task)
            self.progress.console.print(f"[green]✓[/green] {stage.title} "
                                        f"[dim]({time.perf_counter() - self.started:.1f} s)[/dim]")


def summary_table(report: dict[str, Any], out: Path) -> Table:
    model, files = report.get("model", {}), report.get("files", {})
    table = Table(title=f"rwdeploy compile -> {out}/", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("original", justify="right")
    table.add_column("slim", justify="right")
    table.add_column("slim/original", justify="right")

    def ratio_row(label: str, before: float | None, after: float | None, fmt: str = "{:,}") -> None:
        if before is None or after is None:
            return
        table.add_row(label, fmt.format(before), fmt.format(after), f"{after / before:.1%}" if before else "-")

    ratio_row("params", model.get("params", {}).get("original"), model.get("params", {}).get("slim"))
    ratio_row("MACs", model.get("macs", {}).get("original"), model.get("macs", {}).get("slim"))
    if "original_onnx" in files and "slim_onnx" in files:
        ratio_row("ONNX bytes", files["original_onnx"]["bytes"], files["slim_onnx"]["bytes"])
    emulated = {(r["runtime"], r["target"]) for r in report.get("latency", []) if r.get("emulated")}
    for row in speedups(report.get("latency", [])):
        where = f" {row['target']} (emulated)" if (row["runtime"], row["target"]) in emulated else ""
        table.add_row(f"{row['runtime']}{where} b={row['batch']} t={row['threads']} ms",
                      f"{row['original_ms']:.3f}", f"{row['slim_ms']:.3f}",
                      f"{row['speedup']:.2f}× faster")
    for name, section in report.get("targets", {}).items():
        insns = section.get("instructions", {}).get("per_variant", {})
        if "original" in insns and "slim" in insns:
            ratio_row(f"{name} insns/inference", insns["original"]["insns_per_inference"],
                      insns["slim"]["insns_per_inference"])
    sparse = report.get("sparse")
    if sparse:
        packed = [l for l in sparse["layers"] if l["chosen"] != "dense"]
        kinds = ", ".join(sorted({l["chosen"] for l in packed})) or "none faster"
        dense_b = sum(l["dense_bytes"] for l in sparse["layers"])
        table.add_row(f"packed layers ({kinds})", "", f"{len(packed)}/{len(sparse['layers'])}",
                      f"--sparse {sparse['mode']}")
        if dense_b:
            table.add_row("weight bytes (packed)", f"{dense_b:,}", f"{dense_b - sparse['bytes_saved']:,}",
                          f"{(dense_b - sparse['bytes_saved']) / dense_b:.1%}")
    ver = report.get("verification", {})
    if ver:
        table.add_row("max rel. error", "", f"{ver['max_rel']:.2e}", f"tol {ver['tolerance_rel']:g}")
    return table


@click.command("compile")
@model_options
@click.option("--target", default="cpu", show_default=True, metavar="NAME",
              help=f"Deployment target ({', '.join(sorted(TARGET_STAGES))}).")
@click.option("--out", "out", default=None, type=click.Path(path_type=Path),
              help="Output folder (default: <model stem>-rwdeploy/). Written only on success.")
@click.option("--tolerance", default=1e-4, show_default=True, type=float,
              help="Max relative error of the slim model vs the original (and ONNX Runtime vs torch).")
@click.option("--batch", "batch", default="1,8", show_default=True, help="Batch sizes to measure, e.g. 1,8.")
@click.option("--threads", default=1, show_default=True, type=int,
              help="ONNX Runtime intra-op threads and TVM threads (fixed).")
@click.option("--runs", default=50, show_default=True, type=int,
              help="Timed runs at least per measurement (more while --min-time has not passed).")
@click.option("--warmup", default=10, show_default=True, type=int, help="Untimed runs before timing.")
@click.option("--min-time", "min_time", default=0.5, show_default=True, type=float,
              help="Seconds of timed runs at least per measurement.")
@click.option("--no-measure", is_flag=True, help="Skip latency measurement.")
@click.option("--gpu-arch", "gpu_arch", default=None, metavar="sm_XY",
              help="CUDA architecture for --target gpu (default: the visible GPU's, else sm_90).")
@click.option("--tune", default=0, show_default=True, type=int, metavar="TRIALS",
              help="MetaSchedule trials for the TVM cpu/arm build (needs --tuning-db).")
@click.option("--tuning-db", "tuning_db", default=None, type=click.Path(path_type=Path),
              help="Folder of MetaSchedule records, reused across runs (applied when present).")
@click.option("--sparse", default="auto", show_default=True, type=click.Choice(["auto", "off", "csr", "bsr"]),
              help="Store sparse Conv/Linear layers as CSR/BSR: auto = per layer where measured faster.")
@click.option("--rpc", default=None, metavar="HOST:PORT",
              help="arm targets: measure on this device's TVM RPC server (default: the emulated aarch64 device).")
@click.option("--tracker", default=None, metavar="HOST:PORT", help="arm targets: get the device from this TVM RPC tracker.")
@click.option("--key", default=None, help="Device key for --tracker.")
def command(model: str, arch: str | None, input_shape: str | None, trust_pickle: bool, target: str,
            out: Path | None, tolerance: float, batch: str, threads: int, runs: int, warmup: int,
            min_time: float, no_measure: bool, gpu_arch: str | None, tune: int,
            tuning_db: Path | None, sparse: str, rpc: str | None, tracker: str | None, key: str | None) -> None:
    """Remove zero channels from MODEL, verify, export .pt2 + ONNX + TVM module, measure, report."""
    options = CompileOptions(out=out or default_out(model), target=target, tolerance=tolerance,
                             batches=parse_batches(batch), threads=threads, runs=runs, warmup=warmup,
                             min_time_s=min_time, measure=not no_measure, gpu_arch=gpu_arch,
                             tune=tune, tuning_db=tuning_db, sparse=sparse, rpc=rpc, tracker=tracker, key=key)
    options.validate()  # bad options fail before the (slow) model load
    if any(st.name == "arm_measure" for st in pipeline(options)) and not (rpc or tracker):
        click.echo(f"rwdeploy: no --rpc given: measuring --target {target} on the emulated aarch64 device "
                   "(qemu-user on this machine); its latency is emulated, not ARM latency, and comes with "
                   "aarch64 instructions per inference", err=True)
    loaded = load_from_cli(model, arch, input_shape, trust_pickle)
    err_console = make_console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        result = compile_model(loaded, options, progress=_StageProgress(progress))
    console = make_console()
    console.print(summary_table(result.report, result.out))
    for name, section in result.report.get("targets", {}).items():
        for note in section.get("notes", []):
            console.print(f"{name}: {note}")
    console.print(f"Wrote {', '.join(sorted(p.name for p in result.out.iterdir()))}; "
                  f"details in {result.out / REPORT_MD}")
