"""Webhooks end to end: a real local HTTP receiver gets every state change of a small rollout
exactly once, signed, although it refuses its first requests and the deliveries are retried."""

from __future__ import annotations

import http.server
import json
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from orchestrator.config import Settings
from orchestrator.db import session_scope
from orchestrator.engine.webhook_delivery import backoff
from orchestrator.models import Event, WebhookDelivery
from orchestrator.policy import RolloutPolicy
from orchestrator.services import webhook_service
from orchestrator.webhooks import state_change, verify
from tests.integration.harness import QUICK_REAL, Harness, running_harness

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Receiver:
    """An HTTP server on a free loopback port that answers 500 to its first ``refuse`` requests."""

    def __init__(self, refuse: int) -> None:
        self.refuse = refuse
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.accepted: list[tuple[dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {k: v for k, v in self.headers.items()}
                with receiver.lock:
                    receiver.requests.append((headers, body))
                    ok = len(receiver.requests) > receiver.refuse
                    if ok:
                        receiver.accepted.append((headers, body))
                self.send_response(204 if ok else 500)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stack(tmp_path: Path, database_url: str, redis_url: str, mqtt_broker: Any) -> Iterator[Harness]:
    if database_url.startswith("sqlite") == (mqtt_broker.kind == "external"):
        pytest.skip("full-stack tests run on [sqlite-embedded] and [postgres-external] only")
    with running_harness(tmp_path / "stack", database_url, redis_url, mqtt_broker) as h:
        yield h


def test_every_state_change_reaches_the_receiver_once_signed_after_retries(stack: Harness) -> None:
    h = stack
    receiver = Receiver(refuse=3)
    try:
        # Given an endpoint for rollout and device-update changes, and four devices
        settings = Settings(database_url=h.database_url)
        with session_scope(h.database_url) as session:
            _endpoint, secret = webhook_service.create_endpoint(
                session,
                url=receiver.url,
                events=["rollout", "device_update"],
                description="test receiver",
                server_key=settings.secret_key,
                allow_loopback=True,
            )
        h.start_fleet(4, prefix="hook-", profile="instant", params=QUICK_REAL)
        # When a rollout runs to its end
        rollout_id = h.start_rollout("hook-", RolloutPolicy(waves=["100%"]))
        h.wait_status(rollout_id, "COMPLETED", timeout=60)
        with session_scope(h.database_url) as session:
            events = list(session.scalars(select(Event).where(Event.rollout_id == rollout_id)))
        expected = {e.id for e in events if state_change(e) is not None}
        assert len(expected) > 4 * 5  # offers, reports, ends, and the rollout's own changes

        def all_delivered() -> bool:
            with receiver.lock:
                return {int(hd["Fleet-Event-Id"]) for hd, _ in receiver.accepted} >= expected

        assert h.wait(all_delivered, 60 + backoff(2).total_seconds())
        # Then each state change was accepted exactly once, every signature verifies, and the
        # refused first requests were retried
        with receiver.lock:
            accepted = list(receiver.accepted)
            refused = len(receiver.requests) - len(accepted)
        per_event = Counter(int(hd["Fleet-Event-Id"]) for hd, _ in accepted)
        assert set(per_event) == expected and set(per_event.values()) == {1}
        assert refused == 3
        for headers, body in accepted:
            assert verify(secret, body, headers["Fleet-Signature"])
            assert not verify(secret, body + b" ", headers["Fleet-Signature"])
        kinds = Counter(json.loads(body)["type"] for _, body in accepted)
        assert kinds["rollout.state"] >= 2 and kinds["device_update.state"] >= 4 * 5
        # and the deliveries say how they went
        with session_scope(h.database_url) as session:
            deliveries = list(session.scalars(select(WebhookDelivery)))
        assert {d.status for d in deliveries} == {"DELIVERED"}
        assert sum(d.attempts for d in deliveries) == len(deliveries) + 3
    finally:
        receiver.close()
