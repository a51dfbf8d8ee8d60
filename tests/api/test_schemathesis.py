"""Property-based run over /openapi.json: no 5xx, and responses match the documented schemas.

Bounded: a few examples per operation and generation mode, once with random path ids and once with
the ids of existing objects, so the whole run stays within seconds per database backend.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.orm import Session

from orchestrator.api.app import create_app
from orchestrator.config import Settings
from tests.api.conftest import upload
from tests.factories import add_devices

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Raise for a deeper local run, e.g. FLEET_SCHEMATHESIS_EXAMPLES=200.
MAX_EXAMPLES = int(os.environ.get("FLEET_SCHEMATHESIS_EXAMPLES", "12"))


def _run(operation: Any, mode: schemathesis.GenerationMode, headers: dict[str, str], **fixed: Any) -> None:
    strategy = operation.as_strategy(generation_mode=mode, **fixed)

    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    try:
        check()
    except Unsatisfiable:
        # Nothing to negate: an operation without parameters or body has no invalid input.
        if mode != schemathesis.GenerationMode.NEGATIVE:
            raise


@pytest.fixture
def healthy_app(api_settings: Settings, mqtt_broker: Any, celery_to_test_redis: Any) -> FastAPI:
    """The app with a broker to talk to, so that /healthz answers 200 (a 503 would count as a failure)."""
    return create_app(api_settings.model_copy(update={"mqtt_url": mqtt_broker.url}))


@pytest.mark.slow
def test_openapi_operations_never_fail_on_the_server(
    healthy_app: FastAPI, operator: dict[str, str], session: Session
) -> None:
    app = healthy_app
    client = TestClient(app)
    add_devices(session, 5)
    firmware_id = upload(client, operator).json()["id"]
    body = {"name": "seed", "firmware_id": firmware_id, "target": {"model": "sensor-v2"}}
    rollout_id = client.post("/v1/rollouts", headers=operator, json=body).json()["id"]
    group = {"name": "seed-group", "filter": {"model": "sensor-v2"}}
    assert client.post("/v1/groups", headers=operator, json=group).status_code == 201
    hook = {"url": "https://hooks.example.com/fleet", "events": ["rollout"]}
    webhook_id = client.post("/v1/webhooks", headers=operator, json=hook).json()["id"]
    known = {
        "device_id": "dev-00000",
        "firmware_id": firmware_id,
        "rollout_id": rollout_id,
        "name": "seed-group",
        "webhook_id": webhook_id,
    }

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 16
    for operation in operations:
        path_names = {p.name for p in operation.path_parameters}
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            _run(operation, mode, operator)
        if path_names:
            fixed = {name: known[name] for name in path_names}
            _run(operation, schemathesis.GenerationMode.POSITIVE, operator, path_parameters=fixed)
