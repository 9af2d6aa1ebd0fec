"""`rwdeploy inspect MODEL`: per-layer params, MACs, sparsity and zero groups."""
from __future__ import annotations

import json

import click

from rwdeploy.cli.common import load_from_cli, model_options
from rwdeploy.inspection import inspect_model, render_table


@click.command("inspect")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead of a table.")
def command(model: str, arch: str | None, input_shape: str | None, trust_pickle: bool, as_json: bool) -> None:
    """Print a per-layer table: type, weight shape, params, MACs, zeros, all-zero filters/channels.

    MODEL is a .pt2 program, an rwdeploy checkpoint, a state_dict (with --arch), a pickled
    module (with --trust-pickle), or zoo:NAME for a zoo network with random weights.
    """
    loaded = load_from_cli(model, arch, input_shape, trust_pickle)
    report = inspect_model(loaded)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        render_table(report)
