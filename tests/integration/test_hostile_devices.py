"""Devices cannot stop or fool ingest: hostile reports are rejected one by one, the rest is applied.

Real broker, Redis, database and ingest process (the harness stack). A device publishes, in one
burst, reports with integers beyond 64 bits, a 1 MiB version string, wrong types, a 1 MB payload, a
retained report, a flood, and between them one valid report. Ingest must keep running, apply the
valid report, record the rest as rejected, and change no row it should not.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, select

from orchestrator.db import session_scope
from orchestrator.models import DeviceUpdate, Event
from orchestrator.policy import RolloutPolicy
from orchestrator.protocol import info_topic, online_topic, report_topic
from tests.integration.harness import Harness, running_harness

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _publisher(h: Harness) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hostile-{secrets.token_hex(4)}")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(h.broker_host, h.broker_port)
    client.loop_start()
    return client


def _report(update_id: object, attempt: object, state: str, seq: object, version: object = "1.0.0") -> bytes:
    return json.dumps(
        {"update_id": update_id, "attempt": attempt, "state": state, "seq": seq, "running_version": version}
    ).encode()


def test_hostile_reports_are_rejected_and_the_valid_one_applied(harness: Harness) -> None:
    # Given two devices known to fleet (registered through their info topic), with updates offered
    pub = _publisher(harness)
    for device in ("hd-1", "hd-2"):
        info = {"model": "sensor-v2", "running_version": "1.0.0"}
        pub.publish(info_topic(device), json.dumps(info), qos=1, retain=True).wait_for_publish(5)
        pub.publish(online_topic(device), b"online", qos=1, retain=True).wait_for_publish(5)
    assert harness.wait(lambda: harness.device_count("hd-") == 2, 30)
    rollout_id = harness.start_rollout("hd-", RolloutPolicy(waves=["100%"], download_timeout_s=3600))
    assert harness.wait(lambda: harness.in_flight(rollout_id) == 2, 30)
    own, other = sorted(harness.updates(rollout_id), key=lambda u: u.device_id)
    ingest = harness.stack.processes["ingest"]
    pid = ingest.pid
    # When hd-1 sends a burst of hostile reports with one valid report among them
    topic = report_topic("hd-1")
    hostile = [
        _report(2**64, 1, "VERIFIED", 1),  # beyond any database integer
        _report(own.id, 2**70, "VERIFIED", 2),
        _report(own.id, 1, "VERIFIED", 2**64),
        _report(own.id, 1, "VERIFIED", -1),
        _report(own.id, 1, "VERIFIED", 3, version="x" * 60_000),  # far over its 64-character column
        _report("1", "1", "VERIFIED", "4"),  # wrong types
        _report(own.id, 1, "EXPLODED", 5),
        _report(other.id, 1, "SUCCEEDED", 6),  # another device's update
        b"{not json",
        b"x" * 50_000,  # over ingest's 8 KiB, under the broker's 64 KiB packet limit
        json.dumps({"update_id": own.id, "attempt": 1.5, "state": "VERIFIED", "seq": 7}).encode(),
    ]
    for payload in hostile[:5]:
        pub.publish(topic, payload, qos=1)
    pub.publish(topic, _report(own.id, 1, "VERIFIED", 10), qos=1)  # the valid one
    for payload in hostile[5:]:
        pub.publish(topic, payload, qos=1).wait_for_publish(10)
    # Then the valid report is applied, the rest rejected, and ingest kept running
    assert harness.wait(lambda: _state(harness, own.id) == "VERIFIED", 30)
    time.sleep(1)
    assert ingest.is_running() and ingest.pid == pid, ingest.log_tail(30)
    assert _state(harness, other.id) == "OFFERED", "another device's report changed its update"
    with session_scope(harness.database_url) as s:
        rejected = s.scalar(select(func.count()).where(Event.kind == "rejected", Event.device_id == "hd-1"))
        mismatch = s.scalar(
            select(func.count()).where(
                Event.kind == "report",
                Event.device_id == "hd-1",
                Event.detail["ignored"].as_string() == "device_mismatch",
            )
        )
    assert rejected and rejected >= 5, rejected
    assert mismatch == 1
    # A 1 MB payload: fleet's Mosquitto (max_packet_size 64 KiB) drops the client that sends it;
    # amqtt and a broker configured elsewhere pass it on, and ingest drops it unread
    big = _publisher(harness)
    dropped: list[object] = []
    big.on_disconnect = lambda *args: dropped.append(args)
    big.publish(topic, b"x" * 1_000_000, qos=1)
    if harness.broker_kind == "mosquitto":
        assert harness.wait(lambda: bool(dropped), 10)
    big.loop_stop()
    assert ingest.is_running() and ingest.pid == pid, ingest.log_tail(30)
    # And a later valid report still gets through
    pub.publish(topic, _report(own.id, 1, "INSTALLING", 20), qos=1, retain=True).wait_for_publish(5)
    assert harness.wait(lambda: _accepted_seq(harness, own.id, 20) is True, 10)
    # A report the device left retained is not replayed to a restarting ingest
    harness.stack.processes["ingest"].stop()
    harness.stack.start_ingest()

    def retained_refused() -> bool:
        with session_scope(harness.database_url) as s:
            rows = s.scalars(select(Event).where(Event.kind == "rejected", Event.device_id == "hd-1")).all()
            return any((e.detail or {}).get("reason") == "retained report" for e in rows)

    assert harness.wait(retained_refused, 20)
    assert _state(harness, own.id) == "INSTALLING"
    pub.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)  # leave no retained report behind
    pub.disconnect()
    pub.loop_stop()


def _state(h: Harness, update_id: int) -> str:
    with session_scope(h.database_url) as s:
        return str(s.get_one(DeviceUpdate, update_id).state)


def _accepted_seq(h: Harness, update_id: int, seq: int) -> bool | None:
    with session_scope(h.database_url) as s:
        event = s.scalar(select(Event).where(Event.device_update_id == update_id, Event.seq == seq))
        return None if event is None else bool(event.accepted)


def test_a_flooding_device_is_throttled_and_others_are_served(harness: Harness) -> None:
    pub = _publisher(harness)
    info = {"model": "sensor-v2", "running_version": "1.0.0"}
    pub.publish(info_topic("fl-quiet"), json.dumps(info), qos=1, retain=True).wait_for_publish(5)
    pub.publish(info_topic("fl-loud"), json.dumps(info), qos=1, retain=True).wait_for_publish(5)
    assert harness.wait(lambda: harness.device_count("fl-") == 2, 30)
    rollout_id = harness.start_rollout("fl-", RolloutPolicy(waves=["100%"], download_timeout_s=3600))
    assert harness.wait(lambda: harness.in_flight(rollout_id) == 2, 30)
    quiet = next(u for u in harness.updates(rollout_id) if u.device_id == "fl-quiet")
    # When one device sends 3,000 reports as fast as it can
    for seq in range(3000):
        pub.publish(report_topic("fl-loud"), _report(999_999, 1, "DOWNLOADING", seq), qos=0)
    pub.publish(report_topic("fl-quiet"), _report(quiet.id, 1, "VERIFIED", 1), qos=1).wait_for_publish(10)
    # Then the quiet device's report is applied, and the loud one was throttled
    assert harness.wait(lambda: _state(harness, quiet.id) == "VERIFIED", 30)
    stats = _ingest_stats(harness)
    assert stats.get("throttled", 0) > 0, stats
    assert harness.stack.processes["ingest"].is_running()
    pub.disconnect()
    pub.loop_stop()


def _ingest_stats(h: Harness) -> dict[str, int]:
    import redis

    deadline = time.monotonic() + 5
    while True:
        client = redis.Redis.from_url(h.stack.settings.redis_url)
        try:
            raw = client.hgetall("fleet:ingest:stats")
        finally:
            client.close()
        stats = json.loads(next(iter(raw.values()))) if raw else {}
        if stats.get("throttled") or time.monotonic() > deadline:
            return stats
        time.sleep(0.5)


def test_a_burst_waits_at_the_broker_not_in_ingest_memory(
    tmp_path: Path, database_url: str, redis_url: str, mqtt_broker: Any
) -> None:
    if database_url.startswith("sqlite") == (mqtt_broker.kind == "external"):
        pytest.skip("full-stack tests run on [sqlite-embedded] and [postgres-external] only")
    env = {"FLEET_INGEST_MAX_BACKLOG": "10"}
    with running_harness(tmp_path / "stack", database_url, redis_url, mqtt_broker, extra_env=env) as h:
        pub = _publisher(h)
        info = {"model": "sensor-v2", "running_version": "1.0.0"}
        pub.publish(info_topic("bp-quiet"), json.dumps(info), qos=1, retain=True).wait_for_publish(5)
        assert h.wait(lambda: h.device_count("bp-") == 1, 30)
        rollout_id = h.start_rollout("bp-", RolloutPolicy(waves=["100%"], download_timeout_s=3600))
        assert h.wait(lambda: h.in_flight(rollout_id) == 1, 30)
        quiet = h.updates(rollout_id)[0]
        # When a device sends 2,000 reports in one burst, then another device one valid report
        for seq in range(2000):
            pub.publish(report_topic("bp-loud"), _report(999_999, 1, "DOWNLOADING", seq), qos=1)
        pub.publish(report_topic("bp-quiet"), _report(quiet.id, 1, "VERIFIED", 1), qos=1).wait_for_publish(30)
        # Then every message reached ingest, which never held more than its limit, and the valid
        # report was applied
        assert h.wait(lambda: _state(h, quiet.id) == "VERIFIED", 60)
        assert h.wait(lambda: _counters(h).get("received", 0) >= 2001, 60), _counters(h)
        counters = _counters(h)
        assert counters["backlog_peak"] <= 11, counters
        assert counters.get("read_pauses", 0) >= 1, counters
        assert h.stack.processes["ingest"].is_running()
        pub.disconnect()
        pub.loop_stop()


def _counters(h: Harness) -> dict[str, int]:
    import redis

    client = redis.Redis.from_url(h.stack.settings.redis_url)
    try:
        raw = client.hgetall("fleet:ingest:stats")
    finally:
        client.close()
    return json.loads(next(iter(raw.values()))) if raw else {}
