"""One device's MQTT connection: connect/reconnect, retained online+info, last will, an ordered outbox.

Built on aiomqtt, which drives paho-mqtt from the asyncio loop (``add_reader``/``add_writer`` on the
socket, plus one ``loop_misc`` task for keepalives): no thread and no ``select()`` per client, so
thousands of connections fit in one process (see docs/protocol.md, "MQTT client choice").

To stay small per device this module relies on private parts of aiomqtt 2.x clients: ``_queue``
(replaced by a queue that dispatches each message at once, see :class:`_Dispatch`),
``_disconnected`` (the future that ends a connection), ``_client`` (the paho client, for its
socket and for DISCONNECT) and ``_on_socket_register_write`` (see :class:`_Client`).
tests/device_sim exercise all of them against a real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import random
import socket
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho

from orchestrator.protocol import OFFLINE, ONLINE, desired_topic, info_topic, online_topic

log = logging.getLogger(__name__)
OUTBOX_LIMIT = 512  # a device offline for long keeps its newest reports; the final one is always last


class _Dispatch(asyncio.Queue[aiomqtt.Message]):
    """Stands in for aiomqtt's incoming-message queue and hands each message to a callback at once.

    aiomqtt calls ``put_nowait`` from paho's read callback, already on the event loop. A real
    asyncio.Queue costs about 3 KiB per client (four deques) plus a task and an ``asyncio.wait`` per
    message awaited: a quarter of a simulated device's memory.
    """

    def __init__(self, maxsize: int = 0) -> None:  # no super().__init__(): none of its state is used
        self.deliver: Callable[[aiomqtt.Message], None] | None = None

    def put_nowait(self, item: aiomqtt.Message) -> None:
        if self.deliver is not None:
            self.deliver(item)

    def qsize(self) -> int:
        return 0


class _Client(aiomqtt.Client):
    """aiomqtt.Client with a race fixed: aiomqtt registers the write callback later, with
    ``call_soon_threadsafe``; when the socket closes in between (a dropped connection right after a
    publish), the loop then logs EBADF from ``add_writer``. Check the socket when registering."""

    def _on_socket_register_write(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        def write() -> None:
            try:
                client.loop_write()
            except Exception as exc:  # a broken connection: end it like aiomqtt does
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            current = client.socket()
            if current is not None and current is sock and current.fileno() != -1:
                self._loop.add_writer(current.fileno(), write)

        self._loop.call_soon_threadsafe(register)


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where to connect. Parsed from ``mqtt://[:password@]host[:port]`` (``mqtts://`` for TLS)."""

    host: str
    port: int = 1883
    tls: bool = False
    password: str | None = None
    password_secret: str | None = None  # set: each device's password is derived from it and its id
    tls_ca: Path | None = None  # CA certificate that signed the broker's certificate (default: system)
    tls_cert_dir: Path | None = None  # ID.crt / ID.key per device: its client certificate (mutual TLS)

    def password_for(self, device_id: str) -> str | None:
        """The MQTT password ``device_id`` connects with (none with a client certificate)."""
        if self.tls_cert_dir is not None:
            return None
        if self.password_secret is not None:
            return derive_device_password(self.password_secret, device_id)
        return self.password

    def tls_context_for(self, device_id: str) -> ssl.SSLContext | None:
        """The TLS context of ``device_id``: the broker's CA and, with a cert dir, its own certificate."""
        if not self.tls:
            return None
        context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert_dir is not None:
            context.load_cert_chain(
                self.tls_cert_dir / f"{device_id}.crt", self.tls_cert_dir / f"{device_id}.key"
            )
        return context

    @classmethod
    def parse(
        cls,
        url: str,
        password: str | None = None,
        password_secret: str | None = None,
        *,
        tls_ca: Path | None = None,
        tls_cert_dir: Path | None = None,
    ) -> BrokerAddress:
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "tcp", "mqtts", "ssl"):
            raise ValueError(f"unsupported broker URL scheme {parts.scheme!r} (use mqtt:// or mqtts://)")
        tls = parts.scheme in ("mqtts", "ssl")
        if not parts.hostname:
            raise ValueError(f"no host in broker URL {url!r}")
        url_password = unquote(parts.password) if parts.password else None
        return cls(
            host=parts.hostname,
            port=parts.port or (8883 if tls else 1883),
            tls=tls,
            password=password if password is not None else url_password,
            password_secret=password_secret,
            tls_ca=tls_ca,
            tls_cert_dir=tls_cert_dir,
        )


async def _acked(client: aiomqtt.Client, request: Awaitable[Any]) -> None:
    """Await ``request`` (a publish or subscribe on ``client``) until the broker acknowledges it.

    Raises MqttError as soon as the connection is lost: aiomqtt itself keeps waiting for the
    acknowledgement until its timeout (30 s), which would hold the outbox back after a reconnect.
    """
    lost = client._disconnected
    task = asyncio.ensure_future(request)
    try:
        await asyncio.wait((task, lost), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        elif not task.cancelled():
            task.exception()  # retrieved here: raised below, or dropped if this wait was cancelled
    if not task.done() or task.cancelled():
        raise aiomqtt.MqttError("connection lost before the broker acknowledged")
    task.result()


def derive_device_password(secret: str, device_id: str) -> str:
    """Per-device MQTT password: hex HMAC-SHA256 of the device id keyed with ``secret``.

    The broker's user list and the simulator derive the same value from one shared secret, so
    each device still has its own password without a file of N passwords.
    """
    return hmac.new(secret.encode(), device_id.encode(), hashlib.sha256).hexdigest()


class MqttLink:
    """Keeps one device connected and delivers its ``desired`` messages to a callback.

    Client id and username are the device id. Every publish goes through the outbox at QoS 1 in
    order; an item leaves the outbox only once the broker acknowledged it, so a report survives a
    reconnect (it may then arrive twice, which the protocol allows).
    """

    __slots__ = (
        "_aborting",
        "_broker",
        "_client",
        "_closing",
        "_conn",
        "_flusher",
        "_gate",
        "_info",
        "_keepalive",
        "_offline_until",
        "_on_connect",
        "_on_message",
        "_outbox",
        "_waiters",
        "connects",
        "device_id",
    )

    def __init__(
        self,
        device_id: str,
        broker: BrokerAddress,
        *,
        on_message: Callable[[bytes], None],
        info: Callable[[], bytes],
        gate: asyncio.Semaphore | None = None,
        on_connect: Callable[[int], None] | None = None,
        keepalive: int = 60,
    ) -> None:
        self.device_id = device_id
        self._broker = broker
        self._on_message = on_message
        self._info = info
        self._gate = gate  # bounds how many connects run at once across a fleet
        self._on_connect = on_connect  # called with the connection count (1 = first connect)
        self._keepalive = keepalive
        self._conn: aiomqtt.Client | None = None  # connected (CONNACK received)
        self._client: aiomqtt.Client | None = None  # connected, announced and subscribed
        self._outbox: deque[tuple[str, bytes, bool]] | None = None  # allocated only when needed
        self._flusher: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[None]] | None = None
        self._offline_until = 0.0
        self._closing = False
        self._aborting = False
        self.connects = 0

    # ------------------------------------------------------------ public
    @property
    def is_connected(self) -> bool:
        return self._client is not None

    def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Queue a QoS 1 publish; it goes out now if connected, else after the next connect."""
        if self._outbox is None:
            self._outbox = deque(maxlen=OUTBOX_LIMIT)
        self._outbox.append((topic, payload, retain))
        self._kick()

    @property
    def pending(self) -> int:
        return len(self._outbox) if self._outbox else 0

    async def wait_connected(self) -> None:
        if self._client is not None:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        await fut

    def go_offline(self, seconds: float) -> None:
        """Simulate a network loss: cut the TCP connection now (the broker fires the last will) and
        do not reconnect for ``seconds``."""
        loop = asyncio.get_running_loop()
        self._offline_until = max(self._offline_until, loop.time() + seconds)
        self._shutdown_socket()

    async def drop(self, seconds: float) -> None:
        """go_offline(), then return when the network is back."""
        self.go_offline(seconds)
        await asyncio.sleep(seconds)

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until the outbox is empty or the connection is gone."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._outbox and self._client is not None and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def run(self) -> None:
        """Stay connected until close() or abort(); reconnect with jittered backoff."""
        loop = asyncio.get_running_loop()
        backoff = 0.5
        while not self._closing:
            wait = self._offline_until - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            client = self._new_client()
            try:
                if self._gate is not None:
                    async with self._gate:
                        await client.__aenter__()
                else:
                    await client.__aenter__()
            except aiomqtt.MqttError as exc:
                log.debug("%s: connect failed: %s", self.device_id, exc)
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.5
            self._conn = client
            try:
                await self._session(client)
            except aiomqtt.MqttError as exc:
                if not self._closing:
                    log.debug("%s: connection lost: %s", self.device_id, exc)
            finally:
                self._client = None
                self._conn = None
                await self._teardown(client)

    async def close(self, timeout: float = 5.0) -> None:
        """Graceful shutdown: flush the outbox, publish retained "offline", disconnect."""
        self._closing = True
        conn = self._conn
        if conn is None:
            return
        if self._client is conn:
            try:
                await asyncio.wait_for(self._drain_and_say_offline(conn), timeout)
            except (aiomqtt.MqttError, TimeoutError) as exc:
                log.debug("%s: unclean shutdown: %s", self.device_id, exc)
        # paho sends DISCONNECT; the session loop then ends and run() returns.
        conn._client.disconnect()

    def abort(self) -> None:
        """Abrupt stop, like a killed process: no DISCONNECT, so the broker fires the last will."""
        self._closing = True
        self._aborting = True
        self._shutdown_socket()

    # ------------------------------------------------------------ internals
    def _new_client(self) -> aiomqtt.Client:
        b = self._broker
        client = _Client(
            b.host,
            b.port,
            identifier=self.device_id,
            username=self.device_id,
            password=b.password_for(self.device_id),
            will=aiomqtt.Will(online_topic(self.device_id), OFFLINE.encode(), qos=1, retain=True),
            keepalive=self._keepalive,
            clean_session=True,
            timeout=30,
            tls_context=b.tls_context_for(self.device_id),
            queue_type=_Dispatch,
            # Small request/response messages: without this, Nagle + delayed ACK add ~40 ms a hop.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        # Set before subscribing: the retained desired document may arrive with the SUBACK.
        cast(_Dispatch, client._queue).deliver = self._deliver
        return client

    async def _session(self, client: aiomqtt.Client) -> None:
        device_id = self.device_id
        await _acked(client, client.publish(info_topic(device_id), self._info(), qos=1, retain=True))
        await _acked(client, client.publish(online_topic(device_id), ONLINE.encode(), qos=1, retain=True))
        # The retained desired document (if any) arrives right after this subscription.
        await _acked(client, client.subscribe(desired_topic(device_id), qos=1))
        self._client = client
        self.connects += 1
        if self._waiters:
            for fut in self._waiters:
                if not fut.done():
                    fut.set_result(None)
            self._waiters = None
        if self._on_connect is not None:
            self._on_connect(self.connects)
        self._kick()
        # Shielded: cancelling this task must not cancel aiomqtt's own future (its __aexit__ reads it).
        await asyncio.shield(client._disconnected)
        raise aiomqtt.MqttError("disconnected")

    def _deliver(self, message: aiomqtt.Message) -> None:
        if message.topic.value != desired_topic(self.device_id):
            # Only one subscription, but some brokers (amqtt 0.12) also replay other clients'
            # retained messages to a new subscriber.
            return
        payload = message.payload
        self._on_message(payload if isinstance(payload, bytes) else str(payload or "").encode())

    async def _teardown(self, client: aiomqtt.Client) -> None:
        disconnected = client._disconnected
        if disconnected.done():
            # Mark a connection-loss exception as retrieved so asyncio does not log it at exit.
            if not disconnected.cancelled():
                disconnected.exception()
        elif self._aborting:
            self._shutdown_socket(client)
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(client.__aexit__(None, None, None), 2.0)

    def _shutdown_socket(self, client: aiomqtt.Client | None = None) -> None:
        client = client or self._conn
        if client is None:
            return
        sock = client._client.socket()
        if isinstance(sock, socket.socket):
            # The loop's reader then sees EOF and paho handles it as a lost connection.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _kick(self) -> None:
        if self._outbox and self._client is not None and self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush(self._client))

    async def _flush(self, client: aiomqtt.Client) -> None:
        try:
            while self._outbox and self._client is client:
                topic, payload, retain = self._outbox[0]
                await _acked(client, client.publish(topic, payload, qos=1, retain=retain))
                if self._outbox:
                    self._outbox.popleft()
        except aiomqtt.MqttError as exc:
            log.debug("%s: publish failed, will resend after reconnect: %s", self.device_id, exc)
        finally:
            self._flusher = None
            if not self._outbox:
                self._outbox = None  # give the deque's memory back while idle
            elif self._client is not None and self._client is not client:
                self._kick()

    async def _drain_and_say_offline(self, client: aiomqtt.Client) -> None:
        while self._outbox and self._client is client:
            if self._flusher is None:
                self._kick()
            await asyncio.sleep(0.01)
        await client.publish(online_topic(self.device_id), OFFLINE.encode(), qos=1, retain=True)
