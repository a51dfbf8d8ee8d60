"""Firmware routes: multipart upload (signature, size limit, duplicates), listing, details, content."""

from __future__ import annotations

import hashlib

from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from orchestrator.config import Settings
from orchestrator.models import Firmware
from orchestrator.signing import make_download_token
from tests.api.conftest import assert_error, sample, upload
from tests.factories import add_devices


def test_upload_with_the_manifest_signature(client: TestClient, operator: dict[str, str]) -> None:
    fw = sample()
    response = upload(client, operator)
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["model"], body["version"], body["size"], body["sha256"]) == (
        fw.model,
        fw.version,
        fw.size,
        fw.sha256,
    )
    assert body["signature"] == fw.signature and "storage_path" not in body


def test_upload_without_signature_is_signed_by_the_server(
    client: TestClient, operator: dict[str, str]
) -> None:
    fw = sample()
    with fw.path.open("rb") as stream:
        response = client.post(
            "/v1/firmware",
            headers=operator,
            data={"model": fw.model, "version": "9.9.9"},
            files={"file": ("fw.bin", stream)},
        )
    assert response.status_code == 201, response.text
    assert response.json()["signature"]


def test_duplicate_model_version_is_409(client: TestClient, operator: dict[str, str]) -> None:
    assert upload(client, operator).status_code == 201
    assert_error(upload(client, operator), 409, "already_exists", "version")


def test_signature_that_does_not_verify_is_422(client: TestClient, operator: dict[str, str]) -> None:
    # The 1.1.0 manifest's signature does not cover an image registered as 2.0.0.
    assert_error(upload(client, operator, version="2.0.0"), 422, "invalid_input", "signature")


def test_oversize_upload_is_413_before_it_is_stored(
    client: TestClient, operator: dict[str, str], api_settings: Settings, session: Session
) -> None:
    big = b"\0" * (api_settings.max_firmware_bytes + 200 * 1024)
    response = client.post(
        "/v1/firmware",
        headers=operator,
        data={"model": "sensor-v2", "version": "3.0.0"},
        files={"file": ("big.bin", big)},
    )
    assert_error(response, 413, "payload_too_large", "file")
    assert session.scalar(select(func.count()).select_from(Firmware)) == 0
    session.commit()
    assert not api_settings.firmware_dir.exists() or not any(api_settings.firmware_dir.iterdir())


def test_oversize_file_within_the_multipart_slack_is_413_from_the_service(
    client: TestClient, operator: dict[str, str], api_settings: Settings
) -> None:
    # Just over the limit: the request passes the Content-Length gate; counting while storing stops it.
    big = b"\1" * (api_settings.max_firmware_bytes + 10)
    response = client.post(
        "/v1/firmware",
        headers=operator,
        data={"model": "sensor-v2", "version": "3.0.1"},
        files={"file": ("big.bin", big)},
    )
    assert_error(response, 413, "payload_too_large", "file")
    assert not any(api_settings.firmware_dir.iterdir())


BAD_FORMS: list[tuple[dict[str, str], dict[str, tuple[str, bytes]] | None, str]] = [
    ({"model": "sensor-v2", "version": "1.0"}, None, "file"),
    ({"version": "1.0"}, {"file": ("f", b"x")}, "model"),
    ({"model": "sensor-v2"}, {"file": ("f", b"x")}, "version"),
    ({"model": "bad model", "version": "1"}, {"file": ("f", b"x")}, "model"),
    ({"model": "m", "version": "1"}, {"file": ("f", b"")}, "file"),
    ({"model": "m", "version": "1", "signature": "x" * 129}, {"file": ("f", b"x")}, "signature"),
]


def test_upload_rejects_bad_forms(client: TestClient, operator: dict[str, str]) -> None:
    for data, files, field in BAD_FORMS:
        response = client.post("/v1/firmware", headers=operator, data=data, files=files)
        assert_error(response, 422, "invalid_input", field)


def test_upload_as_json_is_422(client: TestClient, operator: dict[str, str]) -> None:
    response = client.post("/v1/firmware", headers=operator, json={"model": "m", "version": "1"})
    assert response.status_code == 422 and response.json()["code"] == "invalid_input"


def test_list_and_details(client: TestClient, viewer: dict[str, str], operator: dict[str, str]) -> None:
    first = upload(client, operator).json()
    second = upload(client, operator, sample("gateway-x1", "1.1.0")).json()
    page = client.get("/v1/firmware?limit=1", headers=viewer).json()
    assert [f["id"] for f in page["items"]] == [first["id"]] and page["next_cursor"]
    rest = client.get(f"/v1/firmware?limit=1&cursor={page['next_cursor']}", headers=viewer).json()
    assert [f["id"] for f in rest["items"]] == [second["id"]] and rest["next_cursor"] is None
    only = client.get("/v1/firmware?model=gateway-x1", headers=viewer).json()
    assert [f["id"] for f in only["items"]] == [second["id"]]
    assert client.get(f"/v1/firmware/{first['id']}", headers=viewer).json() == first


ERRORS = [
    ("/v1/firmware/99", 404, "not_found", "firmware_id"),
    ("/v1/firmware/abc", 422, "invalid_input", "firmware_id"),
    ("/v1/firmware/0", 422, "invalid_input", "firmware_id"),
    ("/v1/firmware/99999999999999999999", 422, "invalid_input", "firmware_id"),
    ("/v1/firmware?limit=5000", 422, "invalid_input", "limit"),
    ("/v1/firmware?cursor=%%%", 422, "invalid_input", "cursor"),
]


def test_firmware_errors(client: TestClient, viewer: dict[str, str]) -> None:
    for path, status, code, field in ERRORS:
        assert_error(client.get(path, headers=viewer), status, code, field)


def test_content_with_download_token_and_range(
    client: TestClient, operator: dict[str, str], api_settings: Settings, session: Session
) -> None:
    fw = sample()
    firmware_id = upload(client, operator).json()["id"]
    _offer_to(session, firmware_id, "dev-00000")
    token = make_download_token(api_settings.secret_key, firmware_id, "dev-00000")
    auth = {"Authorization": f"Bearer {token}"}
    whole = client.get(f"/v1/firmware/{firmware_id}/content", headers=auth)
    assert whole.status_code == 200 and hashlib.sha256(whole.content).hexdigest() == fw.sha256
    part = client.get(f"/v1/firmware/{firmware_id}/content", headers={**auth, "Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == fw.path.read_bytes()[100:200]
    # Malformed or unsatisfiable ranges answer the JSON error model
    for bad in ("bytes=abc-", "bytes=1-2,5-9", "items=0-1"):
        response = client.get(f"/v1/firmware/{firmware_id}/content", headers={**auth, "Range": bad})
        assert_error(response, 416, "range_not_satisfiable", "range")
    beyond = client.get(f"/v1/firmware/{firmware_id}/content", headers={**auth, "Range": f"bytes={fw.size}-"})
    assert_error(beyond, 416, "range_not_satisfiable", "range")
    assert beyond.headers["content-range"] == f"bytes */{fw.size}"
    # A valid token of a device with no update of this image in progress fetches nothing
    idle = make_download_token(api_settings.secret_key, firmware_id, "dev-00001")
    response = client.get(f"/v1/firmware/{firmware_id}/content", headers={"Authorization": f"Bearer {idle}"})
    assert_error(response, 403, "forbidden")
    assert "dev-00001 has no update" in response.json()["message"]
    # An API token is no download token, and a token for another image does not fit.
    assert_error(client.get(f"/v1/firmware/{firmware_id}/content", headers=operator), 403, "forbidden")
    other = make_download_token(api_settings.secret_key, firmware_id + 1, "dev-00000")
    response = client.get(f"/v1/firmware/{firmware_id}/content", headers={"Authorization": f"Bearer {other}"})
    assert_error(response, 403, "forbidden")


def _offer_to(session: Session, firmware_id: int, device_id: str) -> None:
    """A rollout of the image to two devices, with ``device_id``'s update offered (in progress)."""
    from sqlalchemy import select

    from orchestrator.models import DeviceUpdate
    from orchestrator.policy import RolloutPolicy, Target
    from orchestrator.services.rollout_planner import create_rollout
    from orchestrator.state_machines import UpdateEvent
    from orchestrator.transitions import transition_update

    add_devices(session, 2)
    rollout = create_rollout(
        session, name="r", firmware_id=firmware_id, target=Target(model="sensor-v2"), policy=RolloutPolicy()
    )
    session.commit()
    du = session.scalars(
        select(DeviceUpdate).where(DeviceUpdate.rollout_id == rollout.id, DeviceUpdate.device_id == device_id)
    ).one()
    transition_update(session, du, UpdateEvent.ENQUEUE)
    transition_update(session, du, UpdateEvent.OFFER)
    session.commit()
