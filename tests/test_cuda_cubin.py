"""gpu builds on a host without a driver: a cubin where nvcc is installed (runtime.cuda_cubin),
CUDA source otherwise, and a target that resolves where only TVM's runtime is installed.

The cubin tests need nvcc and gcc (skipped without them; CI has no CUDA toolkit). Whether the
cubin runs is checked on a GPU machine by `benchmarks/gpu.py` (benchmarks/results/gpu.md).
"""
from __future__ import annotations

import shutil
import types

import pytest
import torch

from rwdeploy.errors import TvmImportError
from rwdeploy.runtime import targets as reg
from rwdeploy.runtime import tvm_build
from targets_support import tiny_input, tiny_model

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("gcc") is None,
                                reason="needs nvcc and gcc (a CUDA toolkit)")
no_driver = pytest.mark.skipif(tvm_build.cuda_runtime_loads(),
                               reason="a driver is installed: TVM builds cubins by itself")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _embedded_elf_images(path) -> int:
    return path.read_bytes().count(b"\x7fELF")


@needs_nvcc
@no_driver
def test_gpu_build_here_embeds_a_cubin_for_the_arch(model, tmp_path):
    art = tvm_build.build(model, tiny_input(), "gpu", gpu_arch="sm_90", out_dir=tmp_path)
    assert art.cuda_binary is True and art.device_modules == ["cuda"]
    data = art.path.read_bytes()
    assert art.path == tmp_path / "model.gpu.so" and art.size_bytes == len(data)
    assert _embedded_elf_images(art.path) == 2  # the host library and the cubin inside it
    assert b"sm_90" in data and b"__global__" not in data  # machine code, not CUDA source


@needs_nvcc
@no_driver
def test_cubin_build_without_out_dir_exports_by_copy(model, tmp_path):
    art = tvm_build.build(model, tiny_input(), "gpu", gpu_arch="sm_80")
    assert art.executable is None and art.path.is_file()
    shipped = tvm_build.export(art, tmp_path / "slim.gpu.so")
    assert shipped.read_bytes() == art.path.read_bytes() and art.path == shipped
    assert b"sm_80" in shipped.read_bytes()


class _Erf(torch.nn.Module):
    def forward(self, x):
        return torch.special.erfcx(x)  # no converter in TVM's Relax importer


@needs_nvcc
@no_driver
def test_an_import_error_in_the_cubin_build_keeps_its_class_and_node(tmp_path):
    with pytest.raises(TvmImportError) as info:
        tvm_build.build(_Erf(), torch.randn(2, 3), "gpu", gpu_arch="sm_90", out_dir=tmp_path)
    assert info.value.node and "erfcx" in str(info.value)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_without_nvcc_the_gpu_build_keeps_cuda_source(model, tmp_path, monkeypatch):
    no_nvcc = types.SimpleNamespace(copyfile=shutil.copyfile,
                                    which=lambda name: None if name == "nvcc" else shutil.which(name))
    monkeypatch.setattr(tvm_build, "shutil", no_nvcc)
    assert not tvm_build.cubin_needs_stand_in()
    art = tvm_build.build(model, tiny_input(), "gpu", gpu_arch="sm_90", out_dir=tmp_path)
    if not tvm_build.cuda_runtime_loads():
        assert art.cuda_binary is False
    assert b"__global__" in art.path.read_bytes()  # the kernels as CUDA source


def test_gpu_target_resolves_where_only_the_tvm_runtime_is_installed(monkeypatch):
    import tvm

    def missing():  # what TVM's runtime-only install answers: the function is in the compiler
        raise AttributeError("module 'tvm.target._ffi_api' has no attribute 'llvm_get_system_cpu'")

    monkeypatch.setattr(tvm.target.codegen, "llvm_get_system_cpu", missing)
    reg.host_cpu.cache_clear()
    try:
        target = reg.get_target("gpu", gpu_arch="sm_90")
        assert target.host == {"kind": "llvm"} and target.tvm_target["arch"] == "sm_90"
    finally:
        reg.host_cpu.cache_clear()
