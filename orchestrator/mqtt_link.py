"""A small blocking MQTT publisher for worker processes and CLI tools (paho, one network thread)."""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

log = logging.getLogger(__name__)


class PublishFailed(RuntimeError):
    """The broker did not acknowledge a QoS 1 publish in time; the caller should retry."""


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    transport: str = "tcp"
    path: str = "/mqtt"

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Accepts mqtt://host:port, tcp://host:port, ws://host:port/path."""
        parsed = urlparse(url)
        if parsed.scheme in ("mqtt", "tcp", ""):
            return cls(parsed.hostname or "127.0.0.1", parsed.port or 1883)
        if parsed.scheme == "ws":
            return cls(
                parsed.hostname or "127.0.0.1", parsed.port or 80, "websockets", parsed.path or "/mqtt"
            )
        raise ValueError(f"unsupported MQTT URL {url!r}: use mqtt://host:port or ws://host:port/path")


def _no_delay(client: mqtt.Client, userdata: object, sock: object) -> None:
    # Small request/response messages: without this, Nagle + delayed ACK add ~40 ms a hop.
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttPublisher:
    """Connects once and publishes with QoS 1, waiting for the broker's acknowledgement."""

    def __init__(
        self,
        url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        client_id: str | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        address = BrokerAddress.parse(url)
        self._connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"fleet-pub-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv311,
            transport=address.transport,  # type: ignore[arg-type]
        )
        if address.transport == "websockets":
            self.client.ws_set_options(path=address.path)
        if username:
            self.client.username_pw_set(username, password)
        self.client.max_queued_messages_set(0)
        self.client.max_inflight_messages_set(1000)
        self.client.reconnect_delay_set(1, 5)
        self.client.on_socket_open = _no_delay
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.connect_async(address.host, address.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(connect_timeout):
            self.close()
            raise PublishFailed(f"cannot connect to MQTT broker at {url}; is it running? (FLEET_MQTT_URL)")

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        if not getattr(reason, "is_failure", False):
            self._connected.set()
        else:
            log.error("MQTT connection refused: %s", reason)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, reason: object, props: object
    ) -> None:
        self._connected.clear()

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = True, qos: int = 1, timeout: float = 10.0
    ) -> None:
        """Publish and wait for the broker's PUBACK (QoS 1); raises PublishFailed on timeout."""
        self.publish_many([(topic, payload)], retain=retain, qos=qos, timeout=timeout)

    def publish_many(
        self, messages: list[tuple[str, bytes]], *, retain: bool = True, qos: int = 1, timeout: float = 10.0
    ) -> None:
        """Publish a batch, then wait for every acknowledgement."""
        if not self._connected.wait(timeout):
            raise PublishFailed("MQTT broker not connected")
        infos = [self.client.publish(topic, payload, qos=qos, retain=retain) for topic, payload in messages]
        for info in infos:
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise PublishFailed(f"publish failed: {mqtt.error_string(info.rc)}")
            info.wait_for_publish(timeout)
            if not info.is_published():
                raise PublishFailed("broker did not acknowledge a publish in time")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
