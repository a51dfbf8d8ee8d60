"""``fleet broker-users``: the Mosquitto password files of a deployment, one per listener (role)."""

from __future__ import annotations

import os
from pathlib import Path

import typer
from rich.console import Console

from orchestrator.embedded.auth import MqttUser, Role, mosquitto_password_hash

console = Console()
SERVICE_USER = "service"
PORTAL_USER = "portal"


def broker_users(
    out: Path = typer.Option(Path("var/mosquitto"), help="directory for passwords-{device,service,portal}"),
    devices: int = typer.Option(
        0, "--devices", "-n", min=0, help="device users sim-00000 … (for `fleet sim`)"
    ),
    id_prefix: str = typer.Option("sim-", help="device ids are PREFIX + zero-padded index"),
    service_password: str = typer.Option(..., envvar="FLEET_MQTT_PASSWORD", help="password of `service`"),
    portal_password: str = typer.Option(
        ..., envvar="FLEET_PORTAL_MQTT_PASSWORD", help="password of the read-only `portal` user"
    ),
    device_secret: str = typer.Option(
        None,
        envvar="FLEET_DEVICE_PASSWORD_SECRET",
        help="device passwords are HMAC-SHA256(secret, device id), as `fleet sim --password-secret`",
    ),
    mode: str = typer.Option("0600", help="file mode (octal); the broker's user must be able to read them"),
) -> None:
    """Write Mosquitto password files: `service` (service listener), `portal` (WebSocket listener)
    and optionally simulated devices with passwords (device listener).

    The topic ACLs of each listener live in docs/deploy/mosquitto/acl-* (devices by pattern, so no
    per-device lines); devices with client certificates need no password at all.
    """
    from device_sim.fleet import FleetConfig
    from device_sim.mqtt_link import derive_device_password

    if devices and not device_secret:
        raise typer.BadParameter("device users need --device-secret (or FLEET_DEVICE_PASSWORD_SECRET)")
    ids = FleetConfig(devices=devices, id_prefix=id_prefix).ids() if devices else []
    files = {
        Role.SERVICE: [MqttUser(SERVICE_USER, service_password, Role.SERVICE)],
        Role.PORTAL: [MqttUser(PORTAL_USER, portal_password, Role.PORTAL)],
        Role.DEVICE: [MqttUser(d, derive_device_password(device_secret, d), Role.DEVICE) for d in ids],
    }
    out.mkdir(parents=True, exist_ok=True)
    for role, users in files.items():
        path = out / f"passwords-{role.value}"
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as stream:
            stream.write("".join(f"{u.username}:{mosquitto_password_hash(u.password)}\n" for u in users))
        os.replace(tmp, path)
        path.chmod(int(mode, 8))
        console.print(f"wrote {len(users)} {role.value} user(s) to {path}")
