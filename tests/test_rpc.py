"""runtime/rpc.py against a real TVM RPC server on this machine (no qemu needed).

The host server runs x86 libraries, so the happy path uses a host build; the wrong-architecture
path uploads an aarch64 build to it. The emulated aarch64 path is in test_arm_emulator.py.
"""
from __future__ import annotations

import shutil
import socket
import time

import numpy as np
import pytest

from arm_support import build_small_cnn, example_input, small_cnn, torch_output
from rwdeploy.errors import OptionError, ToolchainError, VerificationError
from rwdeploy.runtime import rpc


@pytest.fixture(scope="module")
def host_server():
    from tvm import rpc as tvm_rpc
    from tvm.rpc.tracker import Tracker

    # One host server behind a tracker (the direct --rpc path is exercised against the
    # emulated device in test_arm_emulator.py; each server here costs a TVM import).
    tracker = Tracker("127.0.0.1", port=9390, port_end=9490, silent=True)
    server = tvm_rpc.Server("127.0.0.1", port=9490, port_end=9590, key="host-test",
                            tracker_addr=("127.0.0.1", tracker.port), silent=True)
    # The server registers with the tracker from its own process; wait until it has, or the
    # first test races the registration.
    deadline = time.monotonic() + 60
    while "host-test" not in tvm_rpc.connect_tracker("127.0.0.1", tracker.port).summary().get("queue_info", {}):
        if time.monotonic() > deadline:
            pytest.fail("the test RPC server did not register with the tracker within 60 s")
        time.sleep(0.2)
    yield rpc.Device(tracker=f"127.0.0.1:{tracker.port}", key="host-test"), server
    server.terminate()
    tracker.terminate()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the with-block ends: nothing listens there


def test_remote_run_through_tracker_matches_torch(host_server):
    device, _ = host_server
    lib = build_small_cnn(4, "cpu")
    x = example_input()
    ref = torch_output(small_cnn(4), x)
    m = rpc.measure_remote(lib, x, ref, device, warmup=1, repeat=5)
    assert m.output.shape == ref.shape == (1, 10)
    np.testing.assert_allclose(m.output, ref, rtol=1e-4, atol=1e-5)
    assert m.latency.n == 5 and 0 < m.latency.median_ms <= m.latency.p90_ms
    assert m.emulated is False and m.device == device.label


def test_wrong_reference_is_a_verification_error(host_server):
    device, _ = host_server
    lib = build_small_cnn(4, "cpu")
    x = example_input()
    wrong = torch_output(small_cnn(4), x) + 1.0
    with pytest.raises(VerificationError, match="differs from torch"):
        rpc.measure_remote(lib, x, wrong, device, repeat=2)


def test_refused_port_is_one_clear_error(tmp_path):
    fake = tmp_path / "model.so"
    fake.write_bytes(b"\x7fELF")
    port = _closed_port()
    with pytest.raises(ToolchainError, match=f"127.0.0.1:{port} refused the connection") as info:
        rpc.measure_remote(fake, example_input(), np.zeros((1, 10), np.float32),
                           rpc.Device(rpc=f"127.0.0.1:{port}"))
    assert "\n" not in info.value.one_line() and "arm-emulator start" in info.value.one_line()


def test_unknown_tracker_key_is_one_clear_error(host_server, tmp_path):
    device, _ = host_server
    fake = tmp_path / "model.so"
    fake.write_bytes(b"\x7fELF")
    with pytest.raises(ToolchainError, match="no device with key 'rpi4'.*host-test"):
        rpc.measure_remote(fake, example_input(), np.zeros((1, 10), np.float32),
                           rpc.Device(tracker=device.tracker, key="rpi4"))


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-gcc") is None, reason="needs gcc-aarch64-linux-gnu")
def test_wrong_architecture_library_is_one_clear_error(host_server):
    device, _ = host_server
    lib = build_small_cnn(4, "arm")
    assert rpc.elf_machine(lib) == "aarch64"
    x = example_input()
    with pytest.raises(ToolchainError, match=r"could not load model\.arm\.so \(built for aarch64\)") as info:
        rpc.measure_remote(lib, x, torch_output(small_cnn(4), x), device)
    assert "\n" not in info.value.one_line()


@pytest.mark.parametrize("text", ["localhost", "host:", ":9090", "host:port", "host:70000"])
def test_bad_address_names_the_option(text):
    with pytest.raises(OptionError, match="--rpc"):
        rpc.parse_address(text, "--rpc")


def test_device_needs_exactly_one_way_to_connect():
    with pytest.raises(OptionError):
        rpc.Device()
    with pytest.raises(OptionError):
        rpc.Device(rpc="a:1", tracker="b:2", key="k")
    with pytest.raises(OptionError, match="--key"):
        rpc.Device(tracker="b:2")


def test_elf_machine_reads_the_header(tmp_path):
    import sys
    assert rpc.elf_machine(sys.executable) in {"x86_64", "aarch64"}
    text = tmp_path / "a.txt"
    text.write_text("not an elf file at all")
    assert rpc.elf_machine(text) is None


def test_compile_device_options_are_checked_before_any_work(tmp_path):
    from rwdeploy.compile import CompileOptions

    for kw, msg in (({"target": "cpu", "rpc": "h:1"}, "runs here"),
                    ({"target": "arm", "rpc": "h:1", "tracker": "t:2", "key": "k"}, "not both"),
                    ({"target": "rpi4", "tracker": "t:2"}, "needs --key"),
                    ({"target": "arm", "rpc": "nohostport"}, "--rpc 'nohostport' is not HOST:PORT")):
        with pytest.raises(OptionError, match=msg):
            CompileOptions(out=tmp_path, **kw).validate()
    CompileOptions(out=tmp_path, target="rpi5", rpc="10.0.0.7:9090").validate()  # fine: nothing raised


def test_port_that_never_answers_the_handshake_is_a_timeout_error(tmp_path):
    fake = tmp_path / "model.so"
    fake.write_bytes(b"\x7fELF")
    with socket.socket() as mute:  # accepts connections, never speaks RPC
        mute.bind(("127.0.0.1", 0))
        mute.listen(4)
        port = mute.getsockname()[1]
        with pytest.raises(ToolchainError, match=f"127.0.0.1:{port} did not complete the RPC handshake within 1 s"):
            rpc.measure_remote(fake, example_input(), np.zeros((1, 10), np.float32),
                               rpc.Device(rpc=f"127.0.0.1:{port}", connect_timeout_s=1.0))
