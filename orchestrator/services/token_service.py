"""API bearer tokens: create, authenticate, list, revoke.

A token is ``fleet_`` followed by 43 URL-safe random characters. Only its sha256 is stored, so a
lost secret cannot be recovered, only revoked and replaced.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.audit import cli_actor, record
from orchestrator.errors import Forbidden, InvalidInput, NotFound, Unauthorized
from orchestrator.models import ApiToken, utcnow

TOKEN_PREFIX = "fleet_"
# Writing last_used_at on every request would turn each GET into a write; once a minute is enough.
LAST_USED_RESOLUTION = timedelta(seconds=60)


class Role(StrEnum):
    """What a token may do. Each role includes the rights of the roles before it."""

    VIEWER = "viewer"
    OPERATOR = "operator"


_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1}


def role_allows(have: Role | str, need: Role) -> bool:
    """True when a token of role ``have`` may do what ``need`` requires."""
    try:
        return _RANK[Role(have)] >= _RANK[need]
    except ValueError:
        return False


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(
    session: Session, *, name: str, role: Role | str, actor: str | None = None
) -> tuple[ApiToken, str]:
    """Store a new token and return it with its secret, which is not kept anywhere. Commits.

    ``name`` is 1-100 characters and identifies the holder in the audit trail.
    """
    name = name.strip()
    if not 1 <= len(name) <= 100:
        raise InvalidInput("token name must be 1-100 characters", field="name")
    try:
        checked = Role(role)
    except ValueError:
        allowed = ", ".join(r.value for r in Role)
        raise InvalidInput(f"role {role!r} is not one of: {allowed}", field="role") from None
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(name=name, role=checked.value, token_hash=hash_secret(secret))
    session.add(token)
    session.flush()
    record(
        session,
        actor=actor or cli_actor(),
        action="token.create",
        target_kind="token",
        target_id=token.id,
        detail={"name": name, "role": checked.value},
    )
    session.commit()
    return token, secret


def token_by_secret(session: Session, secret: str) -> ApiToken | None:
    """The token row for ``secret`` (live or not), or None."""
    return session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_secret(secret)))


def authenticate(session: Session, secret: str, need: Role) -> ApiToken:
    """The live token for ``secret`` if its role allows ``need``.

    Raises Unauthorized for an unknown or revoked secret and Forbidden for a too-weak role.
    May commit (to record ``last_used_at`` at most once a minute per token).
    """
    token = token_by_secret(session, secret)
    if token is None or token.revoked:
        raise Unauthorized("the API token is not valid (unknown or revoked)")
    if not role_allows(token.role, need):
        raise Forbidden(f"this action needs the {need.value} role; the token has {token.role}")
    now = utcnow()
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        token.last_used_at = now
        session.commit()
    return token


def list_tokens(session: Session) -> list[ApiToken]:
    """Every token, oldest first (hashes included; never the secrets)."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id)))


def revoke_token(session: Session, token_id: int, *, actor: str | None = None) -> ApiToken:
    """Mark a token revoked; it is refused from the next request on. Idempotent. Commits."""
    token = session.get(ApiToken, token_id)
    if token is None:
        raise NotFound(f"API token {token_id} does not exist", field="token_id")
    if not token.revoked:
        token.revoked = True
        record(
            session,
            actor=actor or cli_actor(),
            action="token.revoke",
            target_kind="token",
            target_id=token.id,
            detail={"name": token.name},
        )
    session.commit()
    return token
