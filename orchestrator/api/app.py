"""FastAPI application factory: ``fleet api`` or ``uvicorn orchestrator.api.app:create_app --factory``."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from orchestrator.api import firmware_routes, health_routes
from orchestrator.config import Settings, get_settings
from orchestrator.errors import FleetError


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(title="fleet", version="0.1.0", description="Firmware fleet-update orchestrator")
    app.state.settings = settings

    @app.exception_handler(FleetError)
    async def _domain_error(request: Request, exc: FleetError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.http_status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        field = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path"))
        body = {
            "code": "invalid_input",
            "message": f"{field or 'request'}: {first.get('msg')}",
            "field": field,
        }
        return JSONResponse(body, status_code=422)

    app.include_router(health_routes.router)
    app.include_router(firmware_routes.router, prefix="/v1")
    return app
