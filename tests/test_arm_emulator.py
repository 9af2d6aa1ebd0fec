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


def test_emulated_rpc_run_matches_torch(emulator, libs):
    lib = build_small_cnn(8, "aarch64", libs)
    assert rpc.elf_machine(lib) == "aarch64"
    x = example_input()
    ref = torch_output(small_cnn(8), x)
    m = rpc.measure_remote(lib, x, ref, rpc.Device(rpc=emulator.address, emulated=True), warmup=1, repeat=3)
    np.testing.assert_allclose(m.output, ref, rtol=1e-4, atol=1e-5)
    assert m.emulated and m.latency.n == 3 and m.to_dict()["emulated"] is True


def test_host_library_on_the_emulator_is_one_clear_error(emulator, libs):
    lib = build_small_cnn(4, "host", libs)
    x = example_input()
    with pytest.raises(ToolchainError, match=r"could not load cnn4\.host\.so \(built for x86_64\)"):
        rpc.measure_remote(lib, x, torch_output(small_cnn(4), x), rpc.Device(rpc=emulator.address))
    # the server survives a bad upload
    assert arm_emulator.status(emulator.home).running


def test_instruction_count_is_repeatable_and_slim_costs_less(emulator, libs):
    x = example_input()
    counts = {}
    for width in (8, 4):  # width 4 = the 8-filter net with half its filters removed
        lib = build_small_cnn(width, "aarch64", libs)
        c = arm_emulator.count_instructions(lib, x, path=emulator.home, iterations=(1, 3), repeats=2)
        # the C++ runner's output on the emulated device matches torch too
        np.testing.assert_allclose(c.output.reshape(1, 10), torch_output(small_cnn(width), x), rtol=1e-4, atol=1e-5)
        assert len(c.samples) == 2 and c.per_inference > 10_000
        assert c.spread < 0.01, c.samples  # two independent measurements within 1%
        counts[width] = c.per_inference
    assert counts[4] < 0.75 * counts[8], counts


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
