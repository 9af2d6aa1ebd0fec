"""An emulated aarch64 device on an x86 Linux machine: qemu-user + the aarch64 TVM runtime.

What it provides (all under one cache folder, `~/.cache/rwdeploy/a64` or `$RWDEPLOY_A64_HOME`):
  site/     aarch64 wheels of apache-tvm (same version as the host's), apache-tvm-ffi, numpy,
            cloudpickle, psutil, unpacked with `pip install --target` (runtime-only: the
            229 MB compiler library is deleted and TVM_USE_RUNTIME_LIB=1 is set)
  root/     a Debian arm64 Python 3.11 userland (`apt-get download pkg:arm64` + `dpkg -x`,
            no chroot, no debootstrap), used as qemu's `-L` prefix
  plugins/  libinsn_count.so, a qemu TCG plugin (runtime/a64/insn_count.c) compiled against
            qemu-plugin.h from Debian's qemu source package
  rt/       vm_runner (runtime/a64/vm_runner.cc) cross-built for aarch64, with the runtime libs
  apt/      a private apt configuration (arm64 binary + deb-src lists) so the host's apt
            setup is never modified
  server/   pid, port and log of the running RPC server

`provision()` builds what is missing (each step is skipped when its output is present and
was made for the same versions); `start()` launches the TVM RPC server under qemu on
127.0.0.1; `count_instructions()` runs the C++ runner under the plugin.
Latency measured here is emulated latency, not ARM latency; the instruction count is the
deterministic figure to compare variants with.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from rwdeploy.errors import OptionError, ToolchainError
from rwdeploy.io.atomic import atomic_dir

Progress = Callable[[str], None]

HOST_TOOLS: dict[str, str] = {  # executable -> Debian package that provides it
    "qemu-aarch64": "qemu-user",
    "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
    "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu",
    "gcc": "gcc",
}
# The arm64 Python 3.11 interpreter, its stdlib and the shared libraries they and the TVM
# runtime load (libstdc++, libgomp). Found by walking the Depends of python3.11 on bookworm.
ARM64_PYTHON_DEBS: tuple[str, ...] = (
    "gcc-12-base", "libacl1", "libbz2-1.0", "libc6", "libcom-err2", "libcrypt1", "libdb5.3",
    "libexpat1", "libffi8", "libgcc-s1", "libgssapi-krb5-2", "libk5crypto3", "libkeyutils1",
    "libkrb5-3", "libkrb5support0", "liblzma5", "libmd0", "libncursesw6", "libnsl2",
    "libpcre2-8-0", "libpython3.11-minimal", "libpython3.11-stdlib", "libreadline8",
    "libselinux1", "libsqlite3-0", "libssl3", "libtinfo6", "libtirpc3", "libuuid1", "libzstd1",
    "python3.11-minimal", "python3.11", "libstdc++6", "libgomp1", "zlib1g",
)
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SUITE = "bookworm"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
READY_MARK = "RWDEPLOY_RPC_READY"
DEFAULT_PORT = 9190
NATIVE_SOURCES = Path(__file__).resolve().parent / "a64"


def default_home() -> Path:
    return Path(os.environ.get("RWDEPLOY_A64_HOME", "~/.cache/rwdeploy/a64")).expanduser()


def _host_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _wheel_requirements() -> list[str]:
    """The aarch64 wheels, pinned to the host's versions where the host has them.

    The host and the device must speak the same RPC protocol and read the same module
    format, so apache-tvm (and tvm-ffi) must match exactly.
    """
    reqs = []
    for dist in ("apache-tvm", "apache-tvm-ffi", "numpy", "cloudpickle", "psutil"):
        version = _host_version(dist)
        if dist.startswith("apache-tvm") and version is None:
            raise ToolchainError(f"{dist} is not installed on the host", hint="pip install apache-tvm")
        reqs.append(f"{dist}=={version}" if version else dist)
    return reqs


@dataclass(frozen=True)
class EmulatorHome:
    """Where the emulated device's files live."""

    root_dir: Path

    @property
    def site(self) -> Path:
        return self.root_dir / "site"

    @property
    def userland(self) -> Path:
        return self.root_dir / "root"

    @property
    def python(self) -> Path:
        return self.userland / "usr/bin/python3.11"

    @property
    def plugin(self) -> Path:
        return self.root_dir / "plugins/libinsn_count.so"

    @property
    def runner(self) -> Path:
        return self.root_dir / "rt/vm_runner"

    @property
    def apt(self) -> Path:
        return self.root_dir / "apt"

    @property
    def server_dir(self) -> Path:
        return self.root_dir / "server"

    @property
    def pid_file(self) -> Path:
        return self.server_dir / "pid"

    @property
    def info_file(self) -> Path:
        return self.server_dir / "server.json"

    @property
    def log_file(self) -> Path:
        return self.server_dir / "server.log"


def home(path: str | os.PathLike | None = None) -> EmulatorHome:
    return EmulatorHome(Path(path).expanduser() if path else default_home())


# ---------------------------------------------------------------------------------------------
# Provisioning
# ---------------------------------------------------------------------------------------------


def _run(cmd: Sequence[str], what: str, hint: str, *, cwd: Path | None = None,
         env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run a set-up command; a failure becomes one ToolchainError line with its last stderr line.

    Returns stdout + stderr (apt reports some failures only as warnings there)."""
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise ToolchainError(f"{what}: {cmd[0]} not found", hint=hint) from None
    except subprocess.TimeoutExpired:
        raise ToolchainError(f"{what}: timed out after {timeout:.0f} s", hint=hint) from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines()
                 if ln.strip() and not ln.startswith(("W:", "WARNING:"))]
        last = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise ToolchainError(f"{what} failed: {last}", hint=hint)
    return proc.stdout + proc.stderr


def missing_host_tools() -> dict[str, str]:
    return {exe: pkg for exe, pkg in HOST_TOOLS.items() if shutil.which(exe) is None}


def ensure_host_tools(progress: Progress) -> None:
    """qemu-user and the aarch64 cross compilers; apt-get installs them when we are root."""
    missing = missing_host_tools()
    if not missing:
        return
    packages = sorted(set(missing.values()))
    install = "apt-get install -y " + " ".join(packages)
    if os.geteuid() != 0:
        raise ToolchainError(
            f"the arm emulator needs {', '.join(sorted(missing))}", hint=f"run: sudo {install}"
        )
    progress(f"installing {' '.join(packages)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", *packages],
         "apt-get install", f"run `{install}` yourself (apt-get update first if the package is unknown)",
         env=env)
    still = missing_host_tools()
    if still:
        raise ToolchainError(f"{', '.join(sorted(still))} still missing after apt-get install",
                             hint=f"run: {install}")


def _apt_options(apt_dir: Path) -> list[str]:
    """A private apt configuration: arm64 binaries and Debian sources, own lists and cache.

    Nothing in /etc/apt or dpkg's architecture list is touched, and no root is needed for
    `apt-get download` / `apt-get source --download-only`.
    """
    return [
        "-o", f"Dir::Etc::SourceList={apt_dir / 'sources.list'}",
        "-o", f"Dir::Etc::SourceParts={apt_dir / 'sources.list.d'}",
        "-o", f"Dir::State::Lists={apt_dir / 'lists'}",
        "-o", f"Dir::Cache::Archives={apt_dir / 'archives'}",
        "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
        "-o", "APT::Architectures::=arm64",
        "-o", "Debug::NoLocking=1",
        # As root, apt would drop to user _apt, which cannot write into our cache folders.
        *(["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []),
    ]


def _have_apt_lists(apt: Path) -> bool:
    return any((apt / "lists").glob("*Sources*")) and any((apt / "lists").glob("*arm64_Packages*"))


def _ensure_apt_lists(h: EmulatorHome, progress: Progress) -> list[str]:
    apt = h.apt
    opts = _apt_options(apt)
    if _have_apt_lists(apt):
        return opts
    for sub in ("lists/partial", "archives/partial", "sources.list.d"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    signed = f"signed-by={DEBIAN_KEYRING}"
    (apt / "sources.list").write_text(
        f"deb [arch=arm64 {signed}] {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n"
        f"deb-src [{signed}] {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n"
    )
    progress(f"fetching Debian {DEBIAN_SUITE} arm64 and source package lists (private apt config)")
    what, hint = "apt-get update (arm64 + deb-src lists)", f"check that {DEBIAN_MIRROR} is reachable"
    output = _run(["apt-get", *opts, "update", "-q"], what, hint)
    if not _have_apt_lists(apt):  # apt-get update exits 0 when a mirror cannot be reached
        lines = output.splitlines()
        # "Err:1 URL" is followed by the reason ("Could not resolve 'host'") on the next line.
        errors = [" ".join(lines[i:i + 2]).strip() for i, ln in enumerate(lines) if ln.startswith(("Err:", "E:"))]
        raise ToolchainError(f"{what} failed: {errors[0] if errors else 'no package lists were fetched'}", hint=hint)
    return opts


def _stamp_ok(folder: Path, key: dict[str, Any]) -> bool:
    stamp = folder / ".rwdeploy-stamp.json"
    try:
        return json.loads(stamp.read_text()) == key
    except (OSError, ValueError):
        return False


def _write_stamp(folder: Path, key: dict[str, Any]) -> None:
    (folder / ".rwdeploy-stamp.json").write_text(json.dumps(key, sort_keys=True))


def _provision_site(h: EmulatorHome, progress: Progress) -> None:
    reqs = _wheel_requirements()
    key = {"wheels": reqs}
    if _stamp_ok(h.site, key):
        return
    progress(f"downloading aarch64 wheels: {' '.join(reqs)}")
    platform = ["--only-binary=:all:", "--platform", "manylinux_2_28_aarch64", "--python-version",
                "3.11", "--implementation", "cp", "--abi", "cp311"]
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    hint = "check access to PyPI (pip download --platform manylinux_2_28_aarch64)"
    with tempfile.TemporaryDirectory(dir=h.root_dir) as wheels, atomic_dir(h.site) as site:
        _run([*pip, "download", *platform, "-d", wheels, *reqs], "pip download of aarch64 wheels", hint)
        _run([*pip, "install", *platform, "--no-index", "--find-links", wheels, "--target", str(site), *reqs],
             "pip install --target of aarch64 wheels", hint)
        # The compiler library is 229 MB and never used on the device.
        (site / "tvm/lib/libtvm_compiler.so").unlink(missing_ok=True)
        _write_stamp(site, key)


def _provision_userland(h: EmulatorHome, progress: Progress) -> None:
    key = {"suite": DEBIAN_SUITE, "debs": list(ARM64_PYTHON_DEBS)}
    if _stamp_ok(h.userland, key) and h.python.exists():
        return
    opts = _ensure_apt_lists(h, progress)
    progress(f"downloading {len(ARM64_PYTHON_DEBS)} Debian arm64 packages for Python 3.11")
    with tempfile.TemporaryDirectory(dir=h.root_dir) as debs, atomic_dir(h.userland) as root:
        _run(["apt-get", *opts, "download", "-q", *(f"{p}:arm64" for p in ARM64_PYTHON_DEBS)],
             "apt-get download of arm64 packages", f"check that {DEBIAN_MIRROR} is reachable", cwd=Path(debs))
        for deb in sorted(Path(debs).glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(root)], f"dpkg -x {deb.name}", "is dpkg installed?")
        _write_stamp(root, key)


def _qemu_version() -> str:
    out = _run(["qemu-aarch64", "--version"], "qemu-aarch64 --version", "apt-get install qemu-user")
    return out.splitlines()[0].strip()


def _provision_plugin(h: EmulatorHome, progress: Progress) -> None:
    folder = h.plugin.parent
    source = NATIVE_SOURCES / "insn_count.c"
    key = {"qemu": _qemu_version(), "source": source.read_text()}
    if _stamp_ok(folder, key) and h.plugin.exists():
        return
    opts = _ensure_apt_lists(h, progress)
    progress("fetching Debian's qemu source for qemu-plugin.h and building the instruction-count plugin")
    with tempfile.TemporaryDirectory(dir=h.root_dir) as src, atomic_dir(folder) as out:
        _run(["apt-get", *opts, "source", "--download-only", "-q", "qemu"], "apt-get source qemu",
             f"check that {DEBIAN_MIRROR} is reachable", cwd=Path(src))
        tarballs = sorted(Path(src).glob("qemu_*.orig.tar.*"))
        if not tarballs:
            raise ToolchainError("apt-get source qemu gave no orig tarball", hint="retry provisioning")
        # The plugin API header is all we need from the 23 MB tarball.
        _run(["tar", "-C", src, "-xf", str(tarballs[0]), "--wildcards", "*/include/qemu/qemu-plugin.h"],
             "extracting qemu-plugin.h", "is tar (with xz) installed?")
        header = next(Path(src).glob("*/include/qemu/qemu-plugin.h"))
        _run(["gcc", "-O2", "-shared", "-fPIC", f"-I{header.parent}", str(source), "-o", str(out / h.plugin.name)],
             "building the qemu instruction-count plugin", "apt-get install gcc")
        _write_stamp(out, key)


def _provision_runner(h: EmulatorHome, progress: Progress) -> None:
    folder = h.runner.parent
    source = NATIVE_SOURCES / "vm_runner.cc"
    key = {"wheels": _wheel_requirements(), "source": source.read_text()}
    if _stamp_ok(folder, key) and h.runner.exists():
        return
    progress("cross-building the C++ VM runner for aarch64")
    site = h.site
    with atomic_dir(folder) as out:
        for lib in (site / "tvm/lib/libtvm_runtime.so", site / "tvm_ffi/lib/libtvm_ffi.so"):
            shutil.copy2(lib, out / lib.name)
        _run(["aarch64-linux-gnu-g++", "-std=c++17", "-O2", str(source), "-o", str(out / "vm_runner"),
              f"-I{site / 'tvm_ffi/include'}", f"-I{site / 'tvm_ffi/3rdparty/dlpack/include'}",
              f"-L{out}", "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN"],
             "cross-building vm_runner", "apt-get install g++-aarch64-linux-gnu")
        _write_stamp(out, key)


PROVISION_STEPS: tuple[tuple[str, Callable[[EmulatorHome, Progress], None]], ...] = (
    ("aarch64 TVM runtime", _provision_site),
    ("arm64 Python userland", _provision_userland),
    ("instruction-count plugin", _provision_plugin),
    ("C++ VM runner", _provision_runner),
)


def provision(path: str | os.PathLike | None = None, *, progress: Progress = lambda _: None) -> EmulatorHome:
    """Make the emulated device ready; idempotent (a provisioned home costs a few checks)."""
    h = home(path)
    h.root_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    ensure_host_tools(progress)
    for name, step in PROVISION_STEPS:
        step(h, progress)
        progress(f"[{time.monotonic() - t0:5.1f} s] {name}: ready")
    return h


def is_provisioned(h: EmulatorHome) -> bool:
    return all(p.exists() for p in (h.python, h.site / "tvm", h.plugin, h.runner)) and not missing_host_tools()


# ---------------------------------------------------------------------------------------------
# The RPC server
# ---------------------------------------------------------------------------------------------


def _guest_env(h: EmulatorHome, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TVM_", "LD_"))}
    env.update(TVM_USE_RUNTIME_LIB="1", PYTHONPATH=str(h.site), PYTHONNOUSERSITE="1",
               TVM_NUM_THREADS=str(threads), PYTHONDONTWRITEBYTECODE="1")
    return env


@dataclass
class EmulatorStatus:
    home: str
    provisioned: bool
    running: bool
    pid: int | None = None
    host: str | None = None
    port: int | None = None
    threads: int | None = None
    tracker: str | None = None  # set when the server registered with a TVM RPC tracker
    key: str | None = None
    log: str | None = None
    missing_host_tools: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) is not a running server.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _is_our_server(pid: int, h: EmulatorHome) -> bool:
    """The pid file names our qemu server, not an unrelated process that reused the pid."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"qemu-aarch64" in a for a in cmdline) and any(a.endswith(b"rpc_server.py") for a in cmdline) \
        and str(h.userland).encode() in cmdline


def _port_accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def status(path: str | os.PathLike | None = None) -> EmulatorStatus:
    h = home(path)
    st = EmulatorStatus(home=str(h.root_dir), provisioned=is_provisioned(h), running=False,
                        log=str(h.log_file), missing_host_tools=sorted(missing_host_tools()))
    try:
        pid = int(h.pid_file.read_text().strip())
        info = json.loads(h.info_file.read_text())
    except (OSError, ValueError):
        return st
    if _pid_alive(pid) and _is_our_server(pid, h):
        st.running = True
        st.pid, st.host, st.port, st.threads = pid, info["host"], info["port"], info.get("threads")
        st.tracker, st.key = info.get("tracker"), info.get("key")
    return st


def _free_port(host: str, start: int) -> int:
    for port in range(start, start + 100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # Same option as the server's bind, so a port in TIME_WAIT counts as free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise OptionError(f"no free port in {start}..{start + 99} on {host}", hint="pass --port")


def start(
    path: str | os.PathLike | None = None,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    threads: int = 1,
    tracker: str | None = None,
    key: str = "arm-emulator",
    timeout_s: float = 120.0,
    progress: Progress = lambda _: None,
) -> EmulatorStatus:
    """Provision if needed and start the RPC server under qemu; a running server is reused."""
    h = provision(path, progress=progress)
    current = status(path)
    if current.running:
        progress(f"arm emulator already running (pid {current.pid}, {current.address})")
        return current
    chosen = port is None
    if port is None:
        port = _free_port(host, DEFAULT_PORT)
    elif _port_accepts(host, port, timeout=0.5):
        raise OptionError(f"port {port} on {host} is already in use", hint="pass another --port")
    h.server_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        try:
            proc = _launch(h, host, port, threads, tracker, key, timeout_s, progress)
            break
        except _PortTaken:
            # Another server (another home, another user) took the port between our check and
            # the bind: try the next free one if the port was ours to choose.
            if not chosen or attempt == 4:
                raise ToolchainError(f"port {port} on {host} was taken while the arm emulator started",
                                     hint="pass another --port") from None
            port = _free_port(host, port + 1)
    h.info_file.write_text(json.dumps({"host": host, "port": port, "threads": threads, "tracker": tracker,
                                       "key": key if tracker else None}))
    h.pid_file.write_text(str(proc.pid))
    st = status(path)
    progress(f"arm emulator ready: pid {st.pid}, rpc {st.address}, log {h.log_file}")
    return st


class _PortTaken(Exception):
    pass


def _launch(h: EmulatorHome, host: str, port: int, threads: int, tracker: str | None, key: str,
            timeout_s: float, progress: Progress) -> subprocess.Popen:
    """Start the server process and wait for its ready line."""
    cmd = ["qemu-aarch64", "-L", str(h.userland), str(h.python), "-u", str(NATIVE_SOURCES / "rpc_server.py"),
           "--host", host, "--port", str(port)]
    if tracker:
        cmd += ["--tracker", tracker, "--key", key]
    progress(f"starting the TVM RPC server under qemu-aarch64 on {host}:{port}")
    with open(h.log_file, "w") as log:
        # Own session: `stop` ends the server and the per-connection workers it forks together.
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=_guest_env(h, threads), cwd=h.server_dir, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = h.log_file.read_text(errors="replace")
        if READY_MARK in text:
            return proc
        if proc.poll() is not None:
            if "cannot bind to any port" in text or "Address already in use" in text:
                raise _PortTaken()
            tail = [ln for ln in text.splitlines() if ln.strip()][-1:] or ["(empty log)"]
            raise ToolchainError(f"the arm emulator exited during start-up: {tail[0]}", hint=f"see {h.log_file}")
        time.sleep(0.25)
    _terminate_group(proc.pid)
    raise ToolchainError(f"the arm emulator did not become ready in {timeout_s:.0f} s", hint=f"see {h.log_file}")


def _terminate_group(pid: int, grace_s: float = 5.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.1)
    if _pid_alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:  # reap it if it is our child (started in this process)
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop(path: str | os.PathLike | None = None) -> bool:
    """Stop the server; returns False when none was running."""
    h = home(path)
    st = status(path)
    if st.running and st.pid is not None:
        _terminate_group(st.pid)
    h.pid_file.unlink(missing_ok=True)
    h.info_file.unlink(missing_ok=True)
    return st.running


# ---------------------------------------------------------------------------------------------
# Deterministic cost proxy: aarch64 instructions per inference
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstructionCount:
    """Guest instructions per inference, start-up removed, from `repeats` independent measurements."""

    per_inference: int
    samples: tuple[int, ...]
    iterations: tuple[int, int]
    startup: int
    emulated_ms_per_inference: float
    output: np.ndarray = field(repr=False, compare=False)

    @property
    def spread(self) -> float:
        """(max - min) / median of the samples: 0 means perfectly repeatable."""
        return (max(self.samples) - min(self.samples)) / max(1, self.per_inference)

    def to_dict(self) -> dict[str, Any]:
        return {
            "insns_per_inference": self.per_inference,
            "samples": list(self.samples),
            "relative_spread": self.spread,
            "iterations": list(self.iterations),
            "startup_insns": self.startup,
            "emulated_ms_per_inference": self.emulated_ms_per_inference,
            "method": "qemu-aarch64 TCG plugin; (count(N2) - count(N1)) / (N2 - N1), 1 thread",
        }


def _count_once(h: EmulatorHome, so: Path, inp: Path, shape: str, iters: int, work: Path,
                function: str = "main") -> tuple[int, float, Path]:
    count_file = work / f"count_{iters}.txt"
    out_file = work / f"out_{iters}.bin"
    count_file.unlink(missing_ok=True)
    cmd = ["qemu-aarch64", "-L", str(h.userland), "-plugin", f"{h.plugin},out={count_file}",
           str(h.runner), str(so), str(inp), shape, str(iters), str(out_file)]
    env = {**_guest_env(h, 1), "RWDEPLOY_VM_FUNCTION": function}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0 or not count_file.exists():
        msg = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise ToolchainError(f"running {so.name} on the emulated aarch64 device failed: {msg}",
                             hint="is it an aarch64 Relax VM library built with --target arm?")
    ms = 0.0
    for line in proc.stdout.splitlines():
        if line.startswith("mean_ms="):
            ms = float(line.split()[0].split("=", 1)[1])
    return int(count_file.read_text().strip()), ms, out_file


def count_instructions(
    so_path: str | os.PathLike,
    example_input: np.ndarray,
    *,
    path: str | os.PathLike | None = None,
    iterations: tuple[int, int] = (1, 4),
    repeats: int = 2,
    function: str = "main",
) -> InstructionCount:
    """aarch64 instructions per inference of a Relax VM library, counted under qemu.

    `function` is the Relax function run (one argument: the input), "main" for an artifact.

    Each measurement counts a run with N1 and one with N2 inferences (both after the same
    library load, VM set-up and one warm-up call) and divides the difference by N2 - N1, which
    removes start-up. `repeats` independent measurements show how repeatable the figure is.
    """
    n1, n2 = iterations
    if not 0 <= n1 < n2:
        raise OptionError(f"iterations must satisfy 0 <= N1 < N2, got {iterations}")
    h = home(path)
    if not is_provisioned(h):
        raise ToolchainError("the arm emulator is not provisioned",
                             hint="run `rwdeploy device arm-emulator start` (or provision) first")
    so = Path(so_path).resolve()
    x = np.ascontiguousarray(np.asarray(example_input, dtype=np.float32))
    shape = ",".join(str(d) for d in x.shape)
    samples, startups, ms = [], [], []
    with tempfile.TemporaryDirectory(prefix="rwdeploy-insn-") as tmp:
        work = Path(tmp)
        inp = work / "input.bin"
        x.tofile(inp)
        for _ in range(repeats):
            c1, _, _ = _count_once(h, so, inp, shape, n1, work, function)
            c2, ms2, out_file = _count_once(h, so, inp, shape, n2, work, function)
            samples.append((c2 - c1) // (n2 - n1))
            startups.append(c1 - n1 * samples[-1])
            ms.append(ms2)
        output = np.fromfile(out_file, dtype=np.float32)
    samples.sort()
    return InstructionCount(
        per_inference=samples[len(samples) // 2],
        samples=tuple(samples),
        iterations=(n1, n2),
        startup=min(startups),
        emulated_ms_per_inference=float(np.median(ms)),
        output=output,
    )
