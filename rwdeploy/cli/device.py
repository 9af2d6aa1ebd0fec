"""`rwdeploy device arm-emulator start|stop|status|provision`: the emulated aarch64 device."""
from __future__ import annotations

import json

import click

from rwdeploy.runtime import arm_emulator

_home_option = click.option(
    "--home", "home_dir", default=None, type=click.Path(file_okay=False),
    help="Cache folder of the emulator (default: $RWDEPLOY_A64_HOME or ~/.cache/rwdeploy/a64).",
)


def _progress(message: str) -> None:
    click.echo(f"arm-emulator: {message}", err=True)


def _print_status(st: arm_emulator.EmulatorStatus, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(st.to_dict(), indent=2))
        return
    click.echo(f"home:        {st.home}")
    click.echo(f"provisioned: {'yes' if st.provisioned else 'no'}")
    if st.missing_host_tools:
        click.echo(f"missing:     {', '.join(st.missing_host_tools)}")
    if st.running:
        via = f", via tracker {st.tracker} key {st.key}" if st.tracker else ""
        click.echo(f"running:     yes, pid {st.pid}, rpc {st.address}{via}, threads {st.threads}")
    else:
        click.echo("running:     no")
    click.echo(f"log:         {st.log}")


@click.group("device")
def command() -> None:
    """Devices to measure on."""


@command.group("arm-emulator")
def arm_emulator_group() -> None:
    """An emulated aarch64 device (qemu-user + TVM RPC) for machines without ARM hardware.

    Latency measured on it is emulated, not ARM latency; `compile --target arm` reports the
    aarch64 instruction count per inference beside it as the reproducible cost figure.
    """


@arm_emulator_group.command("provision")
@_home_option
def provision_cmd(home_dir: str | None) -> None:
    """Install/download everything the emulator needs (idempotent, cached)."""
    arm_emulator.provision(home_dir, progress=_progress)
    _progress("provisioned")


@arm_emulator_group.command("start")
@_home_option
@click.option("--port", type=int, default=None, help="RPC port on 127.0.0.1 (default: first free from 9190).")
@click.option("--threads", type=int, default=1, show_default=True, help="TVM threads on the emulated device.")
@click.option("--tracker", default=None, metavar="HOST:PORT",
              help="Register with this TVM RPC tracker (then it takes only sessions brokered by the tracker).")
@click.option("--key", default="arm-emulator", show_default=True, help="Device key announced to --tracker.")
def start_cmd(home_dir: str | None, port: int | None, threads: int, tracker: str | None, key: str) -> None:
    """Provision if needed and start the RPC server under qemu-aarch64."""
    st = arm_emulator.start(home_dir, port=port, threads=threads, tracker=tracker, key=key, progress=_progress)
    via = f" via tracker {st.tracker} key {st.key}" if st.tracker else ""
    click.echo(f"arm emulator running: rpc {st.address}{via} (pid {st.pid})")


@arm_emulator_group.command("stop")
@_home_option
def stop_cmd(home_dir: str | None) -> None:
    """Stop the RPC server."""
    was_running = arm_emulator.stop(home_dir)
    click.echo("arm emulator stopped" if was_running else "arm emulator was not running")


@arm_emulator_group.command("status")
@_home_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status_cmd(home_dir: str | None, as_json: bool) -> None:
    """Whether the emulator is provisioned and running."""
    _print_status(arm_emulator.status(home_dir), as_json)
