"""Refuse an oversized firmware upload from its Content-Length, before a byte of it is spooled.

Uploads without a Content-Length (chunked) are still bounded: ``firmware_service`` counts the
bytes it stores and fails with the same 413 once past the limit.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator.errors import PayloadTooLarge

# Room for the multipart framing and the small form fields around the file.
MULTIPART_SLACK = 64 * 1024


class UploadLimit:
    """ASGI middleware: 413 with the JSON error body for a POST to ``path`` declaring too many bytes."""

    def __init__(self, app: ASGIApp, *, path: str, max_bytes: int) -> None:
        self.app = app
        self.path = path
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == self.path:
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_bytes + MULTIPART_SLACK:
                error = PayloadTooLarge(
                    f"firmware larger than the limit of {self.max_bytes} bytes (FLEET_MAX_FIRMWARE_BYTES)",
                    field="file",
                )
                response = JSONResponse(error.to_dict(), status_code=error.http_status)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
