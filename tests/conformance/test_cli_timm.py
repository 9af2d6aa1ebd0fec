"""`rwdeploy compile` end to end, as a subprocess, on a timm model in both forms a user hands over.

The model is a conformance case (trained-looking weights, 30-50% of the filters zeroed at
random): saved as a `.pt2` program and as a pickled module (`--trust-pickle`). The report's
exactness figures are then checked against an independent ONNX Runtime run of the shipped
files on the compile's own probe inputs, with the zeroed torch model as the reference:

* |ORT(original.onnx) - zeroed| must be what the report says for the original ONNX file
  (the same file, inputs and function: equal up to 1e-6 of the output scale);
* |ORT(slim.onnx) - zeroed| <= (torch slim vs original) + (ORT slim vs torch slim), the two
  figures the report gives, and within the tolerance.

Errors of an exact model are float rounding, so a report figure can be checked only to that
level: a figure off by 100x (or a shipped file that is not exact) fails; one off by 2x at
1e-7 does not.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conformance_check import TOLERANCE, ort_max_rel
from conformance_models import get
from conformance_prepare import prepare, save
from rwdeploy.compile import CompileOptions, probe_inputs
from rwdeploy.io import load_model

MODEL = "resnet10t"
HERE = Path(__file__).resolve().parent


def _shim_site(tmp_path: Path) -> Path:
    """A sitecustomize that defines torchvision's schemas, so that the CLI process can import
    timm's classes when it unpickles the module (this environment's torchvision cannot load
    its compiled ops; a user's can)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        f"import sys\nsys.path.insert(0, {str(HERE)!r})\nimport torchvision_shim\ntorchvision_shim.install()\n")
    return site


@pytest.mark.slow
@pytest.mark.parametrize("form", ["pt2", "pickle"])
def test_cli_compile_timm_model_report_matches_onnxruntime(tmp_path, form):
    spec = get(MODEL)
    prepared = prepare(spec, spec.small)
    path, _ = save(prepared, form, tmp_path)
    out = tmp_path / "out"
    args = [str(path), "--target", "cpu", "--out", str(out), "--batch", "1", "--no-measure", "--sparse", "off"]
    if form == "pickle":
        args += ["--trust-pickle", "--input-shape", ",".join(map(str, prepared.input_shape))]
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="160",
               PYTHONPATH=os.pathsep.join([str(_shim_site(tmp_path)), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "rwdeploy", "compile", *args], capture_output=True, text=True,
                          env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    files = report["files"]
    assert {"slim_onnx", "original_onnx", "slim_pt2"} <= set(files)
    assert report["channels"]["removed"], "nothing was removed: the case would prove nothing"

    # The compile's own probe inputs, rebuilt through the public API (same seed, same shapes).
    loaded = load_model(path, trust_pickle=True, input_shape=prepared.input_shape) if form == "pickle" else load_model(path)
    probes = probe_inputs(loaded, CompileOptions(out=out))
    if report["trace"].get("fixed_batch"):
        probes = probe_inputs(loaded, CompileOptions(out=out), batch_size=report["trace"]["fixed_batch"])
    with torch.no_grad():
        scale = max(float(prepared.module(x).abs().max()) for x in probes)

    ver, ort_rep = report["verification"], report["verification"]["onnxruntime"]
    original = ort_max_rel(out / files["original_onnx"]["path"], prepared.module, probes)
    assert abs(original["max_abs"] - ort_rep["original"]["max_abs"]) <= 1e-6 * scale, (original, ort_rep)
    slim = ort_max_rel(out / files["slim_onnx"]["path"], prepared.module, probes)
    assert slim["max_abs"] <= ver["max_abs"] + ort_rep["slim"]["max_abs"] + 1e-6 * scale, (slim, ver)
    assert slim["max_rel"] <= TOLERANCE and ver["max_rel"] <= TOLERANCE
    assert report["model"]["params"]["slim"] < report["model"]["params"]["original"]
