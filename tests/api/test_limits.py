"""Request bodies are bounded on every route, before parsing and before authentication."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from fastapi.testclient import TestClient
from starlette.types import Message, Receive, Scope, Send

from orchestrator.api.limits import BodyLimit
from tests.api.conftest import assert_error


def test_an_endless_anonymous_body_is_cut_off_at_the_limit(client: TestClient) -> None:
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        chunk = b"[" + b"1," * 32768
        while sent < 64 * 1024 * 1024:  # far more than the 16 MiB limit, without a Content-Length
            sent += len(chunk)
            yield chunk

    response = client.post("/v1/rollouts", content=body(), headers={"Content-Type": "application/json"})
    # Refused as too large, not as unauthenticated: the limit comes before the token check
    assert_error(response, 413, "payload_too_large", "body")


def test_a_declared_oversize_body_is_refused_unread() -> None:
    reached: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope["path"])

    limit = BodyLimit(app, max_bytes=1024 * 1024, max_upload_bytes=10 * 1024 * 1024)
    for path, declared in (("/v1/rollouts", 109_000_000), ("/v1/firmware", 11 * 1024 * 1024 + 70_000)):
        messages: list[Message] = []

        async def receive() -> Message:
            raise AssertionError("the body must not be read")

        async def send(message: Message, messages: list[Message] = messages) -> None:
            messages.append(message)

        scope: dict[str, Any] = {
            "type": "http",
            "method": "POST",
            "path": path,
            "headers": [(b"content-length", str(declared).encode())],
        }
        asyncio.run(limit(scope, receive, send))
        assert messages[0]["status"] == 413, path
    assert reached == []


def test_small_bodies_pass_through_whole() -> None:
    received: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        received.append(message["body"])

    limit = BodyLimit(app, max_bytes=1024, max_upload_bytes=1024)
    chunks = iter(
        [{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.request", "body": b"cd"}]
    )

    async def receive() -> Message:
        return next(chunks)

    async def send(message: Message) -> None:
        pass

    scope = {"type": "http", "method": "POST", "path": "/v1/rollouts", "headers": []}
    asyncio.run(limit(scope, receive, send))
    assert received == [b"abcd"]
