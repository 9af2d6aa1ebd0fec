"""`rwdeploy compile --sparse`: the pack stage, compact ONNX, summary, report."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

import rwdeploy.compile as compile_mod
from rwdeploy import models
from rwdeploy.cli import main
from rwdeploy.io import Checkpoint, load_model, save_checkpoint

FAST = ["--no-measure", "--batch", "1"]


def _have_passes() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(f"rwdeploy.passes.{m}") is not None
               for m in ("trace", "channel_groups", "remove_zero_channels", "verify"))


needs_passes = pytest.mark.skipif(not _have_passes(), reason="channel passes not installed yet")


@pytest.fixture(scope="module")
def sparse_lenet(tmp_path_factory):
    torch.manual_seed(0)
    net = models.create("lenet5")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.weight.shape[0] > 20:
                m.weight[torch.rand(m.weight.shape, generator=g) < 0.9] = 0
    path = tmp_path_factory.mktemp("model") / "lenet5-sparse.pt"
    save_checkpoint(Checkpoint("lenet5", net.state_dict(), (1, 1, 28, 28)), path)
    return path, net.eval()


def test_pack_stage_then_export_stages(sparse_lenet, tmp_path):
    """The pack stage and the stages after it, on a hand-made context (no channel passes)."""
    path, net = sparse_lenet
    loaded = load_model(path)
    opts = compile_mod.CompileOptions(out=tmp_path / "o", sparse="csr", measure=False)
    ctx = compile_mod.CompileContext(loaded, opts, tmp_path, loaded.example_input(),
                                     compile_mod.probe_inputs(loaded, opts))
    ctx.original = ctx.slim = torch.fx.symbolic_trace(net)
    with torch.no_grad():
        compile_mod.stage_pack_sparse(ctx)
        assert ctx.unpacked is ctx.original and ctx.slim is not ctx.original
        assert ctx.sections["sparse"]["packed_layers"] == 2 and ctx.sections["sparse"]["max_rel_vs_slim"] < 1e-5
        compile_mod.stage_export_pt2(ctx)
        compile_mod.stage_export_onnx(ctx)
        compile_mod.stage_ort_check(ctx)                  # ORT on the compact file vs packed torch
    assert ctx.files["slim_onnx"]["bytes"] < ctx.files["original_onnx"]["bytes"] / 4
    program = torch.export.load(str(tmp_path / compile_mod.SLIM_PT2))
    assert any("rwdeploy.sparse" in str(n.target) for n in program.graph.nodes)
    x = torch.randn(2, 1, 28, 28)                      # dynamic batch
    torch.testing.assert_close(program.module()(x), net(x), rtol=1e-5, atol=1e-5)


def test_bad_sparse_option():
    with pytest.raises(Exception, match="--sparse"):
        compile_mod.CompileOptions(out="o", sparse="fast").validate()


def _compile(path, out, mode, capsys) -> tuple[dict, str]:
    assert main(["compile", str(path), "--out", str(out), "--sparse", mode, *FAST]) == 0, \
        capsys.readouterr().err
    return json.loads((out / "report.json").read_text()), capsys.readouterr().out


@needs_passes
def test_compile_packs_and_ships_compact_onnx(sparse_lenet, tmp_path, capsys):
    path, net = sparse_lenet
    out = tmp_path / "out"
    report, text = _compile(path, out, "csr", capsys)
    assert "packed layers (csr)" in text and "2/4" in text            # conv2 and fc1 are 90 % sparse
    sparse = report["sparse"]
    assert sparse["mode"] == "csr" and sparse["packed_layers"] == 2
    assert sparse["bytes_saved"] > 0.7 * 4 * (500 * 800)
    assert [l["chosen"] for l in sparse["layers"]] == ["dense", "csr", "csr", "dense"]
    assert report["layers"] and report["model"]["params"]["slim"] == report["model"]["params"]["original"]
    files = report["files"]
    assert files["slim_onnx"]["bytes"] < files["original_onnx"]["bytes"] / 4
    x = torch.randn(1, 1, 28, 28)
    sess = ort.InferenceSession(str(out / "slim.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0],
                               net(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    program = torch.export.load(str(out / "slim.pt2"))
    assert any("rwdeploy.sparse" in str(n.target) for n in program.graph.nodes)
    torch.testing.assert_close(program.module()(x), net(x), rtol=1e-5, atol=1e-5)


@needs_passes
def test_compile_sparse_off_packs_nothing(sparse_lenet, tmp_path, capsys):
    report, text = _compile(sparse_lenet[0], tmp_path / "out", "off", capsys)
    assert "sparse" not in report and "packed layers" not in text


def test_gpu_target_keeps_every_layer_dense(sparse_lenet, tmp_path):
    """The packed kernels are CPU code (a CUDA build ran them on the host over device memory and
    crashed on a GPU): with --target gpu, --sparse auto packs nothing and says why."""
    path, net = sparse_lenet
    out = tmp_path / "gpu"
    assert main(["compile", str(path), "--target", "gpu", "--gpu-arch", "sm_90", "--out", str(out), *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sparse"]["packed_layers"] == 0 and "no packed" in report["sparse"]["skipped"]
    assert "has no packed (CSR/BSR) kernels" in (out / "report.md").read_text()
    program = torch.export.load(str(out / compile_mod.SLIM_PT2))
    assert not any("rwdeploy" in str(n.target) for n in program.graph.nodes)
    assert (out / "model.gpu.so").is_file()


def test_forced_packing_for_a_gpu_is_an_option_error(sparse_lenet, tmp_path, capsys):
    path, _ = sparse_lenet
    code = main(["compile", str(path), "--target", "gpu", "--sparse", "csr", "--out", str(tmp_path / "o"), *FAST])
    assert code == 2 and not (tmp_path / "o").exists()
    assert "--sparse csr with --target gpu" in capsys.readouterr().err


def test_a_packed_model_is_refused_by_the_gpu_build(sparse_lenet, tmp_path):
    from rwdeploy.errors import RwdeployError
    from rwdeploy.passes.pack_sparse import pack_sparse
    from rwdeploy.runtime import tvm_build

    _, net = sparse_lenet
    x = torch.randn(1, 1, 28, 28)
    packed = pack_sparse(torch.fx.symbolic_trace(net), x, mode="csr").gm
    with pytest.raises(RwdeployError, match="packed .CSR/BSR. layers"):
        tvm_build.build(packed, x, "gpu", gpu_arch="sm_90", out_dir=tmp_path)
    assert not list(tmp_path.iterdir())
