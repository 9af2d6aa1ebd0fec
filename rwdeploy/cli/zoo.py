"""`rwdeploy zoo`: the zoo networks with their input shapes and class counts."""
from __future__ import annotations

import click
from rich.table import Table

from rwdeploy import models
from rwdeploy.console import make_console


@click.command("zoo")
def command() -> None:
    """List the zoo networks (usable as --arch NAME or MODEL zoo:NAME)."""
    table = Table(title="rwdeploy model zoo")
    for col in ("name", "input shape", "classes", "description"):
        table.add_column(col)
    for name in models.list():
        e = models.entry(name)
        table.add_row(name, "x".join(map(str, e.input_shape)), str(e.num_classes), e.description)
    make_console().print(table)
