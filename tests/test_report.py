"""The report: schema, sections, per-layer rows joined correctly, markdown rendered from the JSON."""
from __future__ import annotations

import json
from types import SimpleNamespace

import torch
from torch import nn

from rwdeploy.passes.layer_stats import layer_stats
from rwdeploy.report import (REPORT_JSON, REPORT_MD, SCHEMA, SECTION_VIEWS, channels_section, layer_rows,
                             fastest_runtimes, make_report, markdown, render_markdown, speedups, summary,
                             write_report)


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


def test_fastest_runtime_names_onnxruntime_where_tvm_is_slower():
    def row(runtime, variant, batch, ms, **extra):
        return {"runtime": runtime, "target": "cpu", "variant": variant, "batch": batch, "threads": 1,
                "median_ms": ms, "p90_ms": ms, "n": 5, **extra}

    rows = [row("onnxruntime", "original", 1, 2.0), row("onnxruntime", "slim", 1, 1.0), row("tvm", "slim", 1, 1.5),
            row("onnxruntime", "slim", 8, 6.0), row("tvm", "slim", 8, 4.0),
            row("tvm", "slim", 16, 1.0),  # one runtime at this batch: nothing to compare
            row("tvm", "slim", 1, 0.1, emulated=True)]  # emulated clocks never decide
    got = fastest_runtimes(rows)
    assert [(c["batch"], c["fastest"]) for c in got] == [(1, "onnxruntime"), (8, "tvm")]
    assert got[0]["slower_by"] == {"tvm": 1.5}
    assert abs(got[1]["slower_by"]["onnxruntime"] - 1.5) < 1e-12
    doc = make_report({"latency": rows, "runtime_choice": got})
    text = markdown(summary(doc))
    assert "at b=1 t=1: ONNX Runtime 1.000 ms; TVM 1.500 ms (1.50× slower): ship `slim.onnx` with ONNX Runtime" in text
    assert "at b=8 t=1: TVM 4.000 ms; ONNX Runtime 6.000 ms (1.50× slower): ship the TVM module for `cpu`" in text
    assert "## Fastest runtime" in render_markdown(doc)
    close = fastest_runtimes([row("onnxruntime", "slim", 1, 1.0), row("tvm", "slim", 1, 1.03)])
    assert "within 5% of each other (timed in separate stages)" in markdown(summary(make_report({"runtime_choice": close})))
    in_turns = fastest_runtimes([row("onnxruntime", "slim", 1, 1.0, with_other_runtime=True),
                                 row("tvm", "slim", 1, 1.03, with_other_runtime=True)])
    assert in_turns[0]["in_turns"] and not close[0]["in_turns"]
    assert "within 5% of each other (timed in turns)" in markdown(summary(make_report({"runtime_choice": in_turns})))


def test_summary_points_to_align_auto_where_slim_is_slower_on_onnxruntime():
    def row(runtime, variant, batch, ms, **extra):
        return {"runtime": runtime, "target": "cpu", "variant": variant, "batch": batch, "threads": 1,
                "median_ms": ms, "p90_ms": ms, "n": 5, **extra}

    slower = [row("onnxruntime", "original", 1, 2.0), row("onnxruntime", "slim", 1, 2.5),
              row("onnxruntime", "original", 8, 9.0), row("onnxruntime", "slim", 8, 3.0)]
    text = markdown(summary(make_report({"latency": slower})))
    assert "slower than the original on ONNX Runtime (0.80× at b=1)" in text and "`--align auto`" in text
    # faster everywhere, alignment already chosen, or slower only on TVM / an emulated device: no hint
    faster = slower[:1] + [row("onnxruntime", "slim", 1, 1.0)]
    others = faster + [row("tvm", "original", 1, 1.0), row("tvm", "slim", 1, 1.5),
                       row("onnxruntime", "original", 2, 1.0, emulated=True), row("onnxruntime", "slim", 2, 2.0, emulated=True)]
    for doc in ({"latency": faster}, {"latency": slower, "alignment": {"mode": "auto", "kept_for_alignment": 3}},
                {"latency": others}):
        assert "keeps a few zero channels" not in markdown(summary(make_report(doc)))


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


def _every_section() -> dict:
    """A document with every section the pipeline writes (values shaped as the stages write them)."""
    return make_report({
        "model": {"source": "zoo", "path": None, "arch": "lenet5", "input_shape": [1, 1, 28, 28], "masks": 0,
                  "params": {"original": 100, "slim": 40}, "macs": {"original": 1000, "slim": 300}},
        "target_failure": {"stage": "tvm_build", "title": "Build TVM module for cpu", "target": "cpu",
                           "error": "no converter for aten.foo.default", "node": "foo_1", "hint": "use --target onnx",
                           "summary": "target step 'tvm_build' failed at node 'foo_1'"},
        "compile": {"target": "cpu", "tolerance_rel": 1e-4, "batches": [1], "stage_seconds": {"trace": 0.5}},
        "trace": {"method": "symbolic_trace", "fallback_reason": None},
        "layers": [{"name": "conv1", "type": "Conv2d", "shape_before": [4, 1, 3, 3], "shape_after": [2, 1, 3, 3],
                    "params_before": 40, "params_after": 20, "macs_before": 400, "macs_after": 200}],
        "channels": {"groups": 1, "pinned": [], "removed": [], "layer_changes": []},
        "sparse": {"mode": "csr", "measured_on": None, "packed_layers": 1, "bytes_saved": 3000, "notes": ["a note"],
                   "max_rel_vs_slim": 1e-7,
                   "layers": [{"name": "fc1", "kind": "linear", "weight_shape": [50, 80], "sparsity": 0.9,
                               "chosen": "csr", "reason": "forced by mode 'csr'", "dense_bytes": 16000,
                               "packed_bytes": 13000}]},
        "verification": {"probe_inputs": [[1, 1, 28, 28]], "tolerance_rel": 1e-4, "max_abs": 1e-7, "max_rel": 2e-7,
                         "passed": True, "onnxruntime": {"slim": {"max_abs": 1e-7, "max_rel": 3e-7}}},
        "quantization": {"bits": 4, "per_channel": True, "onnx": {"storage": "int4", "opset": 21,
                                                                   "check": {"max_rel": 1e-6}}},
        "files": {"slim_onnx": {"path": "slim.onnx", "bytes": 400}},
        "latency": [{"runtime": "onnxruntime", "target": "cpu", "variant": v, "batch": 1, "threads": 1,
                     "median_ms": ms, "p90_ms": ms, "n": 5} for v, ms in (("original", 2.0), ("slim", 1.0))],
        "targets": {"cpu": {"target": {"tvm_target": {"kind": "llvm"}}, "notes": ["built here"],
                            "builds": [{"variant": "slim", "batch": 1, "path": "model.cpu.so", "build_s": 1.0,
                                        "size_bytes": 2048, "kernels": {"scheduled": 3}}]}},
        "environment": {"torch": "2.13.0"},
        "custom": {"answer": 42},
    })


def test_report_md_shows_every_section():
    doc = _every_section()
    md = render_markdown(doc)
    headings = {line for line in md.splitlines() if line.startswith("## ")}
    for key in doc:
        if key == "schema":
            continue
        title = "Summary" if key == "model" else SECTION_VIEWS.get(key, (key, None))[0]
        assert f"## {title}" in headings, key
    # what each section says, not just its heading
    assert "| fc1 | linear | 50×80 | 90.0% | csr | forced by mode 'csr' | 15.6 KiB | 12.7 KiB |" in md
    assert "- a note" in md and "- answer: 42" in md and "node: `foo_1`" in md
    assert "| trace | 0.50 |" in md and "- method: symbolic_trace" in md


def test_terminal_summary_and_report_md_are_one_view():
    """The summary the CLI prints is the opening part of report.md, block for block."""
    doc = _every_section()
    first = summary(doc)
    assert markdown(first) in render_markdown(doc)
    table = first[0]
    assert [row[0] for row in table.rows] == ["params", "MACs", "onnxruntime b=1 t=1 ms", "packed layers (csr)",
                                              "weight bytes (packed)", "max rel. error"]
    assert any("FAILED target step 'tvm_build'" in b.text for b in first if hasattr(b, "text"))
    assert ["cpu: built here"] in [b.items for b in first if hasattr(b, "items")]
