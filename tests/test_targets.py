"""The target registry (runtime/targets.py) and `rwdeploy targets`; no builds here."""
from __future__ import annotations

import dataclasses
import json

import pytest

from rwdeploy.errors import OptionError, ToolchainError
from rwdeploy.runtime import targets as reg


def test_registry_has_the_targets_and_presets():
    assert {"cpu", "arm", "gpu", "rpi4", "rpi5", "graviton2", "android-arm64"} <= set(reg.TARGETS)
    for name, entry in reg.TARGETS.items():
        assert entry.name == name
        assert entry.family in ("cpu", "arm", "gpu")
        assert isinstance(entry.tvm_target, dict) and "kind" in entry.tvm_target
        assert entry.artifact_name == f"model.{name}.so"
        assert entry.requirements, name
        assert entry.runs_on in (reg.RUNS_LOCAL, reg.RUNS_RPC)


@pytest.mark.parametrize("name", sorted(reg.TARGETS))
def test_every_entry_resolves_to_a_tvm_target(name):
    import tvm

    t = reg.get_target(name, gpu_arch="sm_80" if name == "gpu" else None)
    tvm_t = t.tvm()
    assert isinstance(tvm_t, tvm.target.Target)
    assert tvm_t.kind.name == t.tvm_target["kind"]


def test_cpu_uses_the_real_cpu_name_and_the_thread_count():
    import tvm

    t = reg.get_target("cpu", threads=3)
    assert t.tvm_target["mcpu"] == tvm.target.codegen.llvm_get_system_cpu()
    assert t.tvm_target["mcpu"] not in ("native", "generic", "")
    assert t.tvm_target["num-cores"] == 3 and t.threads == 3
    with pytest.raises(OptionError, match="--threads"):
        reg.get_target("cpu", threads=0)


def test_arm_presets_name_their_cores():
    expected = {"rpi4": "cortex-a72", "rpi5": "cortex-a76", "graviton2": "neoverse-n1"}
    for name, cpu in expected.items():
        t = reg.get_target(name)
        assert t.tvm_target["mcpu"] == cpu
        assert t.tvm_target["mtriple"] == "aarch64-linux-gnu"
        assert "+neon" in t.tvm_target["mattr"]
        assert t.cross_compiler == "aarch64-linux-gnu-gcc" and t.preset_of == "arm"
    assert reg.get_target("android-arm64").tvm_target["mtriple"] == "aarch64-linux-android"


def test_gpu_arch_given_detected_or_defaulted():
    assert reg.get_target("gpu", gpu_arch="sm_86").tvm_target["arch"] == "sm_86"
    t = reg.get_target("gpu")
    detected = reg.cuda_gpu_arch()
    if detected is None:
        assert t.tvm_target["arch"] == reg.DEFAULT_GPU_ARCH and t.notes
    else:
        assert t.tvm_target["arch"] == detected
    assert t.host["kind"] == "llvm"
    with pytest.raises(OptionError, match="sm_XY"):
        reg.get_target("gpu", gpu_arch="volta")
    with pytest.raises(OptionError, match="--gpu-arch"):
        reg.get_target("cpu", gpu_arch="sm_90")


def test_unknown_target_is_an_option_error():
    with pytest.raises(OptionError, match="unknown target 'tpu'.*cpu"):
        reg.get_target("tpu")


def test_missing_toolchain_says_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    arm = reg.get_target("arm")
    assert not arm.check("build")
    with pytest.raises(ToolchainError, match="aarch64-linux-gnu-gcc.*apt-get install -y gcc-aarch64"):
        arm.require("build")
    broken = dataclasses.replace(arm, requirements=(
        reg.Requirement("probe that raises", "build", lambda: 1 / 0, "nothing"),))
    assert not broken.check()  # a failing probe reads as missing, never a crash


def test_rpc_address_satisfies_the_run_requirement():
    phone = reg.get_target("android-arm64")
    assert not phone.check("run")
    assert reg.get_target("android-arm64", rpc="10.0.0.2:9090").check("run")


def test_targets_cli_lists_entries_and_requirements(cli):
    res = cli("targets")
    assert res.returncode == 0, res.stderr
    for name in reg.TARGETS:
        assert name in res.stdout
    assert "aarch64-linux-gnu-gcc" in res.stdout and "CUDA" in res.stdout
    res = cli("targets", "--json")
    rows = json.loads(res.stdout)
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == set(reg.TARGETS)
    ndk = [r for r in by_name["android-arm64"]["requirements"] if "NDK" in r["name"]][0]
    assert ndk["present"] == reg.TARGETS["android-arm64"].requirements[1].present()
