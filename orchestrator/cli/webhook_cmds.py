"""``fleet webhook add|list|remove|deliveries``: endpoints told of state changes."""

from __future__ import annotations

import typer
from rich.table import Table

from orchestrator.cli.rollout_cmds import ApiUrl, Token, connect, console, short_time

webhook_app = typer.Typer(help="Webhooks: HTTPS endpoints told of rollout and device-update changes.")


@webhook_app.command("add")
def add(
    url: str,
    event: list[str] = typer.Option(
        ["rollout", "device_update"], help="rollout and/or device_update (repeat)"
    ),
    description: str = typer.Option(None),
    api_url: ApiUrl = None,
    token: Token = None,
) -> None:
    """Register an endpoint and print its signing secret (shown only now)."""
    with connect(api_url, token) as client:
        body = {"url": url, "events": event, **({"description": description} if description else {})}
        hook = client.request("POST", "/v1/webhooks", json=body)
    console.print(
        f"webhook [bold]{hook['id']}[/] → {hook['url']} ({', '.join(hook['events'])})", highlight=False
    )
    console.print(f"signing secret (shown only now): {hook['secret']}", highlight=False)


@webhook_app.command("list")
def list_(api_url: ApiUrl = None, token: Token = None) -> None:
    """Registered endpoints."""
    with connect(api_url, token) as client:
        hooks = client.request("GET", "/v1/webhooks")
    table = Table("id", "url", "events", "active", "created")
    for h in hooks:
        table.add_row(
            str(h["id"]),
            h["url"],
            ",".join(h["events"]),
            "yes" if h["active"] else "no",
            short_time(h["created_at"]),
        )
    console.print(table)


@webhook_app.command("remove")
def remove(webhook_id: int, api_url: ApiUrl = None, token: Token = None) -> None:
    """Stop delivering to an endpoint (its deliveries stay readable)."""
    with connect(api_url, token) as client:
        client.request("DELETE", f"/v1/webhooks/{webhook_id}")
    console.print(f"webhook {webhook_id} deactivated", highlight=False)


@webhook_app.command("deliveries")
def deliveries(
    webhook_id: int,
    status: str = typer.Option(None, help="PENDING, DELIVERED or FAILED"),
    limit: int = typer.Option(50, min=1),
    api_url: ApiUrl = None,
    token: Token = None,
) -> None:
    """What was delivered to an endpoint, newest first."""
    params = {"status": status.upper()} if status else {}
    table = Table("id", "event", "kind", "status", "attempts", "last", "delivered")
    with connect(api_url, token) as client:
        for d in client.pages(f"/v1/webhooks/{webhook_id}/deliveries", params, limit):
            last = str(d["last_status"] or d["last_error"] or "-")
            table.add_row(
                str(d["id"]),
                str(d["event_id"]),
                d["kind"],
                d["status"],
                str(d["attempts"]),
                last[:40],
                short_time(d["delivered_at"]),
            )
    console.print(table)
