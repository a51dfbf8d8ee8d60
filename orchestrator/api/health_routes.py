"""Liveness and dependency health."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.orm import Session

from orchestrator.api.deps import session_dep, settings_dep
from orchestrator.config import Settings

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz(
    session: Session = Depends(session_dep), settings: Settings = Depends(settings_dep)
) -> JSONResponse:
    """200 when the database and Redis answer, 503 otherwise (with which one failed)."""
    import redis

    checks: dict[str, Any] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"error: {exc.__class__.__name__}"
    try:
        redis.Redis.from_url(settings.redis_url, socket_timeout=2).ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"error: {exc.__class__.__name__}"
    healthy = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if healthy else "degraded", "checks": checks}, status_code=200 if healthy else 503
    )
