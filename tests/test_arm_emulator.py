"""The emulated aarch64 device for real: qemu-user, the aarch64 TVM runtime, an RPC server,
aarch64 libraries cross-built by TVM, and qemu's instruction counts."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from arm_support import build_small_cnn, example_input, provisioned_home, small_cnn, torch_output
from rwdeploy.cli import main as cli_main
from rwdeploy.errors import ToolchainError
from rwdeploy.runtime import arm_emulator, rpc
from rwdeploy.runtime.arm_measure import arm_device

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def emulator():
    h = provisioned_home()
    before = arm_emulator.status(h.root_dir)
    st = before if before.running else arm_emulator.start(h.root_dir)
    yield st
    if not before.running:  # leave a server the user started alone
        arm_emulator.stop(h.root_dir)


def test_status_reports_the_running_server(emulator, capsys):
    st = arm_emulator.status(emulator.home)
    assert st.provisioned and st.running and st.port == emulator.port
    assert cli_main(["device", "arm-emulator", "status", "--home", emulator.home]) == 0
    assert f"rpc 127.0.0.1:{emulator.port}" in capsys.readouterr().out


def test_runner_output_on_the_emulated_device_matches_torch(emulator):
    x = example_input()
    c = arm_emulator.count_instructions(build_small_cnn(4, "arm"), x, path=emulator.home, iterations=(0, 1), repeats=1)
    np.testing.assert_allclose(c.output.reshape(1, 10), torch_output(small_cnn(4), x), rtol=1e-4, atol=1e-5)
    assert c.per_inference > 10_000 and c.samples == (c.per_inference,)


def test_host_library_on_the_emulator_is_one_clear_error(emulator):
    lib = build_small_cnn(4, "cpu")
    x = example_input()
    with pytest.raises(ToolchainError, match=r"could not load model\.cpu\.so \(built for x86_64\)"):
        rpc.measure_remote(lib, x, torch_output(small_cnn(4), x), rpc.Device(rpc=emulator.address))
    # the server survives a bad upload
    assert arm_emulator.status(emulator.home).running


def test_counting_a_host_library_is_one_clear_error(emulator):
    lib = build_small_cnn(4, "cpu")
    with pytest.raises(ToolchainError, match=r"model\.cpu\.so on the emulated aarch64 device failed"):
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


def test_missing_host_tools_without_root_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(arm_emulator.shutil, "which", lambda exe: None if exe == "qemu-aarch64" else "/usr/bin/x")
    monkeypatch.setattr(arm_emulator.os, "geteuid", lambda: 1000)
    with pytest.raises(ToolchainError) as info:
        arm_emulator.provision(tmp_path / "home")
    assert info.value.one_line() == "the arm emulator needs qemu-aarch64; run: sudo apt-get install -y qemu-user"


def test_failed_download_is_one_clear_error(monkeypatch, tmp_path):
    # a pin no index has: pip's own error line comes through, nothing half-made is left
    monkeypatch.setattr(arm_emulator, "_wheel_requirements", lambda: ["apache-tvm==0.0.0"])
    with pytest.raises(ToolchainError) as info:
        arm_emulator.provision(tmp_path / "home")
    line = info.value.one_line()
    assert line.startswith("pip download of aarch64 wheels failed: ") and "apache-tvm==0.0.0" in line, line
    assert not (tmp_path / "home" / "site").exists()


def test_unreachable_apt_mirror_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(arm_emulator, "DEBIAN_MIRROR", "http://127.0.0.1:9/debian")  # nothing listens there
    with pytest.raises(ToolchainError) as info:
        arm_emulator._ensure_apt_lists(arm_emulator.home(tmp_path / "home"), lambda _: None)
    line = info.value.one_line()
    assert line.startswith("apt-get update (arm64 + deb-src lists) failed: ") and "127.0.0.1:9" in line, line


def test_arm_device_starts_and_stops_the_emulator_it_needed_despite_a_port_race(emulator, monkeypatch, tmp_path):
    # a second home sharing the provisioned files, with no server running in it
    h = tmp_path / "home"
    h.mkdir()
    for sub in ("site", "root", "plugins", "rt"):
        (h / sub).symlink_to(Path(emulator.home) / sub)
    monkeypatch.setenv("RWDEPLOY_A64_HOME", str(h))
    # The server cannot bind the port it was given (another home's server took it between
    # the free-port check and the bind; TVM's "cannot bind" in the log): the start moves on.
    real_launch, launches = arm_emulator._launch, []

    def racing_launch(h, host, port, *args):
        launches.append(port)
        if len(launches) == 1:
            raise arm_emulator._PortTaken()
        return real_launch(h, host, port, *args)

    monkeypatch.setattr(arm_emulator, "_launch", racing_launch)
    with arm_device() as (device, threads):
        st = arm_emulator.status()
        assert st.running and device.emulated and device.rpc == st.address and threads == 1
        assert len(launches) == 2 and launches[1] > launches[0] and st.port == launches[1] != emulator.port
    assert not arm_emulator.status().running
    assert not Path(f"/proc/{st.pid}").exists() or not arm_emulator._pid_alive(st.pid)
    assert arm_emulator.status(emulator.home).running  # the other server is untouched


def test_compile_target_arm_without_rpc_uses_the_emulator(emulator, cli, tmp_path):
    """`rwdeploy compile --target arm` end to end on lenet5 with half of conv1/conv2's filters zeroed."""
    import json

    from rwdeploy import io, models

    net = models.create("lenet5")
    state = net.state_dict()
    for name in ("conv1", "conv2"):
        n = state[f"{name}.weight"].shape[0]
        state[f"{name}.weight"][n // 2:] = 0
        state[f"{name}.bias"][n // 2:] = 0
    ckpt = tmp_path / "lenet5_half.pt"
    io.save_checkpoint(io.Checkpoint("lenet5", state, (1, 1, 28, 28)), ckpt)
    out = tmp_path / "out"
    proc = cli("compile", str(ckpt), "--target", "arm", "--out", str(out), "--batch", "1", "--runs", "5",
               "--warmup", "1", "--min-time", "0", "--sparse", "off")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no --rpc given: measuring --target arm on the emulated aarch64 device" in proc.stderr
    assert rpc.elf_machine(out / "model.arm.so") == "aarch64"
    report = json.loads((out / "report.json").read_text())
    rows = [r for r in report["latency"] if r["runtime"] == "tvm"]
    assert {r["variant"] for r in rows} == {"original", "slim"} and all(r["emulated"] for r in rows)
    for r in rows:  # outputs were checked against torch on the device; the error is recorded
        assert r["max_abs_err"] < 1e-4 and r["n"] == 5  # one latency row type: "max_abs_err" everywhere
    section = report["targets"]["arm"]
    assert section["device"]["emulated"] and any("emulated aarch64 device" in n for n in section["notes"])
    counts = section["instructions"]["per_variant"]
    for c in counts.values():
        assert len(c["samples"]) == 2 and c["relative_spread"] < 0.01, c  # two measurements within 1%
    original_n, slim_n = counts["original"]["insns_per_inference"], counts["slim"]["insns_per_inference"]
    assert slim_n < 0.75 * original_n, (original_n, slim_n)
    assert section["instructions"]["relative_to_original"]["slim"] == pytest.approx(slim_n / original_n)
    assert "(emulated)" in (out / "report.md").read_text()
