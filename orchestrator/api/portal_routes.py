"""The web portal: a static single-page site at ``/`` and ``/static/...``, plus its configuration.

The page itself is public (it holds no data); everything it shows comes from token-protected
``/v1`` calls and from the broker's retained ``fleet/v1/portal/#`` topics, which the browser reads
over MQTT-over-WebSockets with the read-only portal credentials from ``GET /v1/portal/config``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from orchestrator.api.deps import AppSettings, Viewer
from orchestrator.api.schemas import errors

STATIC_DIR = Path(__file__).resolve().parent.parent / "portal_web" / "static"
PORTAL_TOPIC_PREFIX = "fleet/v1/portal/"

router = APIRouter(prefix="/portal", tags=["portal"], responses=errors(401, 403))
pages = APIRouter(include_in_schema=False)


class PortalConfig(BaseModel):
    mqtt_ws_url: str = Field(examples=["ws://127.0.0.1:9001/mqtt"], description="broker URL for browsers")
    mqtt_username: str | None = Field(None, description="read-only broker user (null: anonymous)")
    mqtt_password: str | None = None
    topic_prefix: str = Field(PORTAL_TOPIC_PREFIX, description="the portal user may read only below this")
    role: str = Field(
        examples=["viewer"], description="the token's role: the page shows write controls to operators"
    )
    token_name: str = Field(examples=["ops-alice"])


@router.get("/config", response_model=PortalConfig)
def portal_config(settings: AppSettings, token: Viewer) -> PortalConfig:
    """Where and how the browser subscribes to live rollout progress (MQTT over WebSockets), and
    the signed-in token's role (the API enforces it either way)."""
    return PortalConfig(
        mqtt_ws_url=settings.portal_mqtt_ws_url,
        mqtt_username=settings.portal_mqtt_username,
        mqtt_password=settings.portal_mqtt_password,
        role=token.role,
        token_name=token.name,
    )


@pages.get("/")
def index() -> FileResponse:
    # no-cache: the page is tiny, and a stale copy after an upgrade would talk to a newer API.
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def register(app: FastAPI) -> None:
    """Mount the portal: ``/`` (the page), ``/static`` (its assets), ``/v1/portal/config``."""
    app.include_router(router, prefix="/v1")
    app.include_router(pages)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="portal-static")
