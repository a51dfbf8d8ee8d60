"""Server-side faults cost seconds and lose nothing: real Redis, broker, database, workers, ingest, devices.

Each test breaks one dependency or process in the middle of a rollout and checks that no service
process died of it, that the rollout completed with one end state and one install per device, and
that no update needed a second attempt.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from orchestrator.config import Settings
from orchestrator.db import session_scope, upgrade_database
from orchestrator.embedded import ProcessStartError, RedisServer, ServerNotFoundError
from orchestrator.embedded.postgres_cluster import PostgresCluster
from orchestrator.models import Wave
from orchestrator.policy import RolloutPolicy
from orchestrator.services.firmware_service import add_firmware
from tests.conftest import unavailable
from tests.integration.harness import QUICK_REAL, Harness, running_harness
from tests.integration.test_rollout_engine import assert_one_end_state_and_full_trail

pytestmark = [pytest.mark.integration, pytest.mark.slow]
STEADY = {**QUICK_REAL, "install_time": "0.3:0.8"}


def _alive(h: Harness, *names: str) -> dict[str, int | None]:
    """pid of each named stack process; fails if one has exited."""
    pids = {}
    for name in names:
        process = h.stack.processes[name]
        assert process.is_running(), f"{name} exited:\n{process.log_tail(30)}"
        pids[name] = process.pid
    return pids


def _no_retries(h: Harness, rollout_id: int) -> None:
    second = [(u.device_id, u.attempt, u.error_code) for u in h.updates(rollout_id) if u.attempt > 1]
    assert not second, f"updates that needed a second attempt: {second}"


@pytest.fixture
def embedded_only(mqtt_broker: Any, database_url: str) -> None:
    if mqtt_broker.kind == "external" or not database_url.startswith("sqlite"):
        pytest.skip("runs once, on SQLite and the embedded broker")


# ------------------------------------------------------------------ Redis
def test_a_redis_outage_costs_seconds_and_no_report(
    tmp_path: Path, database_url: str, mqtt_broker: Any, embedded_run_dir: Path, embedded_only: None
) -> None:
    redis = RedisServer(run_dir=embedded_run_dir).start()
    port = redis.port
    try:
        with running_harness(tmp_path / "stack", database_url, redis.url, mqtt_broker) as h:
            h.start_fleet(60, prefix="rds-", profile="instant", params=STEADY)
            rollout_id = h.start_rollout("rds-", RolloutPolicy(waves=["100%"], max_in_flight=20))
            assert h.wait(lambda: h.counts(rollout_id).get("SUCCEEDED", 0) >= 5, 60)
            before = _alive(h, "ingest", "worker1", "beat", "api")
            # When Redis goes away (no persistence: every queued step is lost) and comes back
            redis.stop()
            time.sleep(4)
            assert _alive(h, "ingest", "worker1", "beat", "api") == before
            redis = RedisServer(run_dir=embedded_run_dir, port=port).start()
            # Then the rollout completes, with the same processes and nothing done twice
            h.wait_status(rollout_id, "COMPLETED", timeout=120)
            assert _alive(h, "ingest", "worker1", "beat", "api") == before
            assert h.counts(rollout_id) == {"SUCCEEDED": 60}
            assert h.versions("rds-") == {"1.1.0": 60}
            assert_one_end_state_and_full_trail(h, rollout_id)
            _no_retries(h, rollout_id)
            ingest_log = h.stack.processes["ingest"].log_file.read_text()
            assert "retrying with backoff" in ingest_log and "is back after" in ingest_log
    finally:
        redis.stop()


def test_a_worker_survives_losing_redis_while_a_step_runs_and_it_waits(
    tmp_path: Path, embedded_run_dir: Path
) -> None:
    """Stock kombu 5.7 exits the worker here: the channel it detached on the connection error is
    closed again (pushing back unacked messages) and acknowledged on (the running step ends)."""
    import sys

    from celery import Celery

    from orchestrator.embedded import ManagedProcess
    from orchestrator.engine.celery_config import make_celery
    from orchestrator.local_stack import wait_until

    root = Path(__file__).resolve().parents[2]
    redis = RedisServer(run_dir=embedded_run_dir).start()
    port = redis.port
    log_path = tmp_path / "worker.log"

    def sender() -> Celery:
        return make_celery(Settings(redis_url=redis.url))

    def log_text() -> str:
        return log_path.read_text(errors="replace")

    worker = ManagedProcess(
        [sys.executable, "-m", "celery", "-A", "tests.integration.redis_loss_app", "worker",
         "-c", "2", "-Q", "fleet", "--without-gossip", "--without-mingle", "-l", "INFO"],
        name="worker", pid_file=tmp_path / "worker.pid", log_file=log_path, marker="celery",
        env={**os.environ, "FLEET_REDIS_URL": redis.url, "PYTHONPATH": str(root)}, cwd=root,
    )  # fmt: skip
    try:
        worker.start()
        worker.wait_ready(lambda: "ready." in log_text(), timeout=60)
        # Given a step running in one pool process while the consumer waits for more messages
        started, first_done, second_done = (tmp_path / n for n in ("started", "first", "second"))
        sender().send_task("probe.sleep", args=[str(started), str(first_done), 3.0])
        assert wait_until(started.exists, 30, 0.05), log_text()[-3000:]
        # When Redis goes away (the step ends meanwhile) and comes back without its data
        redis.stop()
        assert wait_until(lambda: "Connection to broker lost" in log_text(), 20, 0.1), log_text()[-3000:]
        assert wait_until(first_done.exists, 20, 0.1)
        time.sleep(1)
        redis = RedisServer(run_dir=embedded_run_dir, port=port).start()
        # Then the same worker process reconnects and runs the next step
        sender().send_task("probe.sleep", args=[str(tmp_path / "s2"), str(second_done), 0.0])
        assert wait_until(lambda: second_done.exists() or not worker.is_running(), 60, 0.1)
        assert worker.is_running() and second_done.exists(), worker.log_tail(40)
        assert "Unrecoverable error" not in log_text()
    finally:
        worker.stop(timeout=20)
        redis.stop()


# ------------------------------------------------------------------ database
@pytest.fixture
def private_postgres(embedded_only: None) -> Iterator[tuple[PostgresCluster, str]]:
    try:
        cluster = PostgresCluster().start()
    except (ServerNotFoundError, ProcessStartError) as exc:
        unavailable(f"no private PostgreSQL cluster: {exc}")
    try:
        url = cluster.create_database("fleet")
        upgrade_database(url)
        yield cluster, url
    finally:
        cluster.destroy()


def test_a_database_outage_costs_seconds_and_no_report(
    tmp_path: Path, redis_url: str, mqtt_broker: Any, private_postgres: tuple[PostgresCluster, str]
) -> None:
    cluster, url = private_postgres
    with running_harness(tmp_path / "stack", url, redis_url, mqtt_broker) as h:
        h.start_fleet(40, prefix="pg-", profile="instant", params=STEADY)
        rollout_id = h.start_rollout("pg-", RolloutPolicy(waves=["100%"], max_in_flight=15))
        assert h.wait(lambda: h.counts(rollout_id).get("SUCCEEDED", 0) >= 5, 60)
        before = _alive(h, "ingest", "worker1", "beat", "api")
        # When PostgreSQL crashes and stays away for a while
        cluster.stop("immediate")
        time.sleep(5)
        health = json.loads(_get(f"{h.stack.api_url}/healthz"))
        assert health["status"] == "degraded" and health["checks"]["database"].startswith("error")
        assert _alive(h, "ingest", "worker1", "beat", "api") == before
        cluster.start()
        # Then the rollout completes, with the same processes and no report lost
        h.wait_status(rollout_id, "COMPLETED", timeout=120)
        assert _alive(h, "ingest", "worker1", "beat", "api") == before
        assert h.counts(rollout_id) == {"SUCCEEDED": 40}
        assert_one_end_state_and_full_trail(h, rollout_id)
        _no_retries(h, rollout_id)
        assert json.loads(_get(f"{h.stack.api_url}/healthz"))["status"] == "ok"


def _get(url: str) -> str:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())
    except urllib.error.HTTPError as exc:
        return str(exc.read().decode())


# ------------------------------------------------------------------ workers
def test_a_worker_killed_while_launching_a_wave_costs_seconds(
    tmp_path: Path, database_url: str, redis_url: str, mqtt_broker: Any, embedded_only: None
) -> None:
    # A dead worker's reserved messages would come back only after the visibility timeout (10 min here).
    env = {"FLEET_CELERY_VISIBILITY_TIMEOUT_S": "600"}
    with running_harness(tmp_path / "stack", database_url, redis_url, mqtt_broker, extra_env=env) as h:
        h.start_fleet(300, prefix="lw-", profile="instant")
        rollout_id = h.start_rollout("lw-", RolloutPolicy(waves=["100%"], max_in_flight=100))
        # When the worker and its pool are killed as soon as the wave runs (admission under way)
        worker = next(n for n in h.stack.processes if n.startswith("worker"))

        def wave_running() -> bool:
            with session_scope(h.database_url) as s:
                return s.scalar(select(Wave.status).where(Wave.rollout_id == rollout_id)) == "RUNNING"

        assert h.wait(wave_running, 30, interval=0.01)
        h.stack.kill(worker)
        launched = sum(h.counts(rollout_id).get(s, 0) for s in ("OFFERED", "DOWNLOADING", "SUCCEEDED"))
        h.stack.start_worker()
        # Then the reconciler resumes the launch from SQL well before any redelivery
        h.wait_status(rollout_id, "COMPLETED", timeout=240)
        assert h.counts(rollout_id) == {"SUCCEEDED": 300}, launched
        assert_one_end_state_and_full_trail(h, rollout_id)
        _no_retries(h, rollout_id)


# ------------------------------------------------------------------ overlapping rollouts
def test_a_superseding_rollout_waits_for_started_updates_and_cancels_the_rest(
    tmp_path: Path, database_url: str, redis_url: str, mqtt_broker: Any, embedded_only: None
) -> None:
    from orchestrator.errors import Conflict
    from orchestrator.policy import Target
    from orchestrator.services.rollout_planner import create_rollout
    from orchestrator.services.rollout_service import start_rollout

    slow = {**QUICK_REAL, "install_time": "1.0:1.5"}
    with running_harness(tmp_path / "stack", database_url, redis_url, mqtt_broker) as h:
        h.start_fleet(12, prefix="ov-", profile="instant", params=slow)
        first = h.start_rollout("ov-", RolloutPolicy(waves=["100%"], max_in_flight=4))
        assert h.wait(lambda: h.in_flight(first) >= 4, 30)
        newer = _firmware_120(h)
        ids = [f"ov-{i:05d}" for i in range(12)]
        with session_scope(h.database_url) as s:
            with pytest.raises(Conflict):
                create_rollout(
                    s, name="b", firmware_id=newer, target=Target(device_ids=ids), policy=RolloutPolicy()
                )
            s.rollback()
            second = create_rollout(
                s, name="b", firmware_id=newer, target=Target(device_ids=ids),
                policy=RolloutPolicy(waves=["100%"]), supersede=True,
            )  # fmt: skip
            s.commit()
            start_rollout(s, second.id, actor="test")
        h.wait_status(second.id, "COMPLETED", timeout=120)
        assert h.wait(lambda: h.settled(first), 60)
        old = {u.device_id: u for u in h.updates(first)}
        started = {d for d, u in old.items() if u.offered_at is not None}
        assert 4 <= len(started) < 12
        assert all(str(old[d].state) == "SUCCEEDED" for d in started)
        assert all(
            str(u.state) == "CANCELED" and u.error_code == "superseded"
            for d, u in old.items()
            if d not in started
        )
        assert h.counts(second.id) == {"SUCCEEDED": 12}
        assert h.versions("ov-") == {"1.2.0": 12}
        # the newer update of a device started only after its older one ended
        new = {u.device_id: u for u in h.updates(second.id)}
        for device in started:
            assert old[device].finished_at is not None and new[device].offered_at is not None
            assert new[device].offered_at >= old[device].finished_at
        assert_one_end_state_and_full_trail(h, first)
        assert_one_end_state_and_full_trail(h, second.id)


def _firmware_120(h: Harness) -> int:
    """sensor-v2 1.2.0, signed by the server's (dev-only) key like an upload without signature."""
    settings = Settings(database_url=h.database_url, firmware_dir=h.stack.settings.data_dir / "firmware")
    body = b"FLEETFW1" + json.dumps({"model": "sensor-v2", "version": "1.2.0"}).encode() + b"\n"
    body += secrets.token_bytes(150_000)
    path = h.stack.settings.data_dir / "fw-1.2.0.bin"
    path.write_bytes(body)
    with session_scope(h.database_url) as s, path.open("rb") as stream:
        return add_firmware(s, settings, stream, model="sensor-v2", version="1.2.0").id
