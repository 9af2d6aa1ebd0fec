"""The `rwdeploy` command line.

Each subcommand lives in its own module of this package and exposes a click command named
`command`; `SUBCOMMANDS` lists them. `main` turns a `RwdeployError` into one line on stderr
and a non-zero exit; `--debug` keeps the traceback.
"""
from __future__ import annotations

import importlib
import sys
import warnings

import click

from rwdeploy import __version__
from rwdeploy.errors import RwdeployError

# module name -> command name; one line per subcommand.
SUBCOMMANDS: dict[str, str] = {
    "demo": "demo",
    "inspect": "inspect",
    "prune": "prune",
    "device": "device",
    "zoo": "zoo",
    "compile": "compile",
    "targets": "targets",
}


class _LazyGroup(click.Group):
    """Imports a subcommand's module only when it runs, so `rwdeploy --help` stays fast."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS.values())

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        for module, command in SUBCOMMANDS.items():
            if command == name:
                return importlib.import_module(f"rwdeploy.cli.{module}").command
        return None


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rwdeploy")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """rwdeploy: reweighted pruning to a measured, deployable artifact."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args
    # torch's own deep copies of exported graphs warn about its internal pytree API; the
    # warning is for torch's developers and says nothing about the user's model.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    try:
        cli.main(args=args, prog_name="rwdeploy", standalone_mode=False)
    except RwdeployError as err:
        if debug:
            raise
        click.echo(f"rwdeploy: error: {err.one_line()}", err=True)
        return err.exit_code
    except click.exceptions.Abort:
        click.echo("rwdeploy: aborted", err=True)
        return 130
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
