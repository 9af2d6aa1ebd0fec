"""`rwdeploy demo`: the main job on a built-in default."""
from __future__ import annotations

import click

from rwdeploy.demo import run_demo


@click.command("demo")
@click.option("--out", "out_dir", default="rwdeploy-demo", show_default=True, help="Folder for the demo's outputs.")
def command(out_dir: str) -> None:
    """Run rwdeploy end to end on a built-in example and show the result."""
    run_demo(out_dir)
