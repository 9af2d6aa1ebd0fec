"""The device the `arm` targets' libraries are measured on: over TVM RPC, or the emulated one.

With `--rpc HOST:PORT` (or `--tracker HOST:PORT --key KEY`) the built libraries run on that
device. Without either, they run on the emulated aarch64 device (`arm_emulator`), and every
result says `emulated: true`; beside the emulated latency go aarch64 instructions per
inference, the figure that is reproducible across machines and runs.

If `arm_device` had to start the emulator, it stops it again afterwards, so a compile leaves no
process behind; an emulator the user started (`rwdeploy device arm-emulator start`) is reused
and left running. The compile stage that uses this is `rwdeploy.tvm_stages.stage_arm_measure`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from rwdeploy.runtime import arm_emulator
from rwdeploy.runtime.rpc import Device

Progress = Callable[[str], None]


@contextlib.contextmanager
def arm_device(
    rpc: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
    *,
    progress: Progress = lambda _: None,
) -> Iterator[tuple[Device, int | None]]:
    """The device to measure on, and its thread count when known (the emulator's)."""
    if rpc is not None or tracker is not None:
        yield Device(rpc=rpc, tracker=tracker, key=key), None
        return
    progress("no --rpc/--tracker given: measuring on the emulated aarch64 device (qemu-user); "
             "its latency is emulated, not ARM latency: compare the instruction counts")
    before = arm_emulator.status()
    st = before if before.running else arm_emulator.start(progress=progress)
    # A server registered with a tracker takes only tracker-brokered sessions.
    device = Device(tracker=st.tracker, key=st.key, emulated=True) if st.tracker else \
        Device(rpc=st.address, emulated=True)
    try:
        yield device, st.threads
    finally:
        if not before.running:
            arm_emulator.stop()
            progress("stopped the emulated device (start it with `rwdeploy device arm-emulator start` "
                     "to keep it between runs)")

