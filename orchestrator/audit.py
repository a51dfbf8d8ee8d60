"""The audit log: every operator and system action, with actor, time, target and outcome.

API actions are recorded by :class:`orchestrator.api.audit_trail.AuditTrail` (one place, so a
new write route cannot forget); actions outside the API (tokens made with the CLI, rollouts the
scheduler starts or the engine halts, supersedes) call :func:`record`. Entries are only ever
inserted: no code path updates or deletes one (retention is a separate, documented job).
"""

from __future__ import annotations

import getpass
from typing import Any

from sqlalchemy.orm import Session

from orchestrator.models import AuditEntry, utcnow

# HTTP status -> outcome, for responses that carry no error code of their own.
STATUS_OUTCOMES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    422: "invalid_input",
}


def cli_actor() -> str:
    """How the log names someone using the CLI on this machine directly (not through the API)."""
    try:
        return f"cli:{getpass.getuser()}"[:140]
    except (KeyError, OSError):
        return "cli"


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    outcome: str = "ok",
    target_kind: str | None = None,
    target_id: object = None,
    token_name: str | None = None,
    role: str | None = None,
    status: int | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Add one entry to ``session``; the caller commits (with the action itself, where it has one)."""
    session.add(
        AuditEntry(
            created_at=utcnow(),
            actor=actor[:140],
            token_name=token_name,
            role=role,
            action=action,
            target_kind=target_kind,
            target_id=None if target_id is None else str(target_id)[:128],
            outcome=outcome[:32],
            status=status,
            detail=detail,
        )
    )
