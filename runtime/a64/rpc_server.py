"""TVM RPC server for the emulated aarch64 device; runs *inside* qemu-aarch64's Python.

Started by `rwdeploy.runtime.arm_emulator.start`. It needs only the aarch64 TVM runtime on
PYTHONPATH (no rwdeploy, no torch), so it imports nothing from this project.

Why not `python -m tvm.exec.rpc_server`: that launcher re-executes `sys.executable` for its
worker, which is an aarch64 binary the host kernel cannot run without binfmt_misc. The server
loop itself only forks (multiprocessing 'fork'), which qemu-user handles, so we run that loop
in this process.

Usage: python3.11 rpc_server.py --host 127.0.0.1 --port 9190 [--tracker HOST:PORT --key KEY]
Prints "RWDEPLOY_RPC_READY port=N" once listening.
"""
import argparse
import sys

import tvm  # noqa: F401  (runtime-only import: TVM_USE_RUNTIME_LIB=1)
from tvm.rpc import server as tvm_rpc_server


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tracker", default=None, help="HOST:PORT of a TVM RPC tracker to register with")
    parser.add_argument("--key", default="", help="device key announced to the tracker")
    args = parser.parse_args()

    tracker = None
    if args.tracker:
        host, port = args.tracker.rsplit(":", 1)
        tracker = (host, int(port))
    # port_end = port + 1: bind exactly the port the host chose, or fail.
    state = tvm_rpc_server.PopenRPCServerState(
        args.host, args.port, args.port + 1, tracker_addr=tracker, key=args.key
    )
    tvm_rpc_server.PopenRPCServerState.current = state
    print(f"RWDEPLOY_RPC_READY port={state.port}", flush=True)
    state.thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
