"""Request-scoped dependencies: settings and a database session."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Request
from sqlalchemy.orm import Session

from orchestrator.config import Settings
from orchestrator.db import session_factory


def settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def session_dep(request: Request) -> Iterator[Session]:
    session = session_factory(request.app.state.settings.database_url)()
    try:
        yield session
    finally:
        session.close()
