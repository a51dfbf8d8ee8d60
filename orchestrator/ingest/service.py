"""``fleet ingest``: the long-running MQTT subscriber for device reports, info and presence.

Messages are taken in whatever batch has accumulated (no artificial wait, so latency stays low when
quiet and batches grow under load), applied to SQL in a worker thread, mirrored to retained portal
topics, and the parked chains they release are resumed. Several ingest processes share the report
stream through an MQTT shared subscription where the broker has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections import Counter, deque
from typing import Any

import aiomqtt
import redis
from pydantic import ValidationError

from orchestrator.config import Settings
from orchestrator.db import session_factory
from orchestrator.ingest.inventory import apply_inventory
from orchestrator.ingest.report_applier import BatchOutcome, ReportApplier
from orchestrator.mqtt_link import BrokerAddress
from orchestrator.portal import rollout_message
from orchestrator.protocol import (
    INFO_SUBSCRIPTION,
    OFFLINE,
    ONLINE,
    ONLINE_SUBSCRIPTION,
    REPORT_SUBSCRIPTION,
    DeviceInfo,
    Report,
    device_topic_parts,
)
from orchestrator.worker.celery_app import app as celery_app
from orchestrator.worker.continuations import DIRTY_ROLLOUTS, ContinuationStore

log = logging.getLogger(__name__)
STATS_KEY = "fleet:ingest:stats"
SHARE_GROUP = "fleet-ingest"
PUBLISH_TIMEOUT_S = 15.0


class IngestService:
    def __init__(self, settings: Settings, *, client_id: str | None = None) -> None:
        self.settings = settings
        # Stable across restarts, so a persistent session is resumed rather than left behind.
        self.client_id = client_id or settings.ingest_client_id or f"fleet-ingest-{socket.gethostname()}"
        self.sessions = session_factory(settings.database_url)
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
        self.store = ContinuationStore(self.redis, celery_app)
        self.applier = ReportApplier()
        self.stats: Counter[str] = Counter()
        self.latencies_ms: deque[float] = deque(maxlen=20000)
        self._dirty: set[int] = set()
        self._last_summary_ids: set[int] = set()
        self.ready = asyncio.Event()

    # ------------------------------------------------------------------ connection
    def _client(self) -> aiomqtt.Client:
        address = BrokerAddress.parse(self.settings.mqtt_url)
        client = aiomqtt.Client(
            address.host,
            address.port,
            identifier=self.client_id,
            username=self.settings.mqtt_username,
            password=self.settings.mqtt_password,
            # Alone, ingest keeps a persistent session: reports published while it restarts wait at
            # the broker. In a shared group it must not: the broker keeps handing a dead member its
            # share of the reports, which would then wait for a client that never returns.
            clean_session=self.settings.mqtt_shared_subscriptions,
            protocol=aiomqtt.ProtocolVersion.V311,
            keepalive=30,
            max_inflight_messages=1000,
            # Small request/response messages: without this, Nagle + delayed ACK add ~40 ms a hop.
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
        )
        # A batch publishes its portal updates concurrently; hundreds pending is normal, not a warning.
        client.pending_calls_threshold = 10 * self.settings.ingest_batch_size
        return client

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Consume until ``stop`` is set, reconnecting after broker restarts."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                async with self._client() as client:
                    await self._session(client, stop)
            except aiomqtt.MqttError as exc:
                self.ready.clear()
                log.warning("MQTT connection lost (%s); reconnecting in 1s", exc)
                await _sleep_or_stop(stop, 1.0)

    async def _session(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        report_topic = REPORT_SUBSCRIPTION
        if self.settings.mqtt_shared_subscriptions:
            report_topic = f"$share/{SHARE_GROUP}/{REPORT_SUBSCRIPTION}"
        await client.subscribe([(report_topic, 1), (INFO_SUBSCRIPTION, 1), (ONLINE_SUBSCRIPTION, 1)])
        queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        tasks = [
            asyncio.create_task(self._read(client, queue)),
            asyncio.create_task(self._summaries(client, stop)),
            asyncio.create_task(self._flush_stats(stop)),
        ]
        self.ready.set()
        log.info("ingest %s subscribed to %s", self.client_id, report_topic)
        try:
            while not stop.is_set():
                batch = await _next_batch(queue, self.settings.ingest_batch_size, stop)
                if batch:
                    await self._handle(client, batch)
                for task in tasks:
                    if task.done() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _read(self, client: aiomqtt.Client, queue: asyncio.Queue[aiomqtt.Message]) -> None:
        async for message in client.messages:
            queue.put_nowait(message)

    # ------------------------------------------------------------------ batches
    def _parse(
        self, batch: list[aiomqtt.Message]
    ) -> tuple[list[tuple[str, Report]], dict[str, DeviceInfo], dict[str, bool]]:
        reports: list[tuple[str, Report]] = []
        infos: dict[str, DeviceInfo] = {}
        presence: dict[str, bool] = {}
        for message in batch:
            parts = device_topic_parts(message.topic.value)
            payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
            if parts is None:
                self.stats["unexpected_topic"] += 1
                continue
            device_id, kind = parts
            if not payload:
                continue  # a cleared retained topic
            try:
                if kind == "report":
                    reports.append((device_id, Report.model_validate_json(payload)))
                elif kind == "info":
                    infos[device_id] = DeviceInfo.model_validate_json(payload)
                elif kind == "online":
                    text = bytes(payload).decode("utf-8", "replace").strip()
                    if text not in (ONLINE, OFFLINE):
                        raise ValueError(f"online payload must be {ONLINE!r} or {OFFLINE!r}")
                    presence[device_id] = text == ONLINE
            except (ValidationError, ValueError) as exc:
                self.stats[f"malformed_{kind}"] += 1
                log.warning("malformed %s from %s dropped: %s", kind, device_id, str(exc).splitlines()[0])
        return reports, infos, presence

    def _apply_sync(
        self, reports: list[tuple[str, Report]], infos: dict[str, DeviceInfo], presence: dict[str, bool]
    ) -> BatchOutcome:
        outcome = BatchOutcome()
        with self.sessions() as session:
            if infos or presence:
                registered, _ = apply_inventory(session, infos, presence)
                self.stats["devices_registered"] += registered
            if reports:
                outcome = self.applier.apply(session, reports)
        return outcome

    def _resume_sync(self, outcome: BatchOutcome) -> int:
        resumed = 0
        for _update_id, chain in self.store.claim_many(outcome.claims):
            self.store.resume(chain)
            resumed += 1
        if outcome.dirty_rollouts:
            self.store.mark_dirty(*outcome.dirty_rollouts)
        return resumed

    async def _handle(self, client: aiomqtt.Client, batch: list[aiomqtt.Message]) -> None:
        reports, infos, presence = self._parse(batch)
        self.stats["received"] += len(batch)
        self.stats["batches"] += 1
        if not (reports or infos or presence):
            return
        outcome = await asyncio.to_thread(self._apply_sync, reports, infos, presence)
        self.stats.update(outcome.counters)
        publishes = asyncio.gather(*(self._publish(client, t, p) for t, p in outcome.portal))
        resumed = await asyncio.to_thread(self._resume_sync, outcome)
        await publishes
        now = time.time()
        self.latencies_ms.extend((now - ts) * 1000 for ts in outcome.applied_ts)
        self.stats["resumed"] += resumed
        self._dirty |= outcome.dirty_rollouts

    async def _publish(self, client: aiomqtt.Client, topic: str, payload: bytes) -> None:
        """Retained QoS 1 publish that cannot hang the loop on a lost acknowledgement."""
        await client.publish(topic, payload, qos=1, retain=True, timeout=PUBLISH_TIMEOUT_S)

    # ------------------------------------------------------------------ rollout summaries
    async def _summaries(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        interval = self.settings.portal_summary_interval_ms / 1000
        while not stop.is_set():
            await asyncio.sleep(interval)
            try:
                messages = await asyncio.to_thread(self._summary_messages)
                await asyncio.gather(*(self._publish(client, t, p) for t, p in messages))
            except aiomqtt.MqttError:
                raise  # the connection is gone: the session reconnects
            except Exception:
                # A summary is only a view of SQL: log, and publish it again on the next round.
                log.exception("publishing rollout summaries failed; retrying")
                self._dirty |= self._last_summary_ids
                continue
            self.stats["summaries"] += len(messages)

    def _summary_messages(self) -> list[tuple[str, bytes]]:
        popped = self.redis.spop(DIRTY_ROLLOUTS, 1000) or []
        dirty = self._dirty | {int(x) for x in popped}
        self._dirty = set()
        self._last_summary_ids = dirty
        messages: list[tuple[str, bytes]] = []
        with self.sessions() as session:
            for rollout_id in sorted(dirty):
                message = rollout_message(session, rollout_id)
                if message is not None:
                    messages.append(message)
            session.rollback()
        return messages

    async def _flush_stats(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(1.0)
            snapshot: dict[str, Any] = dict(self.stats)
            if self.latencies_ms:
                ordered = sorted(self.latencies_ms)
                snapshot["latency_p50_ms"] = round(ordered[len(ordered) // 2], 2)
                snapshot["latency_p99_ms"] = round(ordered[int(len(ordered) * 0.99)], 2)
            snapshot["updated"] = time.time()
            await asyncio.to_thread(self.redis.hset, STATS_KEY, self.client_id, json.dumps(snapshot))


async def _next_batch(
    queue: asyncio.Queue[aiomqtt.Message], size: int, stop: asyncio.Event
) -> list[aiomqtt.Message]:
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
