"""Helpers for the device-side tests: a real HTTP firmware server, an MQTT observer, agents."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiomqtt

from device_sim.agent import DeviceAgent
from device_sim.context import AgentContext, load_public_key
from device_sim.mqtt_link import BrokerAddress
from device_sim.profiles import INSTANT, Profile
from device_sim.state_store import JsonStateStore
from orchestrator.protocol import (
    Desired,
    FirmwareRef,
    Report,
    Stage,
    desired_topic,
    info_topic,
    online_topic,
    report_topic,
)

T = TypeVar("T")
SAMPLES = Path(__file__).resolve().parents[2] / "firmware_samples"
PUBLIC_KEY_PATH = SAMPLES / "dev-signing-key.DEV-ONLY.pub.pem"
TOKEN = "test-download-token"
# The instant profile, but with real HTTP downloads (its default skips the transfer).
HTTP_INSTANT = INSTANT.with_overrides(params={"fetch": "http"})
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run a coroutine to completion in a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def manifest(model: str, version: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SAMPLES / model / f"{version}.json").read_text())
    return data


@dataclass
class Request:
    path: str
    range: str | None
    status: int
    auth: str | None


@dataclass
class FirmwareServer:
    """Serves firmware_samples/ over HTTP with Range and bearer-token checks.

    ``/fw/<model>/<version>.bin`` serves the real image, ``/tampered/...`` the same image with one
    byte flipped. A query string (``?device=...``) is ignored for serving but kept in ``requests``,
    so a test can find its own requests.
    """

    base_url: str
    token: str = TOKEN
    requests: list[Request] = field(default_factory=list)

    def url(self, model: str, version: str, *, device: str = "", tampered: bool = False) -> str:
        kind = "tampered" if tampered else "fw"
        return f"{self.base_url}/{kind}/{model}/{version}.bin?device={device}"

    def requests_for(self, device: str) -> list[Request]:
        return [r for r in list(self.requests) if r.path.endswith(f"device={device}")]


def _make_handler(server: FirmwareServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            auth = self.headers.get("Authorization")
            rng = self.headers.get("Range")
            self._serve(parts.path, auth, rng)

        def _serve(self, path: str, auth: str | None, rng: str | None) -> int:
            if auth != f"Bearer {server.token}":
                return self._send(401, b"bad token")
            segments = path.strip("/").split("/")
            if len(segments) != 3 or segments[0] not in ("fw", "tampered"):
                return self._send(404, b"not found")
            file = SAMPLES / segments[1] / segments[2]
            if not file.is_file() or file.suffix != ".bin":
                return self._send(404, b"not found")
            data = file.read_bytes()
            if segments[0] == "tampered":
                mid = len(data) // 2
                data = data[:mid] + bytes([data[mid] ^ 0x01]) + data[mid + 1 :]
            if rng is None:
                return self._send(200, data)
            match = _RANGE.match(rng)
            if match is None:
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            if start >= len(data) or end < start:
                return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            end = min(end, len(data) - 1)
            headers = {"Content-Range": f"bytes {start}-{end}/{len(data)}"}
            return self._send(206, data[start : end + 1], headers)

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> int:
            # Recorded before the response goes out: a client that got it may look at once.
            auth, rng = self.headers.get("Authorization"), self.headers.get("Range")
            server.requests.append(Request(self.path, rng, status, auth))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            # The client may go away mid-transfer (a killed agent).
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.wfile.write(body)
            return status

    return Handler


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        return None  # clients drop connections on purpose (killed agents, network loss)


def start_firmware_server() -> tuple[FirmwareServer, ThreadingHTTPServer]:
    """A real HTTP server on a free loopback port, serving firmware_samples/, in a thread."""
    info = FirmwareServer(base_url="")
    httpd = _QuietServer(("127.0.0.1", 0), _make_handler(info))
    httpd.daemon_threads = True
    info.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    threading.Thread(target=httpd.serve_forever, name="firmware-http", daemon=True).start()
    return info, httpd


def firmware_ref(
    server: FirmwareServer,
    model: str,
    version: str,
    *,
    device: str = "",
    tampered: bool = False,
    token: str = TOKEN,
    **changes: Any,
) -> FirmwareRef:
    data = {**manifest(model, version), **changes}
    return FirmwareRef(
        **data,
        url=server.url(model, version, device=device, tampered=tampered),
        token=token,
    )


def desired(update_id: int, attempt: int, stage: str, firmware: FirmwareRef) -> bytes:
    return Desired(update_id=update_id, attempt=attempt, stage=Stage(stage), firmware=firmware).to_payload()


class Observer:
    """An MQTT client that records what devices publish and publishes their desired documents."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self.client = client
        self.reports: dict[str, list[Report]] = {}
        self.online: dict[str, list[str]] = {}
        self.info: dict[str, list[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._filters: list[str] = []

    async def subscribe(self, topic: str) -> None:
        self._filters.append(topic)
        await self.client.subscribe(topic, qos=1)

    async def watch(self, device_id: str) -> None:
        for topic in (report_topic(device_id), online_topic(device_id), info_topic(device_id)):
            await self.subscribe(topic)

    async def watch_all(self) -> None:
        """Every device's report and online topics (for fleets with a unique id prefix)."""
        await self.subscribe("fleet/v1/devices/+/report")
        await self.subscribe("fleet/v1/devices/+/online")

    async def send(self, device_id: str, payload: bytes) -> None:
        await self.client.publish(desired_topic(device_id), payload, qos=1, retain=True)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        async for msg in self.client.messages:
            if not any(msg.topic.matches(f) for f in self._filters):
                continue  # amqtt 0.12 may replay retained messages of topics nobody subscribed to
            parts = str(msg.topic).split("/")
            device, kind = parts[3], parts[4]
            payload = msg.payload if isinstance(msg.payload, bytes) else str(msg.payload).encode()
            if kind == "report":
                self.reports.setdefault(device, []).append(Report.model_validate_json(payload))
            elif kind == "online":
                self.online.setdefault(device, []).append(payload.decode())
            elif kind == "info":
                self.info.setdefault(device, []).append(json.loads(payload))
            self._changed.set()

    def states(self, device_id: str) -> list[str]:
        return [r.state.value for r in self.reports.get(device_id, [])]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate():
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {what or predicate}; reports={self.reports}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.2))

    async def wait_state(self, device_id: str, state: str, timeout: float = 15.0) -> Report:
        await self.wait_for(lambda: state in self.states(device_id), timeout, f"{device_id} {state}")
        return next(r for r in self.reports[device_id] if r.state.value == state)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._task


def new_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@contextlib.asynccontextmanager
async def observing(broker: Any, *device_ids: str) -> AsyncIterator[Observer]:
    """An Observer connected to ``broker`` and watching ``device_ids``."""
    async with aiomqtt.Client(broker.host, broker.port, identifier=new_id("obs")) as client:
        obs = Observer(client)
        obs.start()
        for device_id in device_ids:
            await obs.watch(device_id)
        try:
            yield obs
        finally:
            await obs.close()


def agent_context(broker: Any, profile: Profile = HTTP_INSTANT, **kwargs: Any) -> AgentContext:
    return AgentContext(
        broker=BrokerAddress.parse(broker.url),
        public_key=load_public_key(PUBLIC_KEY_PATH),
        profile=profile,
        **kwargs,
    )


@contextlib.asynccontextmanager
async def running_agent(
    ctx: AgentContext,
    device_id: str,
    *,
    model: str = "sensor-v2",
    version: str = "1.0.0",
    state_dir: Path | None = None,
    stop: bool = True,
) -> AsyncIterator[DeviceAgent]:
    """A DeviceAgent running in a task; stopped gracefully on exit unless ``stop`` is False
    (then it is left to the test, e.g. killed)."""
    store = JsonStateStore(state_dir, durable=False) if state_dir is not None else None
    agent = DeviceAgent(device_id, model, version, ctx, store=store)
    task = asyncio.get_running_loop().create_task(agent.run())
    try:
        await asyncio.wait_for(agent.link.wait_connected(), 10)
        yield agent
    finally:
        if stop:
            await agent.stop()
        else:
            agent.kill()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, 5)
