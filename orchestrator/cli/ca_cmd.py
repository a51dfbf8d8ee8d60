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
    device: str = typer.Argument(
        ..., help="device id: it becomes the certificate's common name and MQTT user"
    ),
    directory: Path = CaDir,
    out: Path = typer.Option(None, help="output directory (default <dir>/devices)"),
    days: int = typer.Option(825, min=1),
) -> None:
    """Issue a device's client certificate and key (``DEVICE.crt``, ``DEVICE.key``)."""
    files = pki.issue_device(directory, device, out, days=days)
    console.print(f"{device}: certificate {files.cert}, key {files.key}")


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
