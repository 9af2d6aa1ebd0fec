"""The emulated aarch64 device for real: qemu-user, the aarch64 TVM runtime, an RPC server,
aarch64 libraries cross-built by TVM, and qemu's instruction counts."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from arm_support import build_small_cnn, example_input, provisioned_home, small_cnn, torch_output
from rwdeploy.cli import main as cli_main
from rwdeploy.errors import ToolchainError
from rwdeploy.runtime import arm_emulator, rpc
from rwdeploy.runtime.arm_measure import ArmVariant, instruction_section, measure_arm

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def emulator():
    h = provisioned_home()
    before = arm_emulator.status(h.root_dir)
    st = before if before.running else arm_emulator.start(h.root_dir)
    yield st
    if not before.running:  # leave a server the user started alone
        arm_emulator.stop(h.root_dir)


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    return tmp_path_factory.mktemp("a64_libs")


def test_status_reports_the_running_server(emulator, capsys):
    st = arm_emulator.status(emulator.home)
    assert st.provisioned and st.running and st.port == emulator.port
    assert cli_main(["device", "arm-emulator", "status", "--home", emulator.home]) == 0
    assert f"rpc 127.0.0.1:{emulator.port}" in capsys.readouterr().out


def test_measure_arm_on_the_emulator_matches_torch_and_counts_instructions(emulator, libs):
    x = example_input()
    variants = [ArmVariant("original", build_small_cnn(8, "aarch64", libs), torch_output(small_cnn(8), x)),
                # the 8-filter net's shape with half its filters removed
                ArmVariant("slim", build_small_cnn(4, "aarch64", libs), torch_output(small_cnn(4), x))]
    assert all(rpc.elf_machine(v.library) == "aarch64" for v in variants)
    messages: list[str] = []
    results = measure_arm(variants, x, progress=messages.append)  # no --rpc: the emulator
    assert any("emulated aarch64 device" in m for m in messages)
    for r, v in zip(results, variants):
        # over RPC (relax.VirtualMachine on the emulated device) and through the C++ runner
        np.testing.assert_allclose(r.measurement.output, v.reference_output, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(r.instructions.output.reshape(1, 10), v.reference_output, rtol=1e-4, atol=1e-5)
        row = r.latency_row()
        assert row["emulated"] is True and row["target"] == "arm" and row["variant"] == v.variant
        assert row["n"] == 15 and 0 < row["median_ms"] <= row["p90_ms"]
        c = r.instructions
        assert len(c.samples) == 2 and c.per_inference > 10_000
        assert c.spread < 0.01, c.samples  # two independent measurements agree within 1%
    original, slim = (r.instructions.per_inference for r in results)
    assert slim < 0.75 * original, (original, slim)
    section = instruction_section(results)
    assert section["relative_to_original"]["slim"] == pytest.approx(slim / original)


def test_host_library_on_the_emulator_is_one_clear_error(emulator, libs):
    lib = build_small_cnn(4, "host", libs)
    x = example_input()
    with pytest.raises(ToolchainError, match=r"could not load cnn4\.host\.so \(built for x86_64\)"):
        rpc.measure_remote(lib, x, torch_output(small_cnn(4), x), rpc.Device(rpc=emulator.address))
    # the server survives a bad upload
    assert arm_emulator.status(emulator.home).running


def test_counting_a_host_library_is_one_clear_error(emulator, libs):
    lib = build_small_cnn(4, "host", libs)
    with pytest.raises(ToolchainError, match="cnn4.host.so on the emulated aarch64 device failed"):
        arm_emulator.count_instructions(lib, example_input(), path=emulator.home, iterations=(0, 1), repeats=1)


def test_start_is_idempotent_and_stop_reports(tmp_path, emulator):
    # a second start on a running home returns the same server
    again = arm_emulator.start(emulator.home)
    assert again.pid == emulator.pid
    # an unprovisioned, never-started home: stop says it was not running, status says not provisioned
    empty = tmp_path / "empty"
    assert arm_emulator.stop(empty) is False
    st = arm_emulator.status(empty)
    assert not st.running and not st.provisioned


@pytest.mark.skipif(shutil.which("qemu-aarch64") is None, reason="needs qemu-user")
def test_provision_is_cached(emulator):
    messages: list[str] = []
    arm_emulator.provision(emulator.home, progress=messages.append)
    # nothing is downloaded or built again: only the four per-step "ready" lines
    assert len(messages) == len(arm_emulator.PROVISION_STEPS) and all("ready" in m for m in messages), messages
