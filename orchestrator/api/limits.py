"""Request size limits, enforced before anything parses the body or checks a token.

Every request body is bounded: a firmware upload (``POST /v1/firmware``) by ``max_firmware_bytes``,
any other by ``max_request_bytes``. A declared ``Content-Length`` over the limit is refused at once;
a body without one (chunked) is read up to the limit and refused as soon as it goes over, so a
stranger cannot make the API buffer or parse more than the limit. Firmware uploads stream on (the
firmware service counts the bytes it stores and fails with the same 413).
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.errors import PayloadTooLarge

# Room for the multipart framing and the small form fields around the file.
MULTIPART_SLACK = 64 * 1024
UPLOAD_PATH = "/v1/firmware"


class BodyLimit:
    """ASGI middleware: 413 with the JSON error body for a request body over its limit."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        upload = scope["method"] == "POST" and scope["path"] == UPLOAD_PATH
        limit = self.max_upload_bytes + MULTIPART_SLACK if upload else self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, upload)
            return
        if upload:
            await self.app(scope, receive, send)
            return
        # Read the (small) body here, so an endless chunked one is cut off at the limit.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, upload)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, upload: bool) -> None:
        if upload:
            error = PayloadTooLarge(
                f"firmware larger than the limit of {self.max_upload_bytes} bytes (FLEET_MAX_FIRMWARE_BYTES)",
                field="file",
            )
        else:
            error = PayloadTooLarge(
                f"request body larger than the limit of {self.max_bytes} bytes (FLEET_MAX_REQUEST_BYTES); "
                "target large fleets by model and labels rather than by listing device ids",
                field="body",
            )
        response = JSONResponse(
            error.to_dict(), status_code=error.http_status, headers={"Connection": "close"}
        )
        await response(scope, receive, send)
