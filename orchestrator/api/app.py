"""FastAPI application factory: ``fleet api`` or ``uvicorn orchestrator.api.app:create_app --factory``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from orchestrator.api import (
    audit_routes,
    device_action_routes,
    device_routes,
    firmware_routes,
    group_routes,
    health_routes,
    metrics,
    portal_routes,
    rollout_routes,
    webhook_routes,
)
from orchestrator.api.audit_trail import AuditTrail
from orchestrator.api.limits import BodyLimit
from orchestrator.config import Settings, get_settings
from orchestrator.errors import FleetError, RangeNotSatisfiable

DESCRIPTION = """
Firmware fleet-update orchestrator. Everything under `/v1` is versioned.

**Auth.** `Authorization: Bearer <token>` with a token from `fleet token create --role viewer|operator
--name NAME`. `viewer` may call every GET under `/v1` and `/metrics`; writes need `operator`.
No token or an unknown or revoked one: 401; a too-weak role: 403. Open without a token: `/healthz`,
`/docs`, `/openapi.json`, and firmware content (which takes the device's download token instead).

**Errors.** Every error answers `{"code", "message", "field"?}`; `field` names the offending
parameter (e.g. `limit`, `target.device_ids`, `rollout_id`).

**Pagination.** Listings return `{"items": [...], "next_cursor": ...}`; pass `next_cursor` back as
`?cursor=` for the next page (null on the last page). `limit` is 1-1000 (default 100). Cursors are
opaque and only valid for the listing that issued them.

**Device label filters.** `GET /v1/devices?label=site:berlin&label=ring:beta` keeps devices that
carry every given label (`key:value`, split at the first `:`).

**Rollout actions.** `POST /v1/rollouts/{id}/pause|resume|abort` answer 200 with the rollout after
the change; an action its status does not allow is 409 `illegal_transition`.
"""

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
}
_LOCATIONS = ("body", "query", "path", "header", "cookie")


def _validation_field(error: dict[str, Any]) -> str:
    """The parameter a validation error is about: ``limit``, ``target.device_ids``, ``body``."""
    loc = [str(p) for p in error.get("loc", ())]
    where = loc[0] if loc and loc[0] in _LOCATIONS else ""
    rest = loc[1:] if where else loc
    if error.get("type") == "json_invalid" or not rest:
        return where or "request"
    return ".".join(rest)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="fleet", version="0.1.0", description=DESCRIPTION)
    app.state.settings = settings
    app.state.ingest_rate_memory = {}

    @app.exception_handler(FleetError)
    async def _domain_error(request: Request, exc: FleetError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
        if isinstance(exc, RangeNotSatisfiable) and exc.size is not None:
            headers = {"Content-Range": f"bytes */{exc.size}"}
        return JSONResponse(exc.to_dict(), status_code=exc.http_status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = _validation_field(first)
        body = {"code": "invalid_input", "message": f"{field}: {first.get('msg')}", "field": field}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Routing and protocol errors (unknown path, wrong method, unparsable multipart) get the same body.
        body = {"code": _HTTP_CODES.get(exc.status_code, "http_error"), "message": str(exc.detail)}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    app.add_middleware(AuditTrail, database_url=settings.database_url)
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_request_bytes, max_upload_bytes=settings.max_firmware_bytes
    )

    v1 = APIRouter(prefix="/v1")
    v1.include_router(audit_routes.router)
    v1.include_router(device_routes.router)
    v1.include_router(device_action_routes.router)
    v1.include_router(firmware_routes.router)
    v1.include_router(group_routes.router)
    v1.include_router(rollout_routes.router)
    v1.include_router(webhook_routes.router)
    app.include_router(health_routes.router)
    app.include_router(metrics.router)
    app.include_router(v1)
    portal_routes.register(app)
    return app
