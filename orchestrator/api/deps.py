"""Request-scoped dependencies: settings, a database session, and the caller's API token.

Auth: ``Authorization: Bearer <token>`` with a token from ``fleet token create``. ``viewer`` tokens
may call every GET under /v1 and /metrics; writes need ``operator``. A missing, unknown or revoked
token is 401, a too-weak role 403, both with the usual JSON error body.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from sqlalchemy.orm.exc import StaleDataError

from orchestrator.config import Settings
from orchestrator.db import session_factory
from orchestrator.errors import AlreadyExists, ConcurrentUpdate, Forbidden, Unauthorized
from orchestrator.models import ApiToken
from orchestrator.services.token_service import Role, authenticate, token_by_secret

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="token",
    description="An API token from `fleet token create --role viewer|operator --name NAME`.",
)


def settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def session_dep(request: Request) -> Iterator[Session]:
    """A session closed after the response; lost optimistic-lock races and unique-key races become 409."""
    session = session_factory(request.app.state.settings.database_url)()
    try:
        yield session
    except StaleDataError as exc:
        session.rollback()
        raise ConcurrentUpdate("another writer changed this object first; retry") from exc
    except IntegrityError as exc:
        session.rollback()
        raise AlreadyExists("the request conflicts with existing data") from exc
    finally:
        session.close()


def _token(
    request: Request, credentials: HTTPAuthorizationCredentials | None, session: Session, need: Role
) -> ApiToken:
    if credentials is None:
        raise Unauthorized("an API token is required: Authorization: Bearer <token>")
    try:
        token = authenticate(session, credentials.credentials, need)
    except Forbidden:
        # The audit trail names who was refused: the token is valid, its role is not enough.
        known = token_by_secret(session, credentials.credentials)
        if known is not None:
            request.state.fleet_token = (known.name, known.role)
        raise
    request.state.fleet_token = (token.name, token.role)
    return token


def require_viewer(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    session: Annotated[Session, Depends(session_dep)],
) -> ApiToken:
    """The caller's token; any live token may read."""
    return _token(request, credentials, session, Role.VIEWER)


def require_operator(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    session: Annotated[Session, Depends(session_dep)],
) -> ApiToken:
    """The caller's token, which must have the operator role."""
    return _token(request, credentials, session, Role.OPERATOR)


def actor(token: ApiToken) -> str:
    """How the audit trail names the caller."""
    return f"api:{token.name}"


DbSession = Annotated[Session, Depends(session_dep)]
AppSettings = Annotated[Settings, Depends(settings_dep)]
Viewer = Annotated[ApiToken, Depends(require_viewer)]
Operator = Annotated[ApiToken, Depends(require_operator)]
