"""The compile pipeline's TVM stages (rwdeploy/tvm_stages.py) and their report sections.

Runs the stages of TARGET_STAGES on a hand-made CompileContext (original and a smaller slim
model), so they are tested whether or not the channel passes are installed; the full
`rwdeploy compile` path is covered by test_compile_cli.py.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from rwdeploy.compile import TARGET_STAGES, CompileContext, CompileOptions
from rwdeploy.errors import OptionError
from rwdeploy.report import make_report, render_markdown
from rwdeploy.runtime import targets as reg
from targets_support import tiny_input, tiny_model


def _context(tmp_path, target: str, batches=(1, 2), widths=(8, 4), **opts) -> CompileContext:
    original, slim = tiny_model(seed=0, width=widths[0]), tiny_model(seed=1, width=widths[1])
    loaded = SimpleNamespace(example_input=lambda batch=None, seed=0: tiny_input(batch or 1, seed))
    options = CompileOptions(out=tmp_path / "out", target=target, batches=batches, threads=1,
                             runs=3, warmup=1, min_time_s=0.0, **opts)
    options.validate()
    return CompileContext(loaded=loaded, options=options, workdir=tmp_path, example_input=tiny_input(),
                          probe_inputs=[], batches=batches, original=original, slim=slim)


def _run(ctx: CompileContext) -> None:
    for stage in TARGET_STAGES[ctx.options.target]:
        if stage.when(ctx.options):
            with torch.no_grad():
                stage.run(ctx)


def test_every_registry_target_is_a_compile_target():
    assert set(reg.TARGETS) <= set(TARGET_STAGES)
    assert [s.name for s in TARGET_STAGES["cpu"]] == ["tvm_build", "tvm_measure"]
    assert TARGET_STAGES["arm"][0].name == "tvm_build"
    assert "tvm_measure" not in [s.name for s in TARGET_STAGES["arm"]]  # measured over RPC


def test_cpu_stages_ship_the_module_and_measure_original_and_slim(tmp_path):
    # widths whose weights (~150 KB against ~40 KB) outweigh the kernels' code: at widths 8 and
    # 4 (a few KB of weights) the two .so files differ by their code alone, which any schedule
    # change moves (folding the input transpose made the original's 7 KB smaller)
    ctx = _context(tmp_path, "cpu", widths=(32, 16))
    _run(ctx)
    assert (tmp_path / "model.cpu.so").is_file() and (tmp_path / "original.cpu.so").is_file()
    assert ctx.files["tvm_module"]["bytes"] == (tmp_path / "model.cpu.so").stat().st_size
    rows = [r.to_dict() for r in ctx.latency if r.runtime == "tvm"]  # LatencyRow -> the report's row
    assert {(r["variant"], r["batch"]) for r in rows} == {("original", 1), ("original", 2),
                                                          ("slim", 1), ("slim", 2)}
    assert all(r["max_abs_err"] < 1e-4 and r["n"] >= 3 and r["target"] == "cpu" for r in rows)
    builds = ctx.sections["targets"]["cpu"]["builds"]
    assert len(builds) == 4 and all(b["build_s"] > 0 for b in builds)
    shipped = [b for b in builds if b["path"]]
    assert {b["path"] for b in shipped} == {"model.cpu.so", "original.cpu.so"}
    assert all(b["batch"] == 1 for b in shipped)
    # The slim build is smaller than the original's (half the filters, a quarter of the weights).
    sizes = {b["variant"]: b["size_bytes"] for b in shipped}
    assert sizes["slim"] + 64_000 < sizes["original"]
    md = render_markdown(make_report({"latency": [r.to_dict() for r in ctx.latency],
                                      "targets": ctx.sections["targets"]}))
    assert "### tvm on cpu" in md and "## Targets" in md and "`model.cpu.so`" in md


def test_gpu_stages_build_cuda_and_say_latency_was_skipped(tmp_path):
    ctx = _context(tmp_path, "gpu", batches=(1,), gpu_arch="sm_80")
    _run(ctx)
    section = ctx.sections["targets"]["gpu"]
    assert section["target"]["tvm_target"]["arch"] == "sm_80"
    assert all(b["device_modules"] == ["cuda"] for b in section["builds"])
    assert (tmp_path / "model.gpu.so").is_file()
    if reg.cuda_gpu_arch() is None:
        assert section.get("latency_skipped") is True
        assert any("latency step skipped" in n and "CUDA GPU" in n for n in section["notes"])
        assert not [r for r in ctx.latency if r.runtime == "tvm"]


def test_gpu_source_kernels_are_named_in_the_notes(tmp_path, monkeypatch):
    monkeypatch.setenv("RWDEPLOY_CUDA_SOURCE", "1")  # what a build host without nvcc ships
    ctx = _context(tmp_path, "gpu", batches=(1,), gpu_arch="sm_80")
    _run(ctx)
    section = ctx.sections["targets"]["gpu"]
    if all(b["cuda_binary"] is False for b in section["builds"]):
        assert any("needs TVM's compiler" in n for n in section["notes"])
    else:  # a driver is installed here: TVM builds a cubin by itself, and no note is due
        assert not any("needs TVM's compiler" in n for n in section["notes"])


def test_tvm_options_are_checked_before_the_pipeline_runs(tmp_path):
    with pytest.raises(OptionError, match="--gpu-arch"):
        CompileOptions(out=tmp_path, target="cpu", gpu_arch="sm_90").validate()
    with pytest.raises(OptionError, match="--tuning-db"):
        CompileOptions(out=tmp_path, target="cpu", tune=8).validate()
    with pytest.raises(OptionError, match="gpu"):
        CompileOptions(out=tmp_path, target="gpu", tune=8, tuning_db=tmp_path).validate()
    with pytest.raises(OptionError, match="unknown --target"):
        CompileOptions(out=tmp_path, target="tpu").validate()
