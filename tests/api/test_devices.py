"""Device routes: register, filtered cursor listing, one device with its update history."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from orchestrator.models import Device, Event, utcnow
from tests.api.conftest import assert_error, sample, upload
from tests.factories import add_devices

NEW = {"id": "sensor-000042", "model": "sensor-v2", "firmware_version": "1.0.0", "labels": {"site": "berlin"}}


def test_register_then_get(client: TestClient, operator: dict[str, str], session: Session) -> None:
    response = client.post("/v1/devices", headers=operator, json=NEW)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"] == NEW["id"] and body["labels"] == {"site": "berlin"} and body["online"] is False
    detail = client.get(f"/v1/devices/{NEW['id']}", headers=operator).json()
    assert detail["model"] == "sensor-v2" and detail["updates"] == []
    event = session.scalar(select(Event).where(Event.device_id == NEW["id"]))
    session.commit()
    assert event is not None and event.name == "device_registered" and event.detail["actor"] == "api:ops"


def test_register_a_device_that_speaks_the_aws_jobs_api(client: TestClient, operator: dict[str, str]) -> None:
    body = {**NEW, "id": "thing-7", "protocol": "aws-jobs"}
    response = client.post("/v1/devices", headers=operator, json=body)
    assert response.status_code == 201, response.text
    # no presence in the AWS Jobs API: it counts as online, and its jobs wait for it
    assert response.json()["protocol"] == "aws-jobs" and response.json()["online"] is True
    assert client.get("/v1/devices/thing-7", headers=operator).json()["protocol"] == "aws-jobs"
    assert client.post("/v1/devices", headers=operator, json=NEW).json()["protocol"] == "fleet"
    # a device id that is no AWS thing name (a dot) is refused for aws-jobs only
    dotted = {**NEW, "id": "thing.8", "protocol": "aws-jobs"}
    assert_error(client.post("/v1/devices", headers=operator, json=dotted), 422, "invalid_input", "id")


def test_register_duplicate_is_409(client: TestClient, operator: dict[str, str]) -> None:
    assert client.post("/v1/devices", headers=operator, json=NEW).status_code == 201
    assert_error(client.post("/v1/devices", headers=operator, json=NEW), 409, "already_exists", "id")


BAD_FIELDS: list[tuple[dict[str, object], str]] = [
    ({"id": "bad/id"}, "id"),
    ({"id": "a" * 129}, "id"),
    ({"id": "+lead"}, "id"),
    ({"model": ""}, "model"),
    ({"firmware_version": "1 0"}, "firmware_version"),
    ({"labels": {"bad key": "x"}}, "labels.bad key.[key]"),
    ({"labels": {"k": "v\x00"}}, "labels.k"),
    ({"labels": {"k": 3}}, "labels.k"),
    ({"extra": 1}, "extra"),
    ({"protocol": "lwm2m"}, "protocol"),
]


def test_register_rejects_bad_or_missing_fields(client: TestClient, operator: dict[str, str]) -> None:
    for change, field in BAD_FIELDS:
        response = client.post("/v1/devices", headers=operator, json={**NEW, **change})
        assert_error(response, 422, "invalid_input", field)
    for missing in ("id", "model", "firmware_version"):
        body = {k: v for k, v in NEW.items() if k != missing}
        assert_error(client.post("/v1/devices", headers=operator, json=body), 422, "invalid_input", missing)


def test_register_without_body_or_with_bad_json(client: TestClient, operator: dict[str, str]) -> None:
    assert_error(client.post("/v1/devices", headers=operator), 422, "invalid_input", "body")
    response = client.post(
        "/v1/devices", headers={**operator, "Content-Type": "application/json"}, content=b"{not json"
    )
    assert_error(response, 422, "invalid_input", "body")


def _seed(session: Session) -> None:
    now = utcnow()
    rows = [
        ("a-1", "sensor-v2", "1.0.0", {"site": "berlin", "ring": "beta"}, True),
        ("a-2", "sensor-v2", "1.0.0", {"site": "berlin", "ring": "stable"}, False),
        ("a-3", "sensor-v2", "1.1.0", {"site": "paris", "url": "http://x:1", "team.name-x/y": "ops"}, True),
        ("b-1", "gateway-x1", "1.0.0", {"site": "berlin"}, True),
    ]
    session.execute(
        insert(Device),
        [
            {"id": i, "model": m, "firmware_version": v, "labels": lb, "online": on, "created_at": now}
            for i, m, v, lb, on in rows
        ],
    )
    session.commit()


FILTERS = [
    ("", ["a-1", "a-2", "a-3", "b-1"]),
    ("?model=sensor-v2", ["a-1", "a-2", "a-3"]),
    ("?version=1.1.0", ["a-3"]),
    ("?online=false", ["a-2"]),
    ("?online=true&model=sensor-v2", ["a-1", "a-3"]),
    ("?label=site:berlin", ["a-1", "a-2", "b-1"]),
    ("?label=site:berlin&label=ring:beta", ["a-1"]),
    ("?label=url:http://x:1", ["a-3"]),
    ("?label=site:nowhere", []),
    ("?label=team.name-x/y:ops", ["a-3"]),
    ("?label=site:", []),
]


def test_list_filters(client: TestClient, viewer: dict[str, str], session: Session) -> None:
    _seed(session)
    for query, expected in FILTERS:
        response = client.get(f"/v1/devices{query}", headers=viewer)
        assert response.status_code == 200, response.text
        assert [d["id"] for d in response.json()["items"]] == expected, query


def test_cursor_pagination_walks_every_device_once(
    client: TestClient, viewer: dict[str, str], session: Session
) -> None:
    ids = add_devices(session, 250)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        body = client.get("/v1/devices", headers=viewer, params=params).json()
        seen += [d["id"] for d in body["items"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == ids and pages == 3


BAD_QUERIES = [
    ("?limit=0", "limit"),
    ("?limit=1001", "limit"),
    ("?limit=ten", "limit"),
    ("?online=maybe", "online"),
    ("?cursor=not-a-cursor", "cursor"),
    ("?cursor=WyJyb2xsb3V0cyIsMV0", "cursor"),  # a rollouts cursor
    ("?label=nocolon", "label"),
    ("?label=bad key:v", "label"),
    ("?model=%00", "model"),
]


def test_list_rejects_bad_parameters(client: TestClient, viewer: dict[str, str]) -> None:
    for query, field in BAD_QUERIES:
        assert_error(client.get(f"/v1/devices{query}", headers=viewer), 422, "invalid_input", field)


def test_unknown_device_is_404_and_bad_id_422(client: TestClient, viewer: dict[str, str]) -> None:
    assert_error(client.get("/v1/devices/nope", headers=viewer), 404, "not_found", "device_id")
    assert_error(client.get("/v1/devices/-bad", headers=viewer), 422, "invalid_input", "device_id")


def test_history_newest_first_and_limited(
    client: TestClient, operator: dict[str, str], session: Session
) -> None:
    add_devices(session, 2)
    fw_old = upload(client, operator).json()["id"]
    fw_other = upload(client, operator, sample("sensor-v2", "1.0.0")).json()["id"]
    ids = []
    for fw in (fw_old, fw_other):
        target = {"device_ids": ["dev-00000", "dev-00001"]}
        created = client.post(
            "/v1/rollouts", headers=operator, json={"name": f"r{fw}", "firmware_id": fw, "target": target}
        )
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    detail = client.get("/v1/devices/dev-00000", headers=operator).json()
    assert [u["rollout_id"] for u in detail["updates"]] == ids[::-1]
    # The second rollout targets 1.0.0, which the device runs already: skipped.
    assert detail["updates"][0]["state"] == "SKIPPED" and detail["updates"][0]["firmware_version"] == "1.0.0"
    assert detail["updates"][1]["state"] == "PENDING" and detail["updates"][1]["rollout_status"] == "RUNNING"
    limited = client.get("/v1/devices/dev-00000?history=1", headers=operator).json()
    assert [u["rollout_id"] for u in limited["updates"]] == [ids[1]]
    assert_error(
        client.get("/v1/devices/dev-00000?history=0", headers=operator), 422, "invalid_input", "history"
    )
