"""kombu's Redis transport, with a worker that survives losing Redis while it waits for messages.

With Celery and kombu 5.7, when Redis goes away while the consumer is blocked in BRPOP and a
message is still unacknowledged (a step running in the other pool process), Celery's reconnect
path detaches the transport first and closes the channel afterwards. The channel then tries to
push its unacknowledged messages back into a Redis it no longer has an address for, and the step
that finishes meanwhile tries to acknowledge on it; both raise ``AttributeError``, which Celery
treats as unrecoverable: the worker exits.

Here a detached channel raises a connection error instead (Celery logs a failed acknowledgement
and carries on) and its close skips the push. That is safe: if Redis kept its data, the messages
are still in kombu's unacked index and come back after the visibility timeout (steps are
idempotent); if it did not, they are lost either way, and the reconciler re-sends every step that
stopped moving from SQL.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger(__name__)

#: ``broker_transport`` value that selects this transport for a ``redis://`` URL.
TRANSPORT_PATH = "orchestrator.engine.redis_transport:Transport"


def _detached(channel: Any) -> bool:
    transport = getattr(channel, "connection", None)
    return transport is None or getattr(transport, "client", None) is None


class QoS(kombu_redis.QoS):
    def restore_unacked_once(self, stderr: Any = None) -> Any:
        if _detached(self.channel):
            if self._delivered:
                log.warning(
                    "Redis connection lost with %d unacknowledged message(s): they come back after the "
                    "visibility timeout; the reconciler re-sends stalled steps sooner",
                    len(self._delivered),
                )
            self._on_collect.cancel()
            return None
        return super().restore_unacked_once(stderr)  # type: ignore[no-untyped-call]


class Channel(kombu_redis.Channel):
    QoS = QoS

    def _connparams(self, asynchronous: bool = False) -> Any:
        if _detached(self):
            raise RedisConnectionError("the connection to Redis was lost and this channel is closed")
        return super()._connparams(asynchronous=asynchronous)  # type: ignore[no-untyped-call]


class Transport(kombu_redis.Transport):
    Channel = Channel
