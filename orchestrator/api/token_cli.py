"""``fleet token``: create, list and revoke API tokens (straight against the database)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.config import get_settings
from orchestrator.db import session_scope
from orchestrator.services import token_service
from orchestrator.services.token_service import Role

token_app = typer.Typer(help="API tokens (bearer tokens with a role).", no_args_is_help=True)
err = Console(stderr=True)


@token_app.command("create")
def create(
    role: Role = typer.Option(..., "--role", "-r", help="viewer: GET only; operator: also writes"),
    name: str = typer.Option(..., "--name", "-n", help="who holds it; shown in the audit trail"),
) -> None:
    """Create a token and print its secret on stdout. The secret is not stored: keep it now."""
    with session_scope(get_settings().database_url) as session:
        token, secret = token_service.create_token(session, name=name, role=role)
        err.print(f"token [bold]{token.id}[/] '{token.name}' ({token.role}); it is shown only this once:")
    typer.echo(secret)


@token_app.command("list")
def list_() -> None:
    """Every token: id, name, role, created, last used, revoked."""
    with session_scope(get_settings().database_url) as session:
        table = Table("id", "name", "role", "created", "last used", "revoked")
        for t in token_service.list_tokens(session):
            used = t.last_used_at.isoformat(timespec="seconds") if t.last_used_at else "-"
            table.add_row(
                str(t.id),
                t.name,
                t.role,
                t.created_at.isoformat(timespec="seconds"),
                used,
                "yes" if t.revoked else "no",
            )
        Console().print(table)


@token_app.command("revoke")
def revoke(token_id: int = typer.Argument(..., help="id from `fleet token list`")) -> None:
    """Refuse the token from now on."""
    with session_scope(get_settings().database_url) as session:
        token = token_service.revoke_token(session, token_id)
        err.print(f"token {token.id} '{token.name}' revoked")
