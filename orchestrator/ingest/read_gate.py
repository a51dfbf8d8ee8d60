"""Ingest stops reading from the broker while enough messages wait in the process.

MQTT 5's Receive Maximum should keep unacknowledged reports at the broker, but Mosquitto 2.0
overshoots it under a flood (measured: 6,128 unacknowledged messages against a window of 2,000),
and QoS 0 messages are outside it anyway, so a flood used to pile up in ingest's memory. When the
backlog reaches ``high``, the gate takes the connection's socket off the event loop; TCP then pushes
back and the broker keeps the rest in ingest's session. Reading resumes at ``low``, and a pause never
lasts longer than ``max_pause_s``: a database outage holds the backlog still, and the connection's
keepalive must get through, so after a pause that ran out the gate stays open until the backlog is
down to ``low`` (memory may then grow while the outage lasts). Ingest publishes on a connection of
its own, so no acknowledgement it awaits waits behind a paused subscription.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiomqtt
import paho.mqtt.client as paho

log = logging.getLogger(__name__)


class ReadGate:
    """Install before connecting; call :meth:`poll` whenever the backlog may have shrunk."""

    def __init__(
        self,
        client: aiomqtt.Client,
        backlog: Callable[[], int],
        *,
        high: int,
        low: int,
        max_pause_s: float = 10.0,
    ) -> None:
        if not 0 <= low < high:
            raise ValueError("read gate needs 0 <= low < high")
        self.backlog, self.high, self.low, self.max_pause_s = backlog, high, low, max_pause_s
        self.pauses = 0
        self.peak_backlog = 0
        self._client = client
        self._paho: paho.Client = client._client
        self._read = self._paho.loop_read
        # aiomqtt's socket callback calls client.loop_read(): an instance attribute takes its place.
        self._paho.loop_read = self._gated_read  # type: ignore[method-assign]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._fd: int | None = None
        self._paused_at: float | None = None
        self._held_open = False  # a pause ran out: no new one until the backlog is down to ``low``
        self._timer: asyncio.TimerHandle | None = None

    def _gated_read(self, max_packets: int = 1) -> Any:
        waiting = self.backlog()
        self.peak_backlog = max(self.peak_backlog, waiting)
        if self._held_open and waiting <= self.low:
            self._held_open = False
        if self._paused_at is None and not self._held_open and waiting >= self.high and self._pause():
            return paho.MQTT_ERR_SUCCESS
        return self._read(max_packets)

    def _pause(self) -> bool:
        sock = self._paho.socket()
        if sock is None:
            return False
        self._loop = asyncio.get_running_loop()
        self._fd = sock.fileno()
        self._loop.remove_reader(self._fd)
        self._paused_at = time.monotonic()
        self.pauses += 1
        # Runs out even when nothing calls poll() (a batch retrying through a database outage).
        self._timer = self._loop.call_later(self.max_pause_s, self._ran_out)
        return True

    def _ran_out(self) -> None:
        if self._paused_at is not None:
            self._held_open = True
            self.resume()

    def poll(self) -> None:
        """Resume reading once the backlog is down to ``low`` or the pause has lasted too long."""
        if self._paused_at is None:
            return
        if self.backlog() > self.low and time.monotonic() - self._paused_at < self.max_pause_s:
            return
        if self.backlog() > self.low:
            self._held_open = True
        self.resume()

    def resume(self) -> None:
        """Read again now."""
        if self._paused_at is None:
            return
        self._paused_at = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        sock = self._paho.socket()
        if sock is None or self._loop is None or sock.fileno() != self._fd:
            return  # the connection went meanwhile; a new one registers its own reader
        self._loop.add_reader(self._fd, self._on_readable)
        pending = getattr(sock, "pending", None)
        if pending is not None and pending() > 0:
            self._loop.call_soon(self._on_readable)  # TLS bytes decoded already: no socket event comes

    def _on_readable(self) -> None:
        # What aiomqtt's own reader does: read, and drain what TLS has decoded already.
        try:
            while True:
                self._gated_read()
                if self._paused_at is not None:
                    return
                sock = self._paho.socket()
                pending = getattr(sock, "pending", None)
                if pending is None or pending() <= 0:
                    return
        except Exception as exc:
            # A broken connection: stop reading it and end the session, as aiomqtt's reader does.
            log.warning("reading from the broker failed: %s", exc)
            if self._loop is not None and self._fd is not None:
                self._loop.remove_reader(self._fd)
            disconnected = getattr(self._client, "_disconnected", None)
            if isinstance(disconnected, asyncio.Future) and not disconnected.done():
                disconnected.set_exception(exc)
