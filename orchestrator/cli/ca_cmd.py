"""``fleet ca``: a certificate authority for device identities (mutual TLS) and server certificates."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from orchestrator import pki

ca_app = typer.Typer(
    help="Certificates: device identities (mutual TLS) and server certificates.", no_args_is_help=True
)
console = Console()
CaDir = typer.Option(Path("var/ca"), "--dir", help="where the CA key and certificate live")


@ca_app.command("init")
def ca_init(
    directory: Path = CaDir,
    name: str = typer.Option("fleet device CA", help="the CA's common name"),
    days: int = typer.Option(3650, min=1),
    force: bool = typer.Option(
        False, "--force", help="replace an existing CA (invalidates its certificates)"
    ),
) -> None:
    """Create the CA key (0600) and self-signed certificate."""
    files = pki.init_ca(directory, name=name, days=days, force=force)
    console.print(f"CA certificate {files.cert}, key {files.key} (keep it offline in production)")


@ca_app.command("issue")
def ca_issue(
    devices: list[str] = typer.Argument(None, help="device ids: each becomes a certificate's common name"),
    count: int = typer.Option(0, min=0, help="also PREFIX00000 … for this many simulated devices"),
    prefix: str = typer.Option("sim-", help="with --count: device ids are PREFIX + zero-padded index"),
    directory: Path = CaDir,
    out: Path = typer.Option(None, help="output directory (default <dir>/devices)"),
    days: int = typer.Option(825, min=1),
) -> None:
    """Issue client certificates and keys (``DEVICE.crt``, ``DEVICE.key``), one per device."""
    from device_sim.fleet import FleetConfig

    ids = list(devices or []) + (FleetConfig(devices=count, id_prefix=prefix).ids() if count else [])
    if not ids:
        raise typer.BadParameter("name at least one device id, or --count N")
    for device in ids:
        files = pki.issue_device(directory, device, out, days=days)
    console.print(f"{len(ids)} device certificate(s) in {files.cert.parent}")


@ca_app.command("server")
def ca_server(
    name: str = typer.Argument(..., help="the server's host name (e.g. mosquitto, fleet.example.com)"),
    alt: list[str] = typer.Option([], "--alt", help="another host name or IP address (repeat)"),
    directory: Path = CaDir,
    out: Path = typer.Option(None, help="output directory (default <dir>/servers)"),
    days: int = typer.Option(825, min=1),
) -> None:
    """Issue a server certificate (broker TLS listener, API HTTPS)."""
    files = pki.issue_server(directory, name, alt, out, days=days)
    console.print(f"{name}: certificate {files.cert}, key {files.key}")
