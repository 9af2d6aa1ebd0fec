"""A quantized model as a `.pt2` program: its spec travels in the archive
(`rwdeploy.quant.program`), and `rwdeploy compile` ships the same integer-weight QDQ ONNX and
int8 TVM build as for the same model as an rwdeploy checkpoint. Without a spec, a `.pt2`
compiles as the float model it holds."""
from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import onnxruntime as ort
import pytest
import torch

from rwdeploy import models
from rwdeploy.cli import main
from rwdeploy.errors import ModelFileError
from rwdeploy.io import Checkpoint, load_model, save_checkpoint
from rwdeploy.quant import QuantSpec, quantize_model, save_quantized_program
from rwdeploy.quant.program import QUANT_FILE

SHAPE = (1, 1, 28, 28)


@pytest.fixture(scope="module")
def quantized_lenet(tmp_path_factory):
    """LeNet-5 with zeroed filters, quantized to 8 bits per channel; as checkpoint and as .pt2."""
    torch.manual_seed(0)
    net = models.create("lenet5").eval()
    with torch.no_grad():
        net.conv1.weight[:2] = 0          # removable channels: the slim model differs from the original
        net.conv2.weight[::3] = 0
    spec = quantize_model(net, 8, per_channel=True)
    folder = tmp_path_factory.mktemp("qmodel")
    ckpt = folder / "lenet-q8.pt"
    save_checkpoint(Checkpoint("lenet5", net.state_dict(), SHAPE, metadata={"quantization": spec.to_dict()}), ckpt)
    program = torch.export.export(net, (torch.randn(2, *SHAPE[1:]),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    pt2 = folder / "lenet-q8.pt2"
    save_quantized_program(program, pt2, spec)
    plain = folder / "lenet-float.pt2"
    torch.export.save(program, str(plain))
    return net, spec, ckpt, pt2, plain


def test_the_spec_travels_in_the_program(quantized_lenet, tmp_path):
    net, spec, _, pt2, plain = quantized_lenet
    loaded = load_model(pt2)
    assert QuantSpec.from_dict(loaded.metadata["quantization"]) == spec
    assert load_model(plain).metadata == {}
    # a record naming a weight the program does not hold, or not a record, is refused by name
    program = torch.export.load(str(plain))
    bad = QuantSpec(8, True, {"fc9.weight": [1.0]})
    with pytest.raises(ValueError, match="fc9.weight"):
        save_quantized_program(program, tmp_path / "x.pt2", bad)
    torch.export.save(program, str(tmp_path / "bad.pt2"), extra_files={QUANT_FILE: json.dumps(bad.to_dict())})
    with pytest.raises(ModelFileError, match="fc9.weight"):
        load_model(tmp_path / "bad.pt2")
    torch.export.save(program, str(tmp_path / "junk.pt2"), extra_files={QUANT_FILE: "{not json"})
    with pytest.raises(ModelFileError, match="damaged quantization record"):
        load_model(tmp_path / "junk.pt2")


def _compile(path, out, capsys, *extra) -> dict:
    args = ["compile", str(path), "--out", str(out), "--sparse", "off", "--no-measure", "--batch", "1", *extra]
    assert main(args) == 0, capsys.readouterr().err
    capsys.readouterr()
    return json.loads((out / "report.json").read_text())


def _ort(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_pt2_ships_the_same_quantized_artifacts_as_the_checkpoint(quantized_lenet, tmp_path, capsys):
    net, spec, ckpt, pt2, _ = quantized_lenet
    by_ckpt = _compile(ckpt, tmp_path / "ckpt", capsys, "--target", "onnx")   # QDQ ONNX only
    by_pt2 = _compile(pt2, tmp_path / "pt2", capsys)                          # + the int8 TVM build
    assert by_pt2["model"]["source"] == "pt2" and by_ckpt["model"]["source"] == "checkpoint"
    q_ckpt, q_pt2 = by_ckpt["quantization"], by_pt2["quantization"]
    assert q_pt2["bits"] == 8 and q_pt2["per_channel"] and q_pt2["onnx"]["storage"] == "int8"
    same = lambda layers: [{k: v for k, v in l.items() if k != "weight"} for l in layers]  # noqa: E731
    assert len(q_pt2["onnx"]["layers"]) == 4 and same(q_pt2["onnx"]["layers"]) == same(q_ckpt["onnx"]["layers"])
    assert q_pt2["storage"] == q_ckpt["storage"]
    assert q_pt2["tvm"]["weights"] == "int8" and (tmp_path / "pt2" / "slim.qdq.tvm.so").is_file()
    assert q_pt2["tvm"]["check"]["max_rel"] <= 1e-4
    # the integer-weight file computes the quantized network: against the torch model, independently
    x = torch.randn(3, *SHAPE[1:])
    with torch.no_grad():
        want = net(x).numpy()
    got = _ort(tmp_path / "pt2" / "slim.qdq.onnx", x)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    np.testing.assert_allclose(got, _ort(tmp_path / "ckpt" / "slim.qdq.onnx", x), rtol=1e-5, atol=1e-6)
    # the slim program carries the spec on: compiling it again ships integers again
    assert QuantSpec.from_dict(load_model(tmp_path / "pt2" / "slim.pt2").metadata["quantization"]) == spec
    with zipfile.ZipFile(tmp_path / "ckpt" / "slim.pt2") as zf:
        assert any(n.endswith(f"extra/{QUANT_FILE}") for n in zf.namelist())


def test_pt2_without_a_spec_compiles_as_float(quantized_lenet, tmp_path, capsys):
    report = _compile(quantized_lenet[4], tmp_path / "out", capsys, "--target", "onnx")
    assert "quantization" not in report and not (tmp_path / "out" / "slim.qdq.onnx").exists()
    assert "slim_qdq_onnx" not in report["files"]


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("gcc") is None, reason="needs nvcc and gcc")
def test_quantized_gpu_build_is_a_cubin_here(quantized_lenet, tmp_path, capsys):
    """Without a driver the int8 gpu build's kernels are compiled to a cubin (CUDA source did not
    load on a GPU machine with TVM's runtime alone); whether it runs: benchmarks/gpu.py."""
    from rwdeploy.runtime.tvm_build import cuda_runtime_loads

    if cuda_runtime_loads():
        pytest.skip("a driver is installed: TVM builds cubins by itself")
    report = _compile(quantized_lenet[2], tmp_path / "gpu", capsys, "--target", "gpu", "--gpu-arch", "sm_90")
    device = report["quantization"]["tvm"]["device_build"]
    data = (tmp_path / "gpu" / device["path"]).read_bytes()
    assert device["target"] == "gpu" and device["library_bytes"] == len(data)
    assert b"sm_90" in data and b"__global__" not in data and data.count(b"\x7fELF") == 2
