"""Operator CLI for the inventory: devices and their tags, saved groups, the firmware lifecycle."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from orchestrator.cli.rollout_cmds import (
    ApiUrl,
    Token,
    connect,
    console,
    fail,
    firmware_app,
    parse_labels,
    short_time,
)

devices_app = typer.Typer(help="Device inventory.", no_args_is_help=True)
group_app = typer.Typer(
    help="Saved groups: named device filters that rollouts can target.", no_args_is_help=True
)


# ---------------------------------------------------------------- devices
@devices_app.command("list")
def devices_list(
    model: str = typer.Option(None, help="only devices of this model"),
    version: str = typer.Option(None, help="only devices running this version"),
    label: list[str] = typer.Option([], help="key:value label filter (repeat)"),
    tag: list[str] = typer.Option([], help="operator tag filter (repeat)"),
    online: bool = typer.Option(None, "--online/--offline", help="only online or only offline devices"),
    limit: int = typer.Option(50, min=1),
    api_url: ApiUrl = None,
    token: Token = None,
) -> None:
    """Devices ordered by id."""
    params: dict[str, Any] = {"label": label} if label else {}
    if tag:
        params["tag"] = tag
    if online is not None:
        params["online"] = online
    if model:
        params["model"] = model
    if version:
        params["version"] = version
    shown = 0
    with connect(api_url, token) as client:
        table = Table("id", "model", "version", "online", "labels", "tags", "last seen")
        for d in client.pages("/v1/devices", params, limit):
            labels = ",".join(f"{k}:{v}" for k, v in sorted(d["labels"].items()))
            table.add_row(
                d["id"],
                d["model"],
                d["firmware_version"],
                "yes" if d["online"] else "no",
                labels,
                ",".join(d.get("tags", [])),
                short_time(d["last_seen"]),
            )
            shown += 1
    console.print(table)
    more = " (raise --limit for more)" if shown == limit else ""
    console.print(f"{shown} devices shown{more}", highlight=False)


@devices_app.command("tag")
def devices_tag(
    device_ids: list[str] = typer.Argument(..., help="device ids"),
    add: list[str] = typer.Option([], "--add", help="tag to add (repeat)"),
    remove: list[str] = typer.Option([], "--remove", help="tag to remove (repeat)"),
    api_url: ApiUrl = None,
    token: Token = None,
) -> None:
    """Add or remove operator tags (devices never change these; their labels are their own)."""
    if not add and not remove:
        raise fail("give --add TAG or --remove TAG (repeatable)")
    with connect(api_url, token) as client:
        result = client.request(
            "POST", "/v1/devices/tags", json={"device_ids": device_ids, "add": add, "remove": remove}
        )
    console.print(f"tags changed on {result['devices']} device(s)", highlight=False)


# ---------------------------------------------------------------- groups
@group_app.command("create")
def group_create(
    name: str,
    model: str = typer.Option(None, help="only devices of this model"),
    tag: list[str] = typer.Option([], help="operator tag every device must carry (repeat)"),
    label: list[str] = typer.Option([], help="k=v label every device must report (repeat)"),
    versions: str = typer.Option(None, help="running versions that qualify, e.g. '>=1.0,<1.1'"),
    api_url: ApiUrl = None,
    token: Token = None,
) -> None:
    """Save a named device filter; `fleet rollout create --group NAME` targets it."""
    device_filter: dict[str, Any] = {"tags": tag, "labels": parse_labels(label)}
    if model:
        device_filter["model"] = model
    if versions:
        device_filter["versions"] = versions
    with connect(api_url, token) as client:
        group = client.request("POST", "/v1/groups", json={"name": name, "filter": device_filter})
    console.print(f"group [bold]{group['name']}[/] selects {group['devices']} device(s) now", highlight=False)


@group_app.command("list")
def group_list(api_url: ApiUrl = None, token: Token = None) -> None:
    """Saved groups with how many devices each selects now."""
    with connect(api_url, token) as client:
        groups = client.request("GET", "/v1/groups")
    table = Table("name", "filter", "devices", "created")
    for g in groups:
        parts = [f"{k}={v}" for k, v in sorted(g["filter"].items())]
        table.add_row(g["name"], " ".join(parts), str(g["devices"]), short_time(g["created_at"]))
    console.print(table)


@group_app.command("delete")
def group_delete(name: str, api_url: ApiUrl = None, token: Token = None) -> None:
    """Remove a saved group (rollouts that targeted it keep their copy of its filter)."""
    with connect(api_url, token) as client:
        client.request("DELETE", f"/v1/groups/{name}")
    console.print(f"group {name} deleted", highlight=False)


# ---------------------------------------------------------------- firmware lifecycle
@firmware_app.command("deprecate")
def firmware_deprecate(firmware_id: int, api_url: ApiUrl = None, token: Token = None) -> None:
    """No new rollout may use this image; rollouts using it go on."""
    with connect(api_url, token) as client:
        fw = client.request("POST", f"/v1/firmware/{firmware_id}/deprecate")
    console.print(f"firmware {fw['id']} ({fw['model']} {fw['version']}) is deprecated", highlight=False)


@firmware_app.command("delete")
def firmware_delete(firmware_id: int, api_url: ApiUrl = None, token: Token = None) -> None:
    """Delete an image that no rollout refers to (else deprecate it)."""
    with connect(api_url, token) as client:
        client.request("DELETE", f"/v1/firmware/{firmware_id}")
    console.print(f"firmware {firmware_id} deleted", highlight=False)
