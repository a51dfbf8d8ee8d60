"""``fleet audit``: the audit log through the API, newest first."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from orchestrator.cli.rollout_cmds import ApiUrl, Token, connect, console, fail, short_time


def audit(
    action: str = typer.Option(None, help="e.g. rollout.pause, or rollout.* for every rollout action"),
    actor: str = typer.Option(None, help="e.g. api:ops-alice, system, scheduler, cli:root"),
    target: str = typer.Option(None, help="KIND or KIND:ID, e.g. rollout:7 or firmware"),
    outcome: str = typer.Option(None, help="ok, or an error code such as forbidden or conflict"),
    limit: int = typer.Option(50, min=1),
    api_url: ApiUrl = None,
    token: Token = None,
) -> None:
    """Who did what, when, to which object, and how it ended."""
    params: dict[str, Any] = {}
    for key, value in (("action", action), ("actor", actor), ("outcome", outcome)):
        if value:
            params[key] = value
    if target:
        kind, _, ident = target.partition(":")
        if not kind:
            raise fail(f"--target {target!r}: write KIND or KIND:ID, e.g. rollout:7")
        params["target_kind"] = kind
        if ident:
            params["target_id"] = ident
    table = Table("when", "actor", "action", "target", "outcome", "detail")
    shown = 0
    with connect(api_url, token) as client:
        for e in client.pages("/v1/audit", params, limit):
            what = (
                f"{e['target_kind']}:{e['target_id']}" if e.get("target_id") else e.get("target_kind") or "-"
            )
            detail = ", ".join(f"{k}={v}" for k, v in sorted((e.get("detail") or {}).items()))
            table.add_row(
                short_time(e["created_at"]), e["actor"], e["action"], what, e["outcome"], detail[:80]
            )
            shown += 1
    console.print(table)
    more = " (raise --limit for more)" if shown == limit else ""
    console.print(f"{shown} entries shown{more}", highlight=False)
