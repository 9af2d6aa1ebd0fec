"""`rwdeploy compile MODEL --target cpu --out DIR`: slim, verify, export, measure, report."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
from rich.console import Group
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table as RichTable
from rich.text import Text

from rwdeploy.cli.common import load_from_cli, model_options
from rwdeploy.compile import TARGET_STAGES, CompileOptions, Stage, compile_model, pipeline
from rwdeploy.console import make_console
from rwdeploy.errors import OptionError, TargetStepError
from rwdeploy.passes.pack_sparse import MODES as SPARSE_MODES
from rwdeploy.report import REPORT_MD, Bullets, Table, summary


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
            return
        self.progress.advance(self.task)
        mark = "[green]✓[/green]" if state == "done" else "[red]✗[/red]"
        self.progress.console.print(f"{mark} {stage.title}{' FAILED' if state == 'failed' else ''} "
                                    f"[dim]({time.perf_counter() - self.started:.1f} s)[/dim]")


def summary_table(report: dict[str, Any], out: Path) -> Group:
    """The report's summary (`rwdeploy.report.summary`) on a terminal, titled by the output folder."""
    parts: list[Any] = []
    for b in summary(report):
        if isinstance(b, Table):
            table = RichTable(title=None if parts else f"rwdeploy compile -> {out}/", header_style="bold")
            for i, name in enumerate(b.header):
                table.add_column(name, justify="left" if i == 0 else "right")
            for row in b.rows:
                table.add_row(*(Text(cell) for cell in row))
            parts.append(table)
        else:  # the summary has no headings
            parts.extend(Text(line) for line in (b.items if isinstance(b, Bullets) else [b.text]))
    return Group(*parts)


@click.command("compile")
@model_options
@click.option("--target", default="cpu", show_default=True, metavar="NAME",
              help=f"Deployment target ({', '.join(sorted(TARGET_STAGES))}); onnx: no TVM build.")
@click.option("--out", "out", default=None, type=click.Path(path_type=Path),
              help="Output folder (default: <model stem>-rwdeploy/). Written only once the slim model is "
                   "verified (exit status 4: written, but a target step failed).")
@click.option("--tolerance", default=1e-4, show_default=True, type=float,
              help="Max relative error of every output check: slim vs original, ONNX Runtime, TVM and the "
                   "device vs torch.")
@click.option("--batch", "batch", default="1,8", show_default=True, help="Batch sizes to measure, e.g. 1,8.")
@click.option("--threads", default=1, show_default=True, type=int,
              help="ONNX Runtime intra-op threads and TVM threads (fixed).")
@click.option("--runs", default=50, show_default=True, type=int,
              help="Timed runs at least per measurement (more while --min-time has not passed).")
@click.option("--warmup", default=10, show_default=True, type=int, help="Untimed runs before timing.")
@click.option("--min-time", "min_time_s", default=0.5, show_default=True, type=float,
              help="Seconds of timed runs at least per measurement.")
@click.option("--no-measure", is_flag=True, help="Skip latency measurement.")
@click.option("--gpu-arch", "gpu_arch", default=None, metavar="sm_XY",
              help="CUDA architecture for --target gpu (default: the visible GPU's, else sm_90).")
@click.option("--tune", default=0, show_default=True, type=int, metavar="TRIALS",
              help="MetaSchedule trials for the TVM cpu/arm build (needs --tuning-db).")
@click.option("--tuning-db", "tuning_db", default=None, type=click.Path(path_type=Path),
              help="Folder of MetaSchedule records, reused across runs (applied when present).")
@click.option("--sparse", default="auto", show_default=True, type=click.Choice(SPARSE_MODES),
              help="Store sparse Conv/Linear layers as CSR/BSR: auto = per layer where measured faster.")
@click.option("--align", default="off", show_default=True, metavar="auto|off|N",
              help="Keep a few removable zero channels (exact) so that kept counts are multiples of N tensor "
                   "channels; auto: the fastest of off, N = the target's vector width and half of it, and a "
                   "per-group plan, timed as whole models (onnx/cpu; else the per-group cost model).")
@click.option("--align-batch", "align_batch", default=None, type=int, metavar="N",
              help="Batch size --align auto times its candidates at (default: the first --batch): the fastest "
                   "channel counts at batch 1 need not be the fastest at the batch you deploy at.")
@click.option("--rpc", default=None, metavar="HOST:PORT",
              help="arm targets: measure on this device's TVM RPC server (default: the emulated aarch64 device).")
@click.option("--tracker", default=None, metavar="HOST:PORT", help="arm targets: get the device from this TVM RPC tracker.")
@click.option("--key", default=None, help="Device key for --tracker.")
def command(model: str, arch: str | None, input_shape: str | None, trust_pickle: bool, out: Path | None,
            batch: str, no_measure: bool, **settings: Any) -> None:
    """Remove zero channels from MODEL, verify, export .pt2 + ONNX + TVM module, measure, report."""
    # every other option is the CompileOptions field of its name
    options = CompileOptions(out=out or default_out(model), batches=parse_batches(batch), measure=not no_measure,
                             **settings)
    options.validate()  # bad options fail before the (slow) model load
    if any(st.name == "arm_measure" for st in pipeline(options)) and not (options.rpc or options.tracker):
        click.echo(f"rwdeploy: no --rpc given: measuring --target {options.target} on the emulated aarch64 device "
                   "(qemu-user on this machine); its latency is emulated, not ARM latency, and comes with "
                   "aarch64 instructions per inference", err=True)
    loaded = load_from_cli(model, arch, input_shape, trust_pickle)
    err_console = make_console(stderr=True)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as progress:
        result = compile_model(loaded, options, progress=_StageProgress(progress))
    console = make_console()
    for part in summary_table(result.report, result.out).renderables:
        # text one line each, however long: a script (or a person) reads the summary line by line
        console.print(part, soft_wrap=isinstance(part, Text))
    console.print(f"Wrote {', '.join(sorted(p.name for p in result.out.iterdir()))}; "
                  f"details in {result.out / REPORT_MD}")
    failure = result.target_failure
    if failure is not None:
        if click.get_current_context().find_root().obj.get("debug") and failure.cause is not None:
            raise failure.cause
        raise TargetStepError(failure.one_line())
