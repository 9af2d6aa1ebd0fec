"""Medians of speed-up ÷ MAC reduction over repeated runs of `benchmarks/structured.py`.

One run of structured.py times every model once: on this shared host one cell (a model's
speed-up ÷ MAC reduction at one rate, batch and runtime) moves by 0.1-0.15 between runs of the
same code, and the median over the zoo by up to 0.13 (`docs/PERFORMANCE_LOG.md`, runs V and W).
This reads several runs' result files, takes each cell's median over the runs, and reports the
median over the zoo of those beside each run's own median over the zoo, with the runs' spread.

Runs of different code do not measure the same thing: each run names its rwdeploy commit
(`environment.rwdeploy_commit`, recorded since b999cc8); runs whose commits differ or were not
recorded are refused unless `--allow-mixed-code`, and the table lists every run's commit.

    python benchmarks/structured_runs.py structured_tvm_xeon_w structured_tvm_xeon_x70 \\
        --allow-mixed-code --name structured_runs_70

Writes NAME.json and NAME.md under benchmarks/results (or --out); prints the table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from structured import RESULTS, write_results  # noqa: E402  (its result files, written the same way)

RUNTIMES = {"ORT": None, "TVM": "tvm"}
UNRECORDED = "unrecorded"


class RunsError(ValueError):
    """Result files that cannot be summarised together."""


def load_run(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunsError(f"{path}: no such result file (give a name under benchmarks/results or a path)") from None
    except json.JSONDecodeError as err:
        raise RunsError(f"{path}: not a JSON result file ({err})") from None
    if doc.get("benchmark") != "structured" or "rows" not in doc:
        raise RunsError(f"{path}: not a benchmarks/structured.py result (no 'benchmark': 'structured' and rows)")
    return doc


def commit(doc: dict[str, Any]) -> str:
    return doc.get("environment", {}).get("rwdeploy_commit") or UNRECORDED


def cells(doc: dict[str, Any]) -> dict[tuple[str, float, int, str], tuple[float, float | None]]:
    """(model, rate, batch, runtime) -> (speed-up ÷ MAC reduction, ÷ the pruning's own) of one run."""
    out = {}
    for row in doc["rows"]:
        for batch, lat in row.get("latency", {}).items():
            for runtime, key in RUNTIMES.items():
                entry = lat if key is None else lat.get(key)
                if entry and "speedup_per_mac_reduction" in entry:
                    out[(row["model"], float(row["rate"]), int(batch), runtime)] = (
                        entry["speedup_per_mac_reduction"], entry.get("speedup_per_pruned_mac_reduction"))
    return out


def summarize(runs: dict[str, dict[str, Any]], allow_mixed_code: bool = False) -> dict[str, Any]:
    """Per cell the median over the runs that have it; per (rate, batch, runtime) each run's
    median over the zoo and the median over the zoo of the cells' medians."""
    commits = {name: commit(doc) for name, doc in runs.items()}
    if not allow_mixed_code and (len(set(commits.values())) > 1 or UNRECORDED in commits.values()):
        listed = ", ".join(f"{n} {c}" for n, c in commits.items())
        raise RunsError(f"the runs' code differs or was not recorded ({listed}): pass --allow-mixed-code "
                        "to summarise them anyway")
    per_run = {name: cells(doc) for name, doc in runs.items()}
    keys = sorted({k for c in per_run.values() for k in c})
    cell_rows = []
    for key in keys:
        values = [c[key][0] for c in per_run.values() if key in c]
        pruned = [c[key][1] for c in per_run.values() if key in c and c[key][1] is not None]
        cell_rows.append({"model": key[0], "rate": key[1], "batch": key[2], "runtime": key[3],
                          "runs": len(values), "median": statistics.median(values),
                          "min": min(values), "max": max(values),
                          "pruned_median": statistics.median(pruned) if pruned else None})
    groups = sorted({(k[1], k[2], k[3]) for k in keys}, key=lambda g: (g[2], g[1], g[0]))
    medians = []
    for rate, batch, runtime in groups:
        of_runs = {name: statistics.median(v[0] for k, v in c.items() if k[1:] == (rate, batch, runtime))
                   for name, c in per_run.items() if any(k[1:] == (rate, batch, runtime) for k in c)}
        mine = [r for r in cell_rows if (r["rate"], r["batch"], r["runtime"]) == (rate, batch, runtime)]
        medians.append({"rate": rate, "batch": batch, "runtime": runtime, "models": len(mine),
                        "per_run": of_runs, "of_cell_medians": statistics.median(r["median"] for r in mine)})
    return {"runs": {name: {"commit": commits[name], "loadavg_before": doc.get("loadavg_before"),
                            "loadavg_after": doc.get("loadavg_after")} for name, doc in runs.items()},
            "cells": cell_rows, "medians": medians}


def markdown(summary: dict[str, Any], target: float) -> str:
    names = list(summary["runs"])
    lines = ["# Speed-up ÷ MAC reduction over repeated structured.py runs", "",
             "Runs: " + "; ".join(f"`{n}` (code {r['commit']}, load before {_load(r['loadavg_before'])})"
                                  for n, r in summary["runs"].items()) + ".", "",
             "## Median over the zoo", "",
             "| runtime | batch | rate | " + " | ".join(names) + f" | of the cells' medians | >= {target} |",
             "|---|---|---|" + "---|" * len(names) + "---|---|"]
    for m in summary["medians"]:
        runs = [f"{m['per_run'][n]:.2f}" if n in m["per_run"] else "-" for n in names]
        lines.append(f"| {m['runtime']} | {m['batch']} | {m['rate']:.0%} | " + " | ".join(runs)
                     + f" | **{m['of_cell_medians']:.3f}** ({m['models']} models) | "
                     + ("yes" if m["of_cell_medians"] >= target else "no") + " |")
    lines += ["", "## Cells: median over the runs (min-max)", "",
              "| model | rate | batch | runtime | runs | median (min-max) | ÷ pruning's own MACs |",
              "|---|---|---|---|---|---|---|"]
    for c in summary["cells"]:
        pruned = f"{c['pruned_median']:.2f}" if c["pruned_median"] is not None else "-"
        lines.append(f"| {c['model']} | {c['rate']:.0%} | {c['batch']} | {c['runtime']} | {c['runs']} | "
                     f"{c['median']:.2f} ({c['min']:.2f}-{c['max']:.2f}) | {pruned} |")
    return "\n".join(lines) + "\n"


def _load(load: list[float] | None) -> str:
    return ", ".join(f"{x:.2f}" for x in load) if load else "not recorded"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="result names under benchmarks/results (NAME.json) or JSON paths")
    p.add_argument("--allow-mixed-code", action="store_true",
                   help="summarise runs whose rwdeploy commits differ or were not recorded")
    p.add_argument("--target", type=float, default=0.8, help="the median the issue asks for (default 0.8)")
    p.add_argument("--name", default="structured_runs", help="stem of the result files (NAME.json, NAME.md)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    try:
        paths = [Path(r) if r.endswith(".json") else RESULTS / f"{r}.json" for r in args.runs]
        summary = summarize({path.stem: load_run(path) for path in paths}, args.allow_mixed_code)
    except RunsError as err:
        print(f"structured_runs: {err}", file=sys.stderr)
        return 2
    table = markdown(summary, args.target)
    write_results(args.out, args.name, {"benchmark": "structured_runs", "target": args.target, **summary}, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
