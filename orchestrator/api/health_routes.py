"""Liveness and dependency health: database, Redis and the MQTT broker. Open (no token)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.orm import Session

from orchestrator.api.deps import AppSettings, DbSession
from orchestrator.api.schemas import Health
from orchestrator.config import Settings

router = APIRouter(tags=["health"])
CHECK_TIMEOUT_S = 2.0


def check_database(session: Session) -> str:
    try:
        session.execute(text("SELECT 1"))
        session.rollback()
    except Exception as exc:
        return f"error: {exc.__class__.__name__}"
    return "ok"


def check_redis(settings: Settings) -> str:
    import redis

    client = redis.Redis.from_url(
        settings.redis_url, socket_timeout=CHECK_TIMEOUT_S, socket_connect_timeout=CHECK_TIMEOUT_S
    )
    try:
        client.ping()
    except Exception as exc:
        return f"error: {exc.__class__.__name__}"
    finally:
        client.close()
    return "ok"


def check_mqtt(settings: Settings) -> str:
    """Connect to ``settings.mqtt_url`` with the service credentials and wait for the CONNACK."""
    from orchestrator.embedded.mqtt_broker import mqtt_connack
    from orchestrator.mqtt_link import BrokerAddress

    try:
        address = BrokerAddress.parse(settings.mqtt_url)
    except ValueError:
        return "error: unsupported mqtt_url"
    code = mqtt_connack(
        address.host,
        address.port,
        transport="websockets" if address.transport == "websockets" else "tcp",
        username=settings.mqtt_username,
        password=settings.mqtt_password,
        timeout=CHECK_TIMEOUT_S,
    )
    if code is None:
        return "error: no CONNACK"
    return "ok" if code == 0 else f"error: CONNACK reason {code}"


@router.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health, "description": "a dependency does not answer"}},
)
def healthz(session: DbSession, settings: AppSettings) -> JSONResponse:
    """200 when the database, Redis and the MQTT broker answer; 503 naming the failed ones otherwise."""
    checks = {
        "database": check_database(session),
        "redis": check_redis(settings),
        "mqtt": check_mqtt(settings),
    }
    healthy = all(v == "ok" for v in checks.values())
    body = Health(status="ok" if healthy else "degraded", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if healthy else 503)
