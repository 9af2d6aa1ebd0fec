"""The report: schema, sections, per-layer rows joined correctly, markdown rendered from the JSON."""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from torch import nn

from rwdeploy.passes.layer_stats import layer_stats
from rwdeploy.report import (REPORT_JSON, REPORT_MD, SCHEMA, channels_section, layer_rows, make_report,
                             render_markdown, speedups, write_report)


def _chain(c1: int, c2: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.Conv2d(c1, c2, 1),
                         nn.Flatten(), nn.Linear(c2 * 4 * 4, 10)).eval()


def test_layer_rows_before_after_by_hand():
    x = torch.randn(1, 3, 4, 4)
    rows = layer_rows(layer_stats(_chain(8, 6), x), layer_stats(_chain(5, 6), x))
    assert [r["name"] for r in rows] == ["0", "2", "4"]
    first, second, fc = rows
    assert first["shape_before"] == [8, 3, 3, 3] and first["shape_after"] == [5, 3, 3, 3]
    assert first["params_before"] == 8 * 27 + 8 and first["params_after"] == 5 * 27 + 5
    assert first["macs_before"] == 8 * 16 * 27 and first["macs_after"] == 5 * 16 * 27
    assert second["shape_after"] == [6, 5, 1, 1] and second["macs_after"] == 6 * 16 * 5
    assert fc["params_before"] == fc["params_after"] == 96 * 10 + 10


def test_layer_missing_after_is_marked_removed():
    x = torch.randn(1, 3, 4, 4)
    before = layer_stats(_chain(8, 6), x)
    rows = layer_rows(before, [s for s in before if s.name != "2"])
    removed = [r for r in rows if r["name"] == "2"][0]
    assert removed["shape_after"] is None and removed["params_after"] == 0 and removed["macs_after"] == 0
    assert "| removed |" in render_markdown(make_report({"layers": rows}))


def test_speedups_pair_original_and_slim():
    rows = [
        {"runtime": "onnxruntime", "target": "cpu", "variant": v, "batch": b, "threads": 1,
         "median_ms": ms, "p90_ms": ms, "n": 5}
        for v, b, ms in [("original", 1, 2.0), ("slim", 1, 0.5), ("original", 8, 9.0), ("slim", 8, 3.0)]
    ]
    got = {r["batch"]: r["speedup"] for r in speedups(rows)}
    assert got == {1: 4.0, 8: 3.0}
    assert speedups(rows[:1]) == []  # no slim row: nothing to compare


def test_channels_section_lists_pinned_groups_with_reasons():
    slice_ = SimpleNamespace(tensor="conv.weight", dim=0, indices=[[0]], role="producer")
    groups = [SimpleNamespace(id=0, size=4, unit=1, slices=[slice_], pinned=[]),
              SimpleNamespace(id=1, size=2, unit=1, slices=[slice_], pinned=["torch.roll on the channel dim"])]
    record = SimpleNamespace(to_dict=lambda: {
        "removed_groups": [{"id": 0, "size": 4, "removed": 2, "why": ["zero producers"], "tensors": ["conv.weight"]}],
        "pinned_groups": [{"id": 1}],
        "layers": [{"name": "next", "folded": "bias"}, {"name": "other", "folded": None}],
        "params_before": 10, "params_after": 6})
    section = channels_section(SimpleNamespace(groups=groups), record)
    assert section["groups"] == 2
    assert section["pinned"] == [{"id": 1, "size": 2, "reasons": ["torch.roll on the channel dim"],
                                  "tensors": ["conv.weight"]}]
    assert [g["id"] for g in section["removed"]] == [0]
    assert section["params_before"] == 10 and "pinned_groups" not in section
    md = render_markdown(make_report({"channels": section}))
    assert "torch.roll on the channel dim" in md
    assert "group 0: 2 of 4 channels (zero producers); conv.weight" in md
    assert "- next: bias" in md and "other" not in md


def test_document_and_files(tmp_path):
    sections = {
        "environment": {"torch": "x"},
        "model": {"source": "zoo", "path": None, "arch": "lenet5", "input_shape": [1, 1, 28, 28],
                  "params": {"original": 100, "slim": 40}, "macs": {"original": 1000, "slim": 300}},
        "verification": {"probe_inputs": [[1, 1, 28, 28]], "tolerance_rel": 1e-4, "max_abs": 1e-7,
                         "max_rel": 2e-7, "passed": True, "first_diverging_node": None},
        "files": {"slim_onnx": {"path": "slim.onnx", "bytes": 400}, "original_onnx": {"path": "original.onnx", "bytes": 1000}},
        "custom": {"a": 1},
    }
    doc = make_report(sections)
    # Schema first, known sections in the documented order, unknown ones after, absent ones absent.
    assert list(doc) == ["schema", "model", "verification", "files", "environment", "custom"]
    assert doc["schema"] == SCHEMA == "rwdeploy.report/1"
    json_path, md_path = write_report(doc, tmp_path)
    assert json_path == tmp_path / REPORT_JSON and md_path == tmp_path / REPORT_MD
    assert json.loads(json_path.read_text()) == doc
    md = md_path.read_text()
    assert "| params | 100 | 40 | 40.0% |" in md
    assert "| MACs | 1,000 | 300 | 30.0% |" in md
    assert "| ONNX size | 1000 B | 400 B | 40.0% |" in md
    assert "max relative error 2e-07" in md and "passed" in md
    assert "## Latency" not in md  # no latency section in, none out
