"""TVM builds for the registry targets (runtime/tvm_build.py, runtime/tvm_schedule.py).

cpu: built, exported, loaded back and compared with torch; arm: cross-built to an aarch64
ELF (the set-up script installs the cross compiler, so in CI this runs); gpu: built without
a GPU into a real CUDA module. Running on a GPU skips cleanly where there is none.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch

from rwdeploy.errors import OptionError, ToolchainError
from rwdeploy.runtime import targets as reg
from rwdeploy.runtime import tvm_build
from targets_support import elf_machine_field, tiny_input, tiny_model

ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def cpu_artifact(model, tmp_path_factory):
    return tvm_build.build(model, tiny_input(), "cpu", out_dir=tmp_path_factory.mktemp("cpu"),
                           threads=1)


def test_cpu_build_exports_and_matches_torch(cpu_artifact, model):
    assert cpu_artifact.path.name == "model.cpu.so" and cpu_artifact.path.is_file()
    assert elf_machine_field(cpu_artifact.path) == 0x3E  # x86-64 host
    assert cpu_artifact.size_bytes == cpu_artifact.path.stat().st_size
    x = tiny_input(seed=7)
    with torch.no_grad():
        ref = model(x).numpy()
    got = tvm_build.run_local(cpu_artifact, x)  # loads model.cpu.so from disk
    np.testing.assert_allclose(got, ref, atol=ATOL, rtol=1e-4)


def test_cpu_kernels_are_scheduled(cpu_artifact):
    scheduled = cpu_artifact.kernels.get("scheduled", [])
    assert any("conv2d" in k for k in scheduled), cpu_artifact.kernels
    assert any("dense" in k for k in scheduled), cpu_artifact.kernels  # Linear: packed-weight dense
    assert not any("conv2d" in k for k in cpu_artifact.kernels.get("unscheduled", []))


def test_measure_local_checks_output_and_times(cpu_artifact, model):
    x = tiny_input()
    with torch.no_grad():
        ref = model(x)
    stats, err = tvm_build.measure_local(cpu_artifact, x, ref, warmup=1, min_runs=3,
                                         min_time_s=0.0)
    assert err < ATOL
    assert stats.n >= 3 and stats.p90_ms >= stats.median_ms > 0
    wrong = ref.numpy() + 1.0
    _, err_wrong = tvm_build.measure_local(cpu_artifact, x, wrong, warmup=0, min_runs=1,
                                           min_time_s=0.0)
    assert abs(err_wrong - 1.0) < 1e-3  # the reported error is a real comparison


def test_cpu_build_at_batch_2_matches_torch(model):
    x = tiny_input(batch=2, seed=3)
    art = tvm_build.build(model, x, "cpu", threads=1)  # in memory, not exported
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, atol=ATOL, rtol=1e-4)


def _scheduled_vs_naive(model: torch.nn.Module, x: torch.Tensor, packed: bool = True) -> dict[str, float]:
    """Every kernel the hand schedule accepts, run scheduled and naive on the same random
    arguments: kernel name -> max abs difference. Also checks the schedule vectorised it.
    `packed`: legalised as the build does (packed weights, tvm_legalize), else by TVM's TOPI
    computes (what grouped convolutions and other layouts still get)."""
    import tvm
    from tvm import tirx
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from rwdeploy.runtime import tvm_legalize, tvm_schedule

    target = reg.get_target("cpu", threads=1).tvm()
    lanes = tvm_schedule.vector_lanes(target)
    legalize = tvm_legalize.legalize_passes(target) if packed else cpu.legalize_passes(target)
    with target:
        mod = tvm.transform.Sequential([*tvm_schedule.prepare_passes(lanes),
                                        *legalize])(tvm_build.import_relax(model, x))
    rng = np.random.default_rng(0)
    diffs = {}
    for gvar, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        scheduled = tvm_schedule.schedule_reduction(func, lanes)
        if scheduled is None:
            continue
        assert "T.vectorized" in scheduled.script() and "T.vectorized" not in func.script()
        args = [rng.standard_normal([int(d) for d in p.shape]).astype("float32") for p in func.params]
        outs = []
        for f in (func, scheduled):
            lib = tvm.tirx.build(f.with_attr("global_symbol", "main"), target=target)
            bufs = [tvm.runtime.tensor(a) for a in args[:-1]]
            bufs.append(tvm.runtime.tensor(np.zeros_like(args[-1])))
            lib["main"](*bufs)
            outs.append(bufs[-1].numpy())
        diffs[gvar.name_hint] = float(np.abs(outs[1] - outs[0]).max())
    return diffs


def _layer_mix() -> torch.nn.Module:
    """Every kind of layer the CPU build lowers itself, with channel counts of 1 to 4 whole
    AVX-512 vectors and of half vectors: 3x3 (3 vectors), 1x1 (24 = three half vectors),
    depthwise stride 1 and 2, strided 3x3 with padding 2 (4 vectors), a grouped conv (TVM's
    own lowering), a classifier (dense)."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(3, 48, 3, padding=1), nn.ReLU(),
        nn.Conv2d(48, 24, 1), nn.ReLU6(),
        nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.ReLU(),
        nn.Conv2d(24, 64, 3, stride=2, padding=2), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1, groups=64),
        nn.Conv2d(64, 32, 3, padding=1, groups=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 10)).eval()


def test_schedules_keep_every_kernel_result():
    """The hand schedules (register tiles across rows and images, channel tiles of whole and
    half vectors, fused epilogues, padded channels) compute what the unscheduled kernels
    compute, kernel by kernel, on random arguments: packed-weight kernels at batch 1 and 3,
    TVM's TOPI kernels (grouped convolutions keep them) too."""
    diffs = {f"topi.{k}": v for k, v in _scheduled_vs_naive(tiny_model(), tiny_input(), packed=False).items()}
    assert sum("conv2d" in k for k in diffs) >= 3 and any("matmul" in k for k in diffs), diffs
    for batch in (1, 3):
        got = _scheduled_vs_naive(_layer_mix(), torch.randn(batch, 3, 12, 12))
        assert sum("depthwise" in k for k in got) == 2 and any("dense" in k for k in got), got
        assert sum("conv2d" in k and "depthwise" not in k for k in got) >= 4, got  # 3 packed + grouped
        diffs.update({f"b{batch}.{k}": v for k, v in got.items()})
    # A 4x4 map with 8-pixel tiles spanning two rows, and a 5x5 map (tile = one row).
    small = torch.nn.Sequential(torch.nn.Conv2d(8, 32, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 24, 3, stride=2, padding=2)).eval()
    diffs.update({f"small.{k}": v for k, v in _scheduled_vs_naive(small, torch.randn(1, 8, 4, 4)).items()})
    assert max(diffs.values()) < 1e-4, diffs


@pytest.mark.parametrize("batch", [1, 3])
def test_packed_weight_build_matches_torch(batch):
    """The packed weights (conv, depthwise, dense) and the padding stages compute the model:
    the whole build against torch, at a batch whose tiles span several images."""
    model = _layer_mix()
    x = torch.randn(batch, 3, 12, 12, generator=torch.Generator().manual_seed(batch))
    art = tvm_build.build(model, x, "cpu", threads=1)
    assert not art.kernels.get("unscheduled", []) or all("conv" not in k and "dense" not in k
                                                          for k in art.kernels["unscheduled"]), art.kernels
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, atol=ATOL, rtol=1e-4)


def test_arm_cross_build_is_an_aarch64_elf(model, tmp_path):
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        if os.environ.get("CI"):
            pytest.fail("aarch64-linux-gnu-gcc missing in CI: scripts/setup.sh test installs it")
        pytest.skip("aarch64-linux-gnu-gcc not installed (apt-get install -y gcc-aarch64-linux-gnu)")
    art = tvm_build.build(model, tiny_input(), "rpi4", out_dir=tmp_path)
    assert art.path == tmp_path / "model.rpi4.so"
    assert elf_machine_field(art.path) == 0xB7  # EM_AARCH64
    assert art.kernels.get("scheduled"), "arm kernels get the same schedules as cpu"
    with pytest.raises(OptionError, match="RPC"):
        tvm_build.run_local(art, tiny_input())


def test_arm_build_without_cross_compiler_is_a_toolchain_error(model, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ToolchainError, match="gcc-aarch64-linux-gnu"):
        tvm_build.build(model, tiny_input(), "arm", out_dir=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_gpu_build_without_a_gpu_has_a_cuda_module(model, tmp_path, monkeypatch):
    monkeypatch.setenv("RWDEPLOY_CUDA_SOURCE", "1")  # the form a host without nvcc ships
    art = tvm_build.build(model, tiny_input(), "gpu", gpu_arch="sm_90", out_dir=tmp_path)
    assert art.cuda_binary is False
    assert art.device_modules == ["cuda"]
    assert art.target.tvm_target["arch"] == "sm_90"
    cuda = tvm_build._cuda_module(art.executable)
    source = cuda.inspect_source("")
    assert source.count("__global__") >= 3  # the convs and the dense layer run as kernels
    assert (tmp_path / "model.gpu.so").is_file()


def test_bad_tuning_options_are_option_errors(model, tmp_path):
    with pytest.raises(OptionError, match="--tuning-db"):
        tvm_build.build(model, tiny_input(), "cpu", tune=4)
    with pytest.raises(OptionError, match="does not exist"):
        tvm_build.build(model, tiny_input(), "cpu", tuning_db=tmp_path / "nope")
    with pytest.raises(OptionError, match="gpu"):
        tvm_build.build(model, tiny_input(), "gpu", tune=4, tuning_db=tmp_path)


@pytest.mark.gpu
def test_gpu_run_matches_torch(model, tmp_path):
    if reg.cuda_gpu_arch() is None:
        pytest.skip("no CUDA GPU on this machine")
    art = tvm_build.build(model, tiny_input(), "gpu", out_dir=tmp_path)
    x = tiny_input(seed=5)
    with torch.no_grad():
        ref = model(x).numpy()
    stats, err = tvm_build.measure_local(art, x, ref, warmup=2, min_runs=5, min_time_s=0.0)
    assert err < 1e-3 and stats.n >= 5


def test_odd_channel_counts_are_padded_to_whole_vectors():
    """10 and 7 output channels become 16- and 8-wide (zero filters up to a multiple of half an
    AVX-512 register), sliced back; ReLU6 (clip) becomes max/min so it keeps the NHWC layout:
    the same function as torch."""
    import tvm

    from rwdeploy.runtime import tvm_schedule

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 10, 3), torch.nn.ReLU6(), torch.nn.Flatten(),
                                torch.nn.Linear(10 * 6 * 6, 7)).eval()
    x = 8 * torch.randn(1, 3, 8, 8)  # large enough that ReLU6 clips at both ends
    with torch.no_grad():
        pre = model[0](x)
    assert (pre > 6).any() and (pre < 0).any()
    with tvm.target.Target({"kind": "llvm"}):
        mod = tvm.transform.Sequential(tvm_schedule.prepare_passes(16))(tvm_build.import_relax(model, x))
    script = mod.script()
    assert script.count("R.strided_slice") == 2 and "R.clip" not in script
    assert "R.Tensor((1, 6, 6, 16)" in script and "R.Tensor((1, 8)" in script  # widened outputs
    art = tvm_build.build(model, x, "cpu", threads=1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, atol=ATOL, rtol=1e-4)


def test_padded_channels_write_back_through_partitioned_loops():
    """Padded layers (10 -> 16, 25 -> 32, 50 -> 56 channels) write only their real channels
    back, in unpredicated vector pieces (8 + 2, 16 + 8 + 1, 48 + 2; at batch 1 the Linear's
    reduction is split in slices instead): kernel by kernel the same
    as the unscheduled kernels, and the whole build the same as torch."""
    import tvm
    from tvm import tirx

    from rwdeploy.runtime import tvm_legalize, tvm_schedule

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 10, 3), nn.ReLU(), nn.Conv2d(10, 25, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(25, 50, 1), nn.Flatten(), nn.Linear(50 * 6 * 6, 7)).eval()
    for batch in (1, 8):
        x = torch.randn(batch, 3, 8, 8)
        diffs = _scheduled_vs_naive(model, x)
        assert sum("strided_slice" in k for k in diffs) == 4 and max(diffs.values()) < 1e-4, diffs
        target = reg.get_target("cpu", threads=1).tvm()
        with target:
            mod = tvm.transform.Sequential([*tvm_schedule.prepare_passes(16),
                                            *tvm_legalize.legalize_passes(target)])(tvm_build.import_relax(model, x))
        sliced = [f for g, f in mod.functions.items() if isinstance(f, tirx.PrimFunc) and "strided_slice" in g.name_hint]
        scripts = [tvm_schedule.schedule_reduction(f, 16).script() for f in sliced]
        # at batch 1 the 1800 -> 7 Linear sums its reduction in slices (`tvm_split_reduction`):
        # its partial sums have all 8 channels, the slice to 7 is a separate loop of 7 elements
        split = [s for s in scripts if "rw_dense_packed_rf" in s]
        assert len(split) == (1 if batch == 1 else 0)
        assert all("_partition" in s for s in scripts if s not in split)
        art = tvm_build.build(model, x, "cpu", threads=1)
        with torch.no_grad():
            ref = model(x).numpy()
        np.testing.assert_allclose(tvm_build.run_local(art, x), ref, atol=ATOL, rtol=1e-4)


def _workspace_calls(art: tvm_build.TvmArtifact) -> int:
    """TVMBackendAllocWorkspace calls in the LLVM IR of a cpu build."""
    modules = [art.executable.mod, *art.executable.mod.imports]
    return sum(m.inspect_source("ll").count("@__TVMBackendAllocWorkspace") for m in modules
               if m.kind == "llvm")


@pytest.mark.parametrize("layer,hw", [("depthwise", 7), ("pointwise", 7), ("pointwise", 14)])
def test_register_tile_accumulators_are_on_the_stack(layer, hw):
    """A tile's accumulators are a stack array (under 1 KB), not a TVM workspace buffer, which
    LLVM must assume aliases the input: a depthwise tile stored and reloaded them at every tap.
    Neither layer has a padding copy, so the build has no workspace at all; results as torch's.
    On 14x14 the pointwise conv's 32 channels could take 2 x 14 accumulators (1.75 KB): with
    8 inputs per output, a workspace call per tile would cost more than its FMAs."""
    torch.manual_seed(0)
    nn = torch.nn
    conv = nn.Conv2d(16, 16, 3, padding=1, groups=16) if layer == "depthwise" else nn.Conv2d(8, hw * 16 // 7, 1)
    model = nn.Sequential(conv, nn.ReLU6()).eval()
    x = torch.randn(1, conv.in_channels, hw, hw)   # 7x7: tiles of 7 pixels x 16 channels, 448 bytes
    art = tvm_build.build(model, x, "cpu", threads=1)
    assert _workspace_calls(art) == 0
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("RWDEPLOY_TEST_TUNING"),
                    reason="MetaSchedule costs ~2.5 CPU-minutes even for 2 trials (over this "
                           "file's CI budget); run with RWDEPLOY_TEST_TUNING=1")
def test_metaschedule_records_are_applied_and_reused(tmp_path):
    """--tune N --tuning-db DIR: tuned kernels replace the hand schedule; a later build with
    only --tuning-db applies the same records without tuning again."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU()).eval()
    x = torch.randn(1, 64)
    with torch.no_grad():
        ref = model(x).numpy()
    db = tmp_path / "db"
    tuned = tvm_build.build(model, x, "cpu", tune=2, tuning_db=db, threads=1)
    assert any("matmul" in k for k in tuned.kernels.get("tuned", [])), tuned.kernels
    assert (db / "database_tuning_record.json").read_text().strip()
    np.testing.assert_allclose(tvm_build.run_local(tuned, x), ref, atol=ATOL, rtol=1e-4)
    reused = tvm_build.build(model, x, "cpu", tuning_db=db, threads=1)
    assert reused.kernels.get("tuned") == tuned.kernels["tuned"] and reused.tuned_trials == 0
    np.testing.assert_allclose(tvm_build.run_local(reused, x), ref, atol=ATOL, rtol=1e-4)


def test_a_failing_layout_conversion_keeps_the_layout_and_still_builds(monkeypatch):
    """TVM 0.27's ConvertLayout raises on some graphs (NextViT: std::bad_alloc). The build then
    keeps NCHW, says so in its kernel notes, and still computes the model."""
    from tvm import relax

    def failing(*args, **kwargs):
        def run(mod):
            raise RuntimeError("std::bad_alloc")
        return run

    monkeypatch.setattr(relax.transform, "ConvertLayout", failing)
    model, x = tiny_model(), tiny_input()
    art = tvm_build.build(model, x, "cpu", threads=1)
    assert any("layout kept as given (NCHW)" in n and "bad_alloc" in n for n in art.to_dict()["notes"])
    assert "notes" not in art.to_dict()["kernels"]  # the report's kernel counts stay kernels
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(tvm_build.run_local(art, x), ref, atol=ATOL, rtol=1e-4)


def test_compiled_and_bytecode_vm_agree_and_only_bytecode_profiles(tmp_path):
    """cpu builds default to exec_mode "compiled" (the VM's instructions as machine code); the
    exported library loads with TVM's runtime alone and computes the model like the bytecode
    build. Only the bytecode interpreter reports its calls to `tvm_profile`'s instrument: a
    compiled build is refused with a clear error instead of an empty profile."""
    import tvm

    from rwdeploy.runtime.tvm_profile import profile_calls

    model, x = tiny_model(), tiny_input()
    with torch.no_grad():
        ref = model(x).numpy()
    compiled = tvm_build.build(model, x, "cpu", threads=1, out_dir=tmp_path)
    bytecode = tvm_build.build(model, x, "cpu", threads=1, exec_mode="bytecode")
    for art in (compiled, bytecode):
        np.testing.assert_allclose(tvm_build.run_local(art, x), ref, atol=ATOL, rtol=1e-4)
    # the exported library names its kernels whatever the exec mode (`kernel_names`)
    assert any(n.startswith("fused_conv2d") for n in tvm_build.kernel_names(compiled.path))
    arg = tvm.runtime.tensor(x.numpy())
    calls = profile_calls(tvm.relax.VirtualMachine(bytecode.executable, tvm.cpu()), "main", arg, runs=2)
    assert any("conv" in c.symbol for c in calls) and all(c.ms >= 0 for c in calls)
    with pytest.raises(ValueError, match="bytecode"):
        profile_calls(tvm.relax.VirtualMachine(compiled.executable, tvm.cpu()), "main", arg, runs=2)


def test_a_conv_the_schedule_fails_on_is_named_in_the_notes(model, monkeypatch):
    """A schedule failure leaves the kernel as plain loops (correct, far slower): the build's
    notes name the kernel and the error instead of staying silent."""
    from rwdeploy.runtime import tvm_schedule

    def broken(func, lanes, registers=32):
        raise RuntimeError("split factor does not divide the extent")

    monkeypatch.setattr(tvm_schedule, "schedule_reduction", broken)
    art = tvm_build.build(model, tiny_input(), "cpu", threads=1)
    notes = art.to_dict()["notes"]
    failed = [n for n in notes if "could not be scheduled" in n]
    assert failed and all("split factor does not divide the extent" in n for n in failed)
    assert any("conv2d" in n for n in failed)
    import tvm

    x = tiny_input()
    y = tvm.relax.VirtualMachine(art.executable, tvm.cpu())["main"](tvm.runtime.tensor(x.numpy()))
    with torch.no_grad():
        np.testing.assert_allclose(y.numpy(), model(x).numpy(), atol=ATOL, rtol=1e-4)  # still right


def test_a_scheduled_build_has_no_schedule_notes(cpu_artifact):
    assert not any("could not be scheduled" in n for n in cpu_artifact.to_dict()["notes"])
