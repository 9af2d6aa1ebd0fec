"""Measure a built Relax module on a device over TVM RPC.

`--rpc HOST:PORT` connects to a device's RPC server directly; `--tracker HOST:PORT --key KEY`
asks a TVM RPC tracker for a device. Then: upload the library, load it, run it through
`relax.VirtualMachine(lib, remote.cpu())`, check its output against the torch model's
(`passes.verify.compare`, the compile's --tolerance), and time it with TVM's time_evaluator, which
runs *on the device* (so RPC round trips are not counted); several libraries (original and slim)
are timed in alternation.

Every failure a user can cause (nothing listening, a tracker without that key, a timeout, a
library built for another architecture) is one `ToolchainError` line that says what to do.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from rwdeploy.errors import OptionError, ToolchainError, VerificationError
from rwdeploy.passes.verify import Closeness, compare
from rwdeploy.runtime.latency import LatencyStats

ELF_MACHINES = {0x03: "x86", 0x28: "arm", 0x3E: "x86_64", 0xB7: "aarch64", 0xF3: "riscv"}


def elf_machine(path: str | Path) -> str | None:
    """The CPU architecture an ELF shared library was built for, or None if not ELF."""
    with open(path, "rb") as f:
        head = f.read(20)
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return None
    order = "<" if head[5] == 1 else ">"
    (machine,) = struct.unpack(order + "H", head[18:20])
    return ELF_MACHINES.get(machine, f"machine 0x{machine:x}")


def parse_address(text: str, option: str) -> tuple[str, int]:
    """`HOST:PORT` -> (host, port); a malformed value names the option."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OptionError(f"{option} {text!r} is not HOST:PORT", hint=f"e.g. {option} 127.0.0.1:9190")
    return host, int(port)


def _check_reachable(host: str, port: int, what: str, timeout_s: float) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except ConnectionRefusedError:
        raise ToolchainError(
            f"{what} {host}:{port} refused the connection: nothing is listening there",
            hint="start the device's RPC server (for the emulator: rwdeploy device arm-emulator start)",
        ) from None
    except socket.timeout:
        raise ToolchainError(f"{what} {host}:{port} did not answer within {timeout_s:.0f} s",
                             hint="check the address, the network and firewalls") from None
    except OSError as err:
        raise ToolchainError(f"cannot reach {what} {host}:{port}: {err.strerror or err}",
                             hint="check the address") from None


@dataclass(frozen=True)
class Device:
    """Where to measure: a direct RPC server or a tracker + key."""

    rpc: str | None = None
    tracker: str | None = None
    key: str | None = None
    emulated: bool = False
    connect_timeout_s: float = 10.0
    session_timeout_s: float = 900.0

    def __post_init__(self) -> None:
        if (self.rpc is None) == (self.tracker is None):
            raise OptionError("give exactly one of --rpc HOST:PORT or --tracker HOST:PORT --key KEY")
        if self.tracker is not None and not self.key:
            raise OptionError("--tracker needs --key KEY (the device key the server registered with)")

    @property
    def label(self) -> str:
        return self.rpc if self.rpc else f"{self.key}@{self.tracker}"

    def connect(self) -> Any:
        """An RPC session to the device."""
        from tvm import rpc

        if self.rpc:
            host, port = parse_address(self.rpc, "--rpc")
            _check_reachable(host, port, "RPC server", self.connect_timeout_s)
            try:
                return _within(self.connect_timeout_s, f"RPC server {host}:{port}", "the RPC handshake",
                               lambda: rpc.connect(host, port, session_timeout=self.session_timeout_s))
            except ToolchainError:
                raise
            except Exception as err:  # TVMError / RuntimeError from the handshake
                raise ToolchainError(f"RPC handshake with {host}:{port} failed: {_error_line(err)}",
                                     hint="is it a TVM RPC server of the same TVM version? "
                                     "A server registered with a tracker only accepts --tracker connections") from None
        host, port = parse_address(self.tracker, "--tracker")
        _check_reachable(host, port, "RPC tracker", self.connect_timeout_s)
        try:
            tracker = rpc.connect_tracker(host, port)
            summary = _within(self.connect_timeout_s, f"RPC tracker {host}:{port}", "a summary request",
                              tracker.summary)
        except ToolchainError:
            raise
        except Exception as err:
            raise ToolchainError(f"{host}:{port} is not a TVM RPC tracker: {_error_line(err)}",
                                 hint="check --tracker") from None
        keys = summary.get("queue_info", {})
        if self.key not in keys:
            known = ", ".join(sorted(keys)) or "none"
            raise ToolchainError(f"tracker {host}:{port} has no device with key {self.key!r} (registered keys: {known})",
                                 hint="check --key, or start the device's server with --tracker and that key")
        try:
            # The tracker queues a request until a device is free: wait a while, not forever.
            return _within(max(60.0, self.connect_timeout_s), f"tracker {host}:{port}", f"a free {self.key!r} device",
                           lambda: tracker.request(self.key, session_timeout=self.session_timeout_s, max_retry=2))
        except ToolchainError:
            raise
        except Exception as err:
            raise ToolchainError(f"tracker {host}:{port} could not give a {self.key!r} device: {_error_line(err)}",
                                 hint="is the device busy or gone?") from None


def _within(seconds: float, who: str, what: str, call: Callable[[], Any]) -> Any:
    """`call()`, or a ToolchainError if it has not returned after `seconds`.

    TVM's connect and tracker calls block in C++ without a timeout (e.g. on a port that accepts
    connections but is no RPC server); they run in a daemon thread so that the command can end.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as err:  # handed to the caller's thread
            box["error"] = err

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise ToolchainError(f"{who} did not complete {what} within {seconds:.0f} s",
                             hint="is it a TVM RPC server/tracker, and is the device up?")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _error_line(err: BaseException) -> str:
    text = str(err).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # TVM errors end with the actual message; tracebacks come first.
    return lines[-1] if lines else type(err).__name__


@dataclass
class RemoteMeasurement:
    device: str
    emulated: bool
    latency: LatencyStats
    max_abs_err: float
    max_rel_err: float
    tolerance: float  # on max_rel_err (passes.verify.compare)
    output_shape: tuple[int, ...]
    upload_s: float
    output: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "emulated": self.emulated,
            **self.latency.to_dict(),
            "max_abs_err": self.max_abs_err,
            "max_rel_err": self.max_rel_err,
            "tolerance": self.tolerance,
            "output_shape": list(self.output_shape),
            "upload_s": self.upload_s,
        }


def _load_remote(session: Any, lib_path: Path, device: Device) -> Any:
    try:
        session.upload(str(lib_path))
        return session.load_module(lib_path.name)
    except Exception as err:
        arch = elf_machine(lib_path)
        raise ToolchainError(
            f"device {device.label} could not load {lib_path.name} (built for {arch or 'an unknown format'}): "
            f"{_error_line(err)}",
            hint="build it for the device's architecture (e.g. --target arm for aarch64 boards)",
        ) from None


def measure_remote_all(
    libraries: Mapping[str, tuple[str | Path, np.ndarray]],
    example_input: np.ndarray,
    device: Device,
    *,
    tolerance: float = 1e-4,
    warmup: int = 2,
    repeat: int = 15,
    number: int = 1,
) -> dict[str, RemoteMeasurement]:
    """Upload and load every library ({name: (path, reference output)}), check each output
    against its reference (`passes.verify.compare`: max relative error <= `tolerance`, else
    `VerificationError`), then time them on the device in alternation: `repeat` rounds of one
    sample per library (`number` calls each, timed by the device-side `time_evaluator`), so that
    the device's changing state affects all alike. median/p90 are over the samples.
    """
    from tvm import relax
    import tvm

    for path, _ in libraries.values():
        if not Path(path).is_file():
            raise OptionError(f"library {path} does not exist", hint="build it first (rwdeploy compile)")
    session = device.connect()
    dev = session.cpu()
    x_np = np.ascontiguousarray(example_input, dtype=np.float32)
    loaded: dict[str, tuple[Path, Any, float, Closeness, np.ndarray]] = {}
    for name, (path, reference) in libraries.items():
        lib_path = Path(path)
        t0 = time.perf_counter()
        lib = _load_remote(session, lib_path, device)
        upload_s = time.perf_counter() - t0
        try:
            vm = relax.VirtualMachine(lib, dev)
            x = tvm.runtime.tensor(x_np, dev)
            for _ in range(max(1, warmup)):
                y = vm["main"](x)
            if not hasattr(y, "numpy"):
                raise ToolchainError(f"{lib_path.name}: main returned a tuple, which RPC cannot fetch",
                                     hint="import the model with unwrap_unit_return_tuple=True")
            out = y.numpy()
            timer = vm.time_evaluator("main", dev, number=number, repeat=1, min_repeat_ms=0)
        except ToolchainError:
            raise
        except Exception as err:
            raise ToolchainError(f"running {lib_path.name} on {device.label} failed: {_error_line(err)}",
                                 hint="see the device's RPC server log") from None
        check = compare(np.asarray(reference, dtype=np.float32), out, tolerance=tolerance)
        if not check.passed:
            raise VerificationError(
                f"{lib_path.name} on {device.label}: output differs from torch "
                f"({check.mismatch or f'max relative error {check.max_rel:.3g} > tolerance {tolerance:g}'})",
                hint="the build is wrong for this device; report it with --debug")
        loaded[name] = (lib_path, (timer, x), upload_s, check, out)
    samples: dict[str, list[float]] = {name: [] for name in loaded}
    try:
        for _ in range(repeat):
            for name, (_, (timer, x), *_rest) in loaded.items():
                samples[name].extend(timer(x).results)
    except Exception as err:
        raise ToolchainError(f"timing on {device.label} failed: {_error_line(err)}",
                             hint="see the device's RPC server log") from None
    return {name: RemoteMeasurement(device=device.label, emulated=device.emulated,
                                    latency=LatencyStats.from_samples(samples[name], warmup),
                                    max_abs_err=check.max_abs, max_rel_err=check.max_rel, tolerance=tolerance,
                                    output_shape=tuple(out.shape), upload_s=upload_s, output=out)
            for name, (_, _, upload_s, check, out) in loaded.items()}


def measure_remote(lib_path: str | Path, example_input: np.ndarray, reference_output: np.ndarray, device: Device,
                   **options: Any) -> RemoteMeasurement:
    """`measure_remote_all` for one library."""
    return measure_remote_all({"model": (lib_path, reference_output)}, example_input, device, **options)["model"]
