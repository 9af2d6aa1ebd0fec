"""Rich consoles for the CLI: tables to stdout, progress and messages to stderr."""
from __future__ import annotations

from rich.console import Console


def make_console(*, stderr: bool = False) -> Console:
    # Off a terminal rich assumes 80 columns, which truncates tables in logs and CI output.
    probe = Console(stderr=stderr)
    return Console(stderr=stderr, width=None if probe.is_terminal else 120)
