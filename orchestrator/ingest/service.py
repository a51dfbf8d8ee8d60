"""``fleet ingest``: the long-running MQTT subscriber for device reports, info and presence.

Messages are taken in whatever batch has accumulated (no artificial wait, so latency stays low when
quiet and batches grow under load), checked (:mod:`orchestrator.ingest.guard`), applied to SQL in a
worker thread, acknowledged to the broker only after the commit, mirrored to retained portal
topics, and the steps they made due are sent to the workers.

No report is lost: ingest keeps a persistent session under a stable client id (MQTT 5 with a
session expiry inside the shared group, so a member that never returns does not hold its share
forever), and a report is acknowledged only once its batch committed; one that arrives again after a
crash is a duplicate the applier ignores. No dependency outage ends the process: the broker is
reconnected, a database error retries the batch with backoff (a batch that keeps failing for a
reason other than the database being away is applied report by report, and what still fails is
recorded as rejected), and Redis is only needed for steps and summaries, which the reconciler and
the next summary round make up for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import aiomqtt
import redis
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from sqlalchemy import insert
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from orchestrator.aws_jobs import REQUEST_SUBSCRIPTIONS, RejectCode, RequestTopic, client_token_of, rejection
from orchestrator.config import Settings
from orchestrator.db import session_factory
from orchestrator.engine.dispatch import DispatchFailed, sender_for
from orchestrator.engine.progress import DirtyMarks
from orchestrator.ingest.guard import Guard, Parsed, rejected_event
from orchestrator.ingest.ingest_metrics import IngestMetrics
from orchestrator.ingest.inventory import apply_inventory
from orchestrator.ingest.jobs_gateway import JobsGateway
from orchestrator.ingest.read_gate import ReadGate
from orchestrator.ingest.report_applier import BatchOutcome, ReportApplier
from orchestrator.models import Event
from orchestrator.mqtt_link import BrokerAddress
from orchestrator.portal import rollout_message
from orchestrator.protocol import (
    INFO_SUBSCRIPTION,
    MAX_DEVICE_PAYLOAD,
    ONLINE_SUBSCRIPTION,
    REPORT_SUBSCRIPTION,
)

log = logging.getLogger(__name__)
STATS_KEY = "fleet:ingest:stats"
PUBLISH_TIMEOUT_S = 15.0
MAX_BACKOFF_S = 10.0


class DatabaseUnavailable(RuntimeError):
    """The database did not answer; the batch is kept and tried again."""


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class IngestService:
    def __init__(self, settings: Settings, *, client_id: str | None = None) -> None:
        self.settings = settings
        # Stable across restarts, so the persistent session (and its queued reports) is resumed.
        self.client_id = client_id or settings.ingest_client_id or f"fleet-ingest-{socket.gethostname()}"
        self.sessions = session_factory(settings.database_url)
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.marks = DirtyMarks(self.redis)
        self.dispatch = sender_for(settings)
        self.guard = Guard(settings.ingest_device_rate, settings.ingest_device_burst)
        self.applier = ReportApplier()
        self.gateway = JobsGateway(settings)
        self.stats: Counter[str] = Counter()
        self.latencies_ms: deque[float] = deque(maxlen=20000)
        self.metrics = IngestMetrics()
        self._dirty: set[int] = set()
        self._last_summary_ids: set[int] = set()
        self._outage: dict[str, float] = {}
        self._followers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-steps")
        self.ready = asyncio.Event()
        self._publisher_failed = False

    # ------------------------------------------------------------------ connection
    @property
    def shared(self) -> bool:
        return self.settings.mqtt_v5 and self.settings.mqtt_shared_subscriptions

    def _connection_options(self, identifier: str) -> dict[str, Any]:
        address = BrokerAddress.parse(self.settings.mqtt_url)
        return {
            "hostname": address.host,
            "port": address.port,
            "identifier": identifier,
            "username": self.settings.mqtt_username,
            "password": self.settings.mqtt_password,
            "keepalive": 30,
            "max_inflight_messages": 1000,
            # Small request/response messages: without this, Nagle + delayed ACK add ~40 ms a hop.
            "socket_options": [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        }

    def _client(self) -> aiomqtt.Client:
        """The subscription: persistent session, acknowledgements only after the commit."""
        common = self._connection_options(self.client_id)
        if self.settings.mqtt_v5:
            # MQTT 5: a persistent session that expires, and a receive window the broker honours.
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = int(self.settings.ingest_session_expiry_s)
            props.ReceiveMaximum = 4 * self.settings.ingest_batch_size
            client = aiomqtt.Client(
                protocol=aiomqtt.ProtocolVersion.V5,
                clean_start=False,
                properties=props,
                **common,
            )
        else:
            client = aiomqtt.Client(
                protocol=aiomqtt.ProtocolVersion.V311,
                clean_session=False,
                **common,
            )
        # Acknowledge a QoS 1 message only after its batch committed (paho's manual acks).
        client._client.manual_ack_set(True)
        # A batch publishes its portal updates concurrently; hundreds pending is normal, not a warning.
        client.pending_calls_threshold = 10 * self.settings.ingest_batch_size
        return client

    def _publisher(self) -> aiomqtt.Client:
        """Portal documents go out on a connection of their own: their acknowledgements must not
        queue behind reports on the subscription, which the read gate may hold."""
        client = aiomqtt.Client(
            protocol=aiomqtt.ProtocolVersion.V5 if self.settings.mqtt_v5 else aiomqtt.ProtocolVersion.V311,
            **self._connection_options(f"{self.client_id}-pub"),
        )
        client.pending_calls_threshold = 10 * self.settings.ingest_batch_size
        return client

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Consume until ``stop`` is set; reconnect after any failure, never give up."""
        stop = stop or asyncio.Event()
        delay = 0.5
        while not stop.is_set():
            started = time.monotonic()
            try:
                async with self._client() as client, self._publisher() as publisher:
                    self._recovered("broker")
                    await self._session(client, publisher, stop)
            except aiomqtt.MqttError as exc:
                self._failing("broker", f"MQTT connection lost or refused ({exc})")
            except Exception:
                log.exception("ingest session failed; starting a new one")
            self.ready.clear()
            if stop.is_set():
                break
            delay = 0.5 if time.monotonic() - started > 30 else min(delay * 2, MAX_BACKOFF_S)
            await _sleep_or_stop(stop, delay)

    async def _session(self, client: aiomqtt.Client, publisher: aiomqtt.Client, stop: asyncio.Event) -> None:
        report_topic = REPORT_SUBSCRIPTION
        if self.shared:
            report_topic = f"$share/{self.settings.ingest_share_group}/{REPORT_SUBSCRIPTION}"
        jobs = [
            (f"$share/{self.settings.ingest_share_group}/{t}" if self.shared else t, 1)
            for t in (REQUEST_SUBSCRIPTIONS if self.settings.aws_jobs else ())
        ]
        await client.subscribe([(report_topic, 1), (INFO_SUBSCRIPTION, 1), (ONLINE_SUBSCRIPTION, 1), *jobs])
        queue: asyncio.Queue[Incoming] = asyncio.Queue()
        high = self.settings.ingest_max_backlog
        self._publisher_failed = False
        gate = ReadGate(client, lambda: queue.qsize() + len(client.messages), high=high, low=high // 2)
        pauses_before = self.stats["read_pauses"]
        tasks = [
            asyncio.create_task(self._read(client, queue)),
            asyncio.create_task(
                self._every(stop, self.settings.portal_summary_interval_ms / 1000, self._summaries, publisher)
            ),
            asyncio.create_task(self._every(stop, 1.0, self._flush_stats)),
        ]
        self.ready.set()
        log.info("ingest %s subscribed to %s", self.client_id, report_topic)
        try:
            while not stop.is_set():
                batch = await _next_batch(queue, self.settings.ingest_batch_size, stop)
                if batch:
                    await self._handle_until_applied(publisher, batch, stop)
                    for message in batch:
                        if message.qos > 0:
                            client._client.ack(message.mid, message.qos)
                gate.poll()
                self.stats["read_pauses"] = pauses_before + gate.pauses
                self.stats["backlog_peak"] = max(self.stats["backlog_peak"], gate.peak_backlog)
                for task in tasks:
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                if self._publisher_failed:
                    raise aiomqtt.MqttError("a portal publish failed; reconnecting both connections")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, client: aiomqtt.Client, queue: asyncio.Queue[Incoming]) -> None:
        async for message in client.messages:
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            size = len(payload)
            if size > MAX_DEVICE_PAYLOAD:
                payload = b""  # never kept: a flood of huge messages must not pile up in memory
            queue.put_nowait(
                Incoming(
                    message.topic.value, bytes(payload), bool(message.retain), message.qos, message.mid, size
                )
            )

    # ------------------------------------------------------------------ batches
    async def _handle_until_applied(
        self, publisher: aiomqtt.Client, batch: list[Incoming], stop: asyncio.Event
    ) -> None:
        parsed = self.guard.parse([(m.topic, m.payload, m.retain, m.size) for m in batch])
        self.stats["received"] += len(batch)
        self.stats["batches"] += 1
        if not parsed:
            return
        delay = 0.2
        while True:
            try:
                began = time.perf_counter()
                outcome = await asyncio.to_thread(self._apply_sync, parsed)
                self.metrics.batch_seconds.observe(time.perf_counter() - began)
                break
            except DatabaseUnavailable as exc:
                self._failing("database", str(exc))
                if stop.is_set():
                    raise
                await _sleep_or_stop(stop, delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
        self._recovered("database")
        self.stats.update(outcome.counters)
        # Steps and portal marks go out on their own thread: a Redis outage must not hold up reports.
        self._followers.submit(self._after_commit, outcome)
        await asyncio.gather(*(self._publish(publisher, t, p) for t, p in outcome.portal))
        await asyncio.gather(*(self._publish(publisher, t, p, retain=False) for t, p in outcome.jobs_replies))
        now = time.time()
        self.latencies_ms.extend((now - ts) * 1000 for ts in outcome.applied_ts)
        self.metrics.latencies(now - ts for ts in outcome.applied_ts)

    def _apply_sync(self, parsed: Parsed) -> BatchOutcome:
        """Apply the batch in one transaction; a batch that fails for a reason other than the database
        being away is applied item by item, and items that still fail are recorded as rejected."""
        try:
            return self._apply_all(parsed)
        except Exception as exc:
            if _transient(exc):
                raise DatabaseUnavailable(
                    f"database unavailable ({exc.__class__.__name__}: {_short(exc)})"
                ) from exc
            log.warning(
                "batch failed (%s); applying its %d reports one by one", _short(exc), len(parsed.reports)
            )
            self.stats["batches_split"] += 1
        outcome = BatchOutcome()
        singles: list[Parsed] = [Parsed(rejected=parsed.rejected)]
        singles += [Parsed(infos={d: i}) for d, i in parsed.infos.items()]
        singles += [Parsed(presence={d: p}) for d, p in parsed.presence.items()]
        singles += [Parsed(reports=[r]) for r in parsed.reports]
        singles += [Parsed(jobs=[j]) for j in parsed.jobs]
        for single in singles:
            try:
                outcome.merge(self._apply_all(single))
            except Exception as exc:
                if _transient(exc):
                    raise DatabaseUnavailable(str(exc)) from exc
                device = next(
                    iter(
                        [
                            *single.infos,
                            *single.presence,
                            *(d for d, _ in single.reports),
                            *(t.thing for t, _ in single.jobs),
                        ]
                    ),
                    "?",
                )
                self.guard.logs.warning("message from %s rejected by the database: %s", device, _short(exc))
                self.stats["poison"] += 1
                with contextlib.suppress(Exception), self.sessions() as session:
                    session.execute(insert(Event), [rejected_event(device, "poison", _short(exc))])
                    session.commit()
        return outcome

    def _apply_all(self, parsed: Parsed) -> BatchOutcome:
        outcome = BatchOutcome()
        with self.sessions() as session:
            try:
                if parsed.rejected:
                    session.execute(insert(Event), parsed.rejected)
                if parsed.infos or parsed.presence:
                    registered, _ = apply_inventory(session, parsed.infos, parsed.presence)
                    self.stats["devices_registered"] += registered
                if parsed.reports:
                    outcome = self.applier.apply(session, parsed.reports)
                session.commit()
                # One by one, each seeing what the one before changed (a start-next right after
                # a SUCCEEDED must not get the finished job again).
                for request in parsed.jobs:
                    outcome.jobs_replies += self._answer(session, outcome, *request)
            except BaseException:
                session.rollback()
                raise
        return outcome

    def _answer(
        self, session: Session, outcome: BatchOutcome, topic: RequestTopic, payload: bytes
    ) -> list[tuple[str, bytes]]:
        """One AWS Jobs request in its own transaction. A failure answers ``InternalError`` and
        never replays what the batch already committed (the device asks again)."""
        try:
            answered = self.gateway.handle(session, [(topic, payload)])
            if answered.reports:
                # AWS devices send no health heartbeats: their success is the end, without a soak.
                outcome.merge(self.applier.apply(session, answered.reports, soak=False))
            session.commit()
            replies = answered.finish(session)
            now = time.time()
            for thing in sorted(answered.changed_things):
                replies += self.gateway.notifications(session, thing, now)
            session.commit()
            return replies
        except Exception as exc:
            session.rollback()
            self.stats["jobs_errors"] += 1
            self.guard.logs.warning("jobs request on %s failed: %s", topic.reply_base, _short(exc))
            message = "the request could not be handled now; ask again"
            return [
                (
                    f"{topic.reply_base}/rejected",
                    rejection(RejectCode.INTERNAL_ERROR, message, client_token_of(payload), time.time()),
                )
            ]

    def _after_commit(self, outcome: BatchOutcome) -> None:
        """Send the steps the batch made due. A failure is logged: the reconciler re-sends them."""
        try:
            self._send_steps(outcome)
        except Exception:  # this thread must keep serving the next batches
            log.exception("sending the steps of a batch failed; the reconciler re-sends them")

    def _send_steps(self, outcome: BatchOutcome) -> None:
        try:
            if outcome.install_ids:
                self.dispatch.install(outcome.install_ids)
            if outcome.finalize_ids:
                self.dispatch.finalize(outcome.finalize_ids)
            if outcome.stage_ids:
                self.dispatch.republish(outcome.stage_ids)  # the soak or rollback document
            for rollout_id in sorted(outcome.retry_rollouts):
                self.dispatch.offer(rollout_id)
            if outcome.install_ids or outcome.finalize_ids or outcome.retry_rollouts:
                self._recovered("celery broker")
        except DispatchFailed as exc:
            self.stats["dispatch_failed"] += 1
            self._failing("celery broker", f"{exc}; the reconciler re-sends the steps")
        self.stats["steps_sent"] += len(outcome.install_ids) + len(outcome.finalize_ids)
        self.marks.mark(*outcome.dirty_rollouts)

    async def _publish(
        self, client: aiomqtt.Client, topic: str, payload: bytes, *, retain: bool = True
    ) -> None:
        """QoS 1 publish (retained unless told) that cannot hang the loop on a lost acknowledgement."""
        try:
            await client.publish(topic, payload, qos=1, retain=retain, timeout=PUBLISH_TIMEOUT_S)
        except aiomqtt.MqttError:
            self.stats["portal_publish_failed"] += 1
            self._publisher_failed = True

    # ------------------------------------------------------------------ periodic
    async def _every(
        self, stop: asyncio.Event, interval: float, fn: Callable[..., Awaitable[None]], *args: Any
    ) -> None:
        while not stop.is_set():
            await asyncio.sleep(interval)
            try:
                await fn(*args)
            except aiomqtt.MqttError:
                raise  # the connection is gone: the session reconnects
            except Exception as exc:
                self.guard.logs.warning("%s failed (%s); next round", fn.__name__, _short(exc))

    async def _summaries(self, client: aiomqtt.Client) -> None:
        try:
            messages = await asyncio.to_thread(self._summary_messages)
        except Exception:
            self._dirty |= self._last_summary_ids  # a summary is only a view of SQL: next round
            raise
        await asyncio.gather(*(self._publish(client, t, p) for t, p in messages))
        self.stats["summaries"] += len(messages)

    def _summary_messages(self) -> list[tuple[str, bytes]]:
        try:
            popped = self.marks.pop()
            self._recovered("redis")
        except redis.RedisError as exc:
            self._failing("redis", f"cannot read rollouts to refresh ({exc})")
            popped = set()
        dirty = self._dirty | popped
        self._dirty = set()
        self._last_summary_ids = dirty
        messages: list[tuple[str, bytes]] = []
        if not dirty:
            return messages
        with self.sessions() as session:
            for rollout_id in sorted(dirty):
                message = rollout_message(session, rollout_id)
                if message is not None:
                    messages.append(message)
            session.rollback()
        return messages

    async def _flush_stats(self) -> None:
        snapshot: dict[str, Any] = dict(self.stats + self.guard.stats)
        if self.latencies_ms:
            ordered = sorted(self.latencies_ms)
            snapshot["latency_p50_ms"] = round(ordered[len(ordered) // 2], 2)
            snapshot["latency_p99_ms"] = round(ordered[int(len(ordered) * 0.99)], 2)
        snapshot["updated"] = time.time()
        self.metrics.count(snapshot)
        with contextlib.suppress(redis.RedisError):  # statistics only; the next second tries again
            await asyncio.to_thread(self.redis.hset, STATS_KEY, self.client_id, json.dumps(snapshot))
        await asyncio.to_thread(self.metrics.publish, self.redis, force=True)

    # ------------------------------------------------------------------ outages
    def _failing(self, what: str, message: str) -> None:
        """Log an outage once, when it starts."""
        if what not in self._outage:
            self._outage[what] = time.monotonic()
            log.warning("%s: %s; retrying with backoff", what, message)
        self.stats[f"{what.replace(' ', '_')}_errors"] += 1

    def _recovered(self, what: str) -> None:
        started = self._outage.pop(what, None)
        if started is not None:
            log.info("%s is back after %.1fs", what, time.monotonic() - started)


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    return text[:200]


class Incoming(NamedTuple):
    """A received message, reduced to what ingest needs (an oversized payload is dropped at once)."""

    topic: str
    payload: bytes
    retain: bool
    qos: int
    mid: int
    size: int


async def _next_batch(queue: asyncio.Queue[Incoming], size: int, stop: asyncio.Event) -> list[Incoming]:
    """Whatever has accumulated, up to ``size``; waits (briefly, to notice ``stop``) when empty."""
    try:
        first = await asyncio.wait_for(queue.get(), timeout=0.5)
    except TimeoutError:
        return []
    batch = [first]
    while len(batch) < size and not queue.empty():
        batch.append(queue.get_nowait())
    return batch


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


def run_ingest(settings: Settings) -> None:
    """Blocking entry point for ``fleet ingest``; stops on SIGINT/SIGTERM."""
    import signal

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await IngestService(settings).run(stop)

    asyncio.run(main())
