"""`--align auto` decided for the whole model, by measurement: several slim models, one chosen.

A layer's speed depends on its input AND output channel counts, so per-group choices
(`channel_alignment.plan_alignment`, each group timed on its own layers) miss interactions and
can end up slower than a uniform rounding, or than no rounding at all. Here the removal pass is
run once per candidate (it is cheap) and the candidates are timed as whole models:

- `off`: the smallest slim model (no channel kept back);
- `N=<lanes/2>` and `N=<lanes>`: every group rounded up to that multiple (deduplicated);
- `per-group`: the per-group plan (`align="auto"`, with the layer measurer when one is given).

The original (the dense model, masks applied) is timed with them as a reference. Candidates that
keep back exactly the same channels are the same model: timed once (`same_as`). The injected
`measurer({name: nn.Module}) -> {name: {"median_ms": ...}}` times them (`runtime.align_timing.
OrtModelTimer` calls them interleaved); the fastest median wins (a tie: the earlier candidate in
the order above), so the chosen model is never one the record measured as slower than another
candidate. The returned record is the chosen candidate's removal record, its `alignment` carrying
the per-group rows of the chosen plan and `whole_model`: every candidate's median, the original's,
the choice and why. This module decides; it never measures by itself and never prints.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import fx, nn

from rwdeploy.passes.channel_alignment import AlignmentRecord, Measurer
from rwdeploy.passes.channel_groups import ChannelAnalysis
from rwdeploy.passes.protocol import PassResult
from rwdeploy.passes.remove_zero_channels import RemovalRecord, apply_masks, remove_zero_channels

ORIGINAL = "original"
# {name: model} -> {name: {"median_ms": ...}}; may say where it measured (`.where`)
ModelMeasurer = Callable[[dict[str, nn.Module]], dict[str, dict[str, float]]]


def candidate_aligns(lanes: int) -> dict[str, str | int]:
    """Candidate name -> the `align` the removal pass runs with: off, N = lanes / 2 and lanes
    (deduplicated, each >= 2), then the per-group plan."""
    out: dict[str, str | int] = {"off": "off"}
    for n in (lanes // 2, lanes):
        if n >= 2:
            out[f"N={n}"] = n
    out["per-group"] = "auto"
    return out


def _kept_back(record: RemovalRecord) -> tuple[tuple[int, int], ...]:
    """What makes two candidates the same model: the channels kept back per group (the pass keeps
    a group's lowest removable indices, so equal counts are equal channels)."""
    al = record.alignment
    return tuple(sorted((g.id, g.kept_for_alignment) for g in al.groups if g.kept_for_alignment)) if al else ()


def choose_alignment(gm: fx.GraphModule, example_input: Any, *, measurer: ModelMeasurer, lanes: int,
                     analysis: ChannelAnalysis | None = None, masks: dict[str, torch.Tensor] | None = None,
                     layer_measurer: Measurer | None = None, batch: int | None = None) -> PassResult[RemovalRecord]:
    """The candidate slim model measured fastest, and its removal record (see the module doc).
    `layer_measurer` times the per-group plan's groups (else its cost model decides); `batch` is
    only recorded (the measurer knows the input it times on). A failed whole-model measurement
    keeps the per-group plan and says why in the record."""
    results: dict[str, PassResult[RemovalRecord]] = {}
    for name, align in candidate_aligns(lanes).items():
        results[name] = remove_zero_channels(gm, example_input, analysis=analysis, masks=masks, align=align,
                                             lanes=lanes, measurer=layer_measurer if align == "auto" else None)
    first: dict[tuple, str] = {}
    same_as = {}
    for name, result in results.items():
        key = _kept_back(result.record)
        same_as[name] = first.setdefault(key, name)
    original = copy.deepcopy(gm)
    if masks:
        apply_masks(original, masks)
    models: dict[str, nn.Module] = {ORIGINAL: original, **{n: results[n].gm for n in results if same_as[n] == n}}
    where = getattr(measurer, "where", None) or "caller-supplied measurer"
    try:
        raw = measurer(models)
        times = {n: {k: float(v) if k.endswith("_ms") else v for k, v in raw[n].items()} for n in models}
    except Exception as err:  # noqa: BLE001 - an optimisation never stops the compile: the per-group plan
        chosen = results["per-group"]
        why = f"whole-model measurement failed ({type(err).__name__}: {str(err).strip()[:120]}): kept the per-group plan"
        _attach(chosen.record, lanes, {"chosen": "per-group", "reason": why, "measured_on": None, "batch": batch,
                                       "original_ms": None, "candidates": []})
        return chosen
    original_ms = times[ORIGINAL]["median_ms"]
    rows = []
    for name, result in results.items():
        t = times[same_as[name]]
        rows.append({"name": name, "align": str(candidate_aligns(lanes)[name]),
                     "kept_for_alignment": sum(g.kept_for_alignment for g in result.record.alignment.groups)
                     if result.record.alignment else 0,
                     "params": result.record.params_after, **t, "speedup_vs_original": original_ms / t["median_ms"],
                     **({"same_as": same_as[name]} if same_as[name] != name else {})})
    order = {r["name"]: i for i, r in enumerate(rows)}
    chosen_row = min(rows, key=lambda r: (r["median_ms"], order[r["name"]]))
    ranked = sorted(rows, key=lambda r: (r["median_ms"], order[r["name"]]))
    reason = ("measured fastest: " + ", ".join(f"{r['name']} {r['median_ms']:.4g} ms" for r in ranked)
              + f"; original {original_ms:.4g} ms")
    if chosen_row["median_ms"] > original_ms:
        reason += " (every candidate measured slower than the original)"
    chosen = results[chosen_row["name"]]
    _attach(chosen.record, lanes, {"chosen": chosen_row["name"], "reason": reason, "measured_on": where,
                                   "batch": batch, "original_ms": original_ms, "candidates": rows})
    return chosen


def _attach(record: RemovalRecord, lanes: int, whole: dict[str, Any]) -> None:
    """The chosen candidate's record as `--align auto`'s: its per-group rows, and the whole-model choice."""
    if record.alignment is None:  # `off` chosen: no group keeps anything
        record.alignment = AlignmentRecord("auto", lanes, whole["measured_on"], [])
    al = record.alignment
    if al.measured_on is not None:  # the per-group plan's layer timings: say where, before the record says whole models
        whole["groups_measured_on"] = al.measured_on
    al.mode, al.whole_model = "auto", whole
    if whole["measured_on"] is not None:
        al.measured_on = whole["measured_on"]
