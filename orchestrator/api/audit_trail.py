"""ASGI middleware that writes an audit entry for every write request to the API, whatever its outcome.

It runs around the routes, so refused requests (403, 409, 422 ...) are recorded as well as
successful ones; unauthenticated ones (401) are logged, not stored, so strangers cannot grow the
table. The token's name and role come from the auth dependency (``request.state``); the
target from the route's path parameters, or for a create from the new object's id in the response.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.audit import STATUS_OUTCOMES, record
from orchestrator.db import session_factory

log = logging.getLogger(__name__)
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_MAX_CAPTURE = 64 * 1024

# (method, route path under /v1) -> (action, target kind, path parameter naming the target or None)
ACTIONS: dict[tuple[str, str], tuple[str, str | None, str | None]] = {
    ("POST", "/devices"): ("device.register", "device", None),
    ("POST", "/devices/tags"): ("device.tag", "device", None),
    ("PATCH", "/devices/{device_id}/tags"): ("device.tag", "device", "device_id"),
    ("POST", "/firmware"): ("firmware.upload", "firmware", None),
    ("POST", "/firmware/{firmware_id}/deprecate"): ("firmware.deprecate", "firmware", "firmware_id"),
    ("DELETE", "/firmware/{firmware_id}"): ("firmware.delete", "firmware", "firmware_id"),
    ("POST", "/groups"): ("group.create", "group", None),
    ("POST", "/webhooks"): ("webhook.create", "webhook", None),
    ("DELETE", "/webhooks/{webhook_id}"): ("webhook.delete", "webhook", "webhook_id"),
    ("DELETE", "/groups/{name}"): ("group.delete", "group", "name"),
    ("POST", "/rollouts"): ("rollout.create", "rollout", None),
    ("POST", "/rollouts/{rollout_id}/pause"): ("rollout.pause", "rollout", "rollout_id"),
    ("POST", "/rollouts/{rollout_id}/resume"): ("rollout.resume", "rollout", "rollout_id"),
    ("POST", "/rollouts/{rollout_id}/abort"): ("rollout.abort", "rollout", "rollout_id"),
    ("POST", "/rollouts/{rollout_id}/devices/{device_id}/retry"): ("device.retry", "device", "device_id"),
    ("POST", "/rollouts/{rollout_id}/devices/{device_id}/cancel"): ("device.cancel", "device", "device_id"),
    ("POST", "/rollouts/{rollout_id}/devices/{device_id}/stop"): ("device.stop", "device", "device_id"),
}


class AuditTrail:
    def __init__(self, app: ASGIApp, *, database_url: str) -> None:
        self.app = app
        self.database_url = database_url

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in WRITE_METHODS
            or not scope["path"].startswith("/v1/")
        ):
            await self.app(scope, receive, send)
            return
        status = 500
        body = bytearray()
        is_json = False

        async def capture(message: Message) -> None:
            nonlocal status, is_json
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = dict(message.get("headers", []))
                is_json = headers.get(b"content-type", b"").startswith(b"application/json")
            elif message["type"] == "http.response.body" and is_json and len(body) < _MAX_CAPTURE:
                body.extend(message.get("body", b"")[: _MAX_CAPTURE - len(body)])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            entry = self._entry(scope, status, bytes(body) if is_json else b"")
            if entry is not None:
                try:
                    await run_in_threadpool(self._write, entry)
                except Exception:  # the action happened; a lost audit line must not turn it into a 500
                    log.exception("could not write the audit entry for %s %s", scope["method"], scope["path"])

    @staticmethod
    def _entry(scope: Scope, status: int, body: bytes) -> dict[str, Any] | None:
        route = scope.get("route")
        path = getattr(route, "path", None)
        if path is None or status == 405:
            return None  # no route took the request (unknown path or method): nothing was attempted
        if status == 401:
            # Anyone can send these; a row each would let strangers grow the table. Logged instead.
            log.info("audit: unauthenticated %s %s refused", scope["method"], scope["path"][:200])
            return None
        # Routes of an included router may carry their path without the /v1 prefix.
        path = path.removeprefix("/v1")
        action, kind, param = ACTIONS.get(
            (scope["method"], path), (f"{scope['method'].lower()} /v1{path}", None, None)
        )
        doc: Any = None
        if body:
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
        target = (scope.get("path_params") or {}).get(param) if param else None
        if target is None and status < 300 and isinstance(doc, dict):
            target = doc.get("id", doc.get("name"))
        outcome = "ok" if status < 400 else STATUS_OUTCOMES.get(status, "error")
        if status >= 400 and isinstance(doc, dict) and isinstance(doc.get("code"), str):
            outcome = doc["code"]
        state = scope.get("state") or {}
        token = state.get("fleet_token")
        detail: dict[str, Any] = {}
        if status >= 400 and isinstance(doc, dict) and doc.get("message"):
            detail["message"] = str(doc["message"])[:300]
        if action == "device.tag" and isinstance(doc, dict) and "devices" in doc:
            detail["devices"] = doc["devices"]
        path_params = scope.get("path_params") or {}
        if kind == "device" and "rollout_id" in path_params:
            raw = str(path_params["rollout_id"])
            detail["rollout_id"] = int(raw) if raw.isdigit() else raw[:32]
        return {
            "actor": f"api:{token[0]}" if token else "anonymous",
            "token_name": token[0] if token else None,
            "role": token[1] if token else None,
            "action": action,
            "target_kind": kind,
            "target_id": target,
            "outcome": outcome,
            "status": status,
            "detail": detail or None,
        }

    def _write(self, entry: dict[str, Any]) -> None:
        with session_factory(self.database_url)() as session:
            record(session, **entry)
            session.commit()
