"""`rwdeploy targets`: the build targets, what each needs installed and whether it is there."""
from __future__ import annotations

import json

import click

from rwdeploy.runtime.targets import TARGETS


@click.command("targets")
@click.option("--json", "as_json", is_flag=True, help="Print the registry as JSON.")
def command(as_json: bool) -> None:
    """List the build targets (--target NAME of `compile`) and their requirements."""
    if as_json:
        click.echo(json.dumps([t.to_dict() for t in TARGETS.values()], indent=2))
        return
    for t in TARGETS.values():
        ready = "ready" if t.check("build") else "cannot build here"
        runs = "runs here" if t.check("run") else "cannot run here"
        click.echo(f"{t.name:14s} {t.description}  [{ready}; {runs}]")
        click.echo(f"{'':14s} runs: {t.runs_on}; measure: {t.measure}")
        for r in t.requirements:
            mark = "ok" if r.present() else "MISSING"
            fix = "" if r.present() else f" -> {r.install}"
            click.echo(f"{'':14s}   {mark:7s} {r.needed_for:8s} {r.name}{fix}")
    click.echo(f"{'onnx':14s} no TVM build: the verified slim model as .pt2 and ONNX, checked and timed in ONNX Runtime")
