"""What `rwdeploy inspect` computes and shows: per-layer statistics of a loaded model."""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from rwdeploy.console import make_console
from rwdeploy.io import LoadedModel
from rwdeploy.passes.layer_stats import layer_stats, totals


def inspect_model(loaded: LoadedModel) -> dict[str, Any]:
    """JSON-ready per-layer statistics and totals at the model's input shape."""
    x = loaded.check_input()
    stats = layer_stats(loaded.module, x)
    tot = totals(loaded.module, stats)
    return {
        "model": str(loaded.path) if loaded.path else f"zoo:{loaded.arch}",
        "source": loaded.source,
        "arch": loaded.arch,
        "input_shape": list(loaded.input_shape),
        "masks": len(loaded.masks),
        "layers": [s.to_dict() for s in stats],
        "totals": tot.to_dict(),
    }


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def render_table(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or make_console()
    title = f"{report['model']}  ({report['source']}, input {'x'.join(map(str, report['input_shape']))})"
    table = Table(title=title, show_lines=False)
    for col, justify in (("layer", "left"), ("type", "left"), ("weight shape", "left"), ("params", "right"),
                         ("MACs", "right"), ("zeros", "right"), ("zero filters", "right"),
                         ("zero in-ch", "right")):
        table.add_column(col, justify=justify)
    for row in report["layers"]:
        table.add_row(
            row["name"], row["type"], "x".join(map(str, row["weight_shape"])), _human(row["params"]),
            _human(row["macs"]), f"{100 * row['zero_fraction']:.1f}%",
            f"{row['zero_filters']}/{row['out_channels']}", f"{row['zero_in_channels']}/{row['in_channels']}",
        )
    t = report["totals"]
    table.add_section()
    table.add_row("total", f"{t['layers']} layers", "", _human(t["params"]), _human(t["macs"]),
                  f"{100 * t['zero_fraction']:.1f}%", "", "")
    console.print(table)
