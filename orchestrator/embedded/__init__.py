"""Servers fleet can run by itself: a private Redis and MQTT broker on free loopback ports.

Used by the test fixtures and by the all-in-one ``fleet up``. Every server runs as a child process
with a PID file; :func:`cleanup_stale` removes servers left behind by a killed owner.
"""

from .auth import (
    HashedUser,
    MqttUser,
    Permissions,
    Role,
    amqtt_password_hash,
    mosquitto_password_hash,
    mosquitto_password_matches,
    permissions_for,
    write_auth_files,
)
from .mqtt_broker import (
    AmqttBroker,
    BrokerInfo,
    ExternalBroker,
    MosquittoBroker,
    MqttBroker,
    TlsFiles,
    find_mosquitto,
    mqtt_connack,
    start_broker,
)
from .ports import PortUnavailable, free_port, free_ports, port_is_open, wait_for_port
from .process import ManagedProcess, ProcessStartError, cleanup_stale
from .redis_server import RedisServer, ServerNotFoundError, default_run_dir, find_redis_server

__all__ = [
    "AmqttBroker",
    "BrokerInfo",
    "ExternalBroker",
    "HashedUser",
    "ManagedProcess",
    "MosquittoBroker",
    "MqttBroker",
    "MqttUser",
    "Permissions",
    "PortUnavailable",
    "ProcessStartError",
    "RedisServer",
    "Role",
    "ServerNotFoundError",
    "TlsFiles",
    "amqtt_password_hash",
    "cleanup_stale",
    "default_run_dir",
    "find_mosquitto",
    "find_redis_server",
    "free_port",
    "free_ports",
    "mosquitto_password_hash",
    "mosquitto_password_matches",
    "mqtt_connack",
    "permissions_for",
    "port_is_open",
    "start_broker",
    "wait_for_port",
    "write_auth_files",
]
