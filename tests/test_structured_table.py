"""benchmarks/structured.py's table on a hand-made row: TVM's channel choice per batch column
(`--align-batch each`) and the note saying at which batch the TVM candidates were timed."""
from __future__ import annotations

import pytest
from conftest import benchmark_module


@pytest.fixture(scope="module")
def structured():
    with benchmark_module("structured") as mod:
        yield mod


def _choice(chosen, kept, macs):
    return {"kept_for_alignment": kept, "macs_slim": macs, "max_abs": 0.0, "max_rel": 0.0,
            "whole_model": {"chosen": chosen}}


def _row(by_batch):
    lat = {"dense": {"median_ms": 2.0}, "slim": {"median_ms": 1.0}, "speedup": 2.0,
           "speedup_per_mac_reduction": 0.5, "speedup_per_pruned_mac_reduction": 0.5,
           "tvm dense": {"median_ms": 1.0}, "tvm slim": {"median_ms": 0.25},
           "tvm": {"speedup": 4.0, "speedup_per_mac_reduction": 1.0, "speedup_per_pruned_mac_reduction": 0.9,
                   "tvm_over_ort_slim": 0.25}}
    return {"model": "m", "rate": 0.7, "params_dense": 100, "params_slim": 50, "macs_dense": 1000,
            "macs_slim": 250, "state_bytes_dense": 400, "state_bytes_slim": 200, "ours_s": 0.1,
            "ours_max_rel": 1e-7, "whole_model": {"chosen": "off"}, "kept_for_alignment": 0,
            "tvm_auto": by_batch["1"], "tvm_auto_by_batch": by_batch,
            "latency": {"1": lat, "8": lat}}


def _meta(align_batch):
    return {"batches": [1, 8], "tvm": True, "aligns": ["auto", "off"], "threads": 1, "runs": 3, "turn": 10,
            "loadavg_before": [0.1, 0.2, 0.3], "environment": {"onnxruntime": "x", "cpu": "y"},
            "input_shapes": {"m": "3×8×8"}, "align_batch": align_batch}


def test_each_batch_column_names_its_own_choice(structured):
    by_batch = {"1": _choice("off", 0, 250), "8": _choice("per-group", 51, 300)}
    table = structured.markdown([_row(by_batch)], _meta("each"))
    assert "| off (0) / b1 off (0), b8 per-group (51) |" in table
    assert "timed as TVM builds at the column's batch, `--align-batch B`" in table


def test_one_choice_for_every_column(structured):
    table = structured.markdown([_row({"1": _choice("N=16", 12, 300)})], _meta("first"))
    assert "| off (0) / N=16 (12) |" in table and "timed as TVM builds at batch 1)" in table
