"""benchmarks/structured_runs.py on hand-made runs: each cell's median over the runs, each run's
median over the zoo, the median over the zoo of the cells' medians, and the refusal to mix runs
of different (or unrecorded) code unless asked."""
from __future__ import annotations

import json

import pytest
from conftest import benchmark_module


@pytest.fixture(scope="module")
def runs_mod():
    with benchmark_module("structured_runs") as mod:
        yield mod


def _run(commit, ratios, load=(0.5, 0.5, 0.5)):
    """A structured.py result: `ratios` maps model -> (ORT ratio, TVM ratio) at 70 %, batch 1."""
    rows = [{"model": model, "rate": 0.7,
             "latency": {"1": {"speedup_per_mac_reduction": ort, "speedup_per_pruned_mac_reduction": ort / 2,
                               "tvm": {"speedup_per_mac_reduction": tvm}}}}
            for model, (ort, tvm) in ratios.items()]
    return {"benchmark": "structured", "environment": {"rwdeploy_commit": commit},
            "loadavg_before": list(load), "loadavg_after": list(load), "rows": rows}


def test_cell_and_zoo_medians(runs_mod):
    runs = {"a": _run("abc", {"m1": (0.5, 0.6), "m2": (0.9, 0.7), "m3": (1.1, 0.9)}),
            "b": _run("abc", {"m1": (0.7, 0.8), "m2": (0.7, 0.9), "m3": (0.8, 0.7)}),
            "c": _run("abc", {"m1": (0.6, 1.0), "m2": (1.0, 0.8)})}   # m3 missing from this run
    s = runs_mod.summarize(runs)
    cell = {(c["model"], c["runtime"]): c for c in s["cells"]}
    assert cell[("m1", "TVM")]["median"] == pytest.approx(0.8)           # 0.6, 0.8, 1.0
    assert (cell[("m1", "TVM")]["min"], cell[("m1", "TVM")]["max"]) == (0.6, 1.0)
    assert cell[("m3", "ORT")]["runs"] == 2
    assert cell[("m3", "ORT")]["median"] == pytest.approx(0.95)          # 1.1, 0.8
    assert cell[("m2", "ORT")]["pruned_median"] == pytest.approx(0.45)   # 0.9/2, 0.7/2, 1.0/2
    tvm = next(m for m in s["medians"] if m["runtime"] == "TVM")
    assert tvm["per_run"] == {"a": pytest.approx(0.7), "b": pytest.approx(0.8), "c": pytest.approx(0.9)}
    # cells' medians 0.8 (m1), 0.8 (m2), 0.8 (m3: 0.9, 0.7) -> 0.8
    assert tvm["of_cell_medians"] == pytest.approx(0.8)
    ort = next(m for m in s["medians"] if m["runtime"] == "ORT")
    # cells' medians: m1 0.6, m2 0.9, m3 0.95
    assert ort["of_cell_medians"] == pytest.approx(0.9)
    assert ort["models"] == 3


def test_runs_of_different_or_unrecorded_code_are_refused(runs_mod):
    one = _run("abc", {"m1": (0.5, 0.6)})
    other = _run("def", {"m1": (0.7, 0.8)})
    with pytest.raises(runs_mod.RunsError, match="abc.*def|--allow-mixed-code"):
        runs_mod.summarize({"a": one, "b": other})
    unrecorded = _run(None, {"m1": (0.7, 0.8)})
    with pytest.raises(runs_mod.RunsError, match="unrecorded"):
        runs_mod.summarize({"a": one, "b": unrecorded})
    with pytest.raises(runs_mod.RunsError, match="unrecorded"):   # alike, but neither says what code
        runs_mod.summarize({"a": unrecorded, "b": _run(None, {"m1": (0.6, 0.7)})})
    mixed = runs_mod.summarize({"a": one, "b": unrecorded}, allow_mixed_code=True)
    assert mixed["runs"]["b"]["commit"] == "unrecorded"


def test_command_line_writes_the_table_and_refuses_bad_input(runs_mod, tmp_path, capsys):
    for name, ratios in (("r1", {"m1": (0.5, 0.6), "m2": (0.9, 0.7)}), ("r2", {"m1": (0.7, 0.8), "m2": (0.7, 0.9)})):
        (tmp_path / f"{name}.json").write_text(json.dumps(_run("abc", ratios)))
    out = tmp_path / "out"
    assert runs_mod.main([str(tmp_path / "r1.json"), str(tmp_path / "r2.json"), "--out", str(out),
                          "--name", "s"]) == 0
    doc = json.loads((out / "s.json").read_text())
    assert doc["benchmark"] == "structured_runs"
    tvm = next(m for m in doc["medians"] if m["runtime"] == "TVM")
    assert tvm["of_cell_medians"] == pytest.approx(0.75)   # m1 0.7, m2 0.8
    assert "| TVM | 1 | 70% | 0.65 | 0.85 | **0.750** (2 models) | no |" in (out / "s.md").read_text()
    (tmp_path / "bad.json").write_text(json.dumps({"benchmark": "targets"}))
    assert runs_mod.main([str(tmp_path / "bad.json"), "--out", str(out), "--name", "t"]) == 2
    assert "not a benchmarks/structured.py result" in capsys.readouterr().err
    assert not (out / "t.json").exists()
