"""Security rules that need no server: production settings, message bounds, log hygiene, rate limits."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.config import DEV_PUBLIC_KEY, DEV_SIGNING_KEY, Settings
from orchestrator.db import session_factory
from orchestrator.embedded.stack_secrets import StackSecrets
from orchestrator.ingest.guard import Guard, LogLimiter, RateLimiter
from orchestrator.ingest.inventory import apply_inventory
from orchestrator.models import Device
from orchestrator.protocol import DeviceInfo, Report

GOOD_SECRET = "x" * 48


def _production(**values: object) -> Settings:
    return Settings(_env_file=None, env="production", **values)  # type: ignore[arg-type]


@pytest.fixture
def own_keys(tmp_path: Path) -> StackSecrets:
    return StackSecrets.load_or_create(tmp_path)


def test_production_accepts_its_own_key_and_a_long_secret(own_keys: StackSecrets) -> None:
    settings = _production(
        secret_key=GOOD_SECRET, signing_key_path=own_keys.signing_key, public_key_path=own_keys.public_key
    )
    assert settings.env == "production"


@pytest.mark.parametrize("secret", ["", "short", "dev-only-insecure-secret"])
def test_production_refuses_empty_short_or_default_secrets(own_keys: StackSecrets, secret: str) -> None:
    with pytest.raises(ValidationError, match="FLEET_SECRET_KEY"):
        _production(
            secret_key=secret, signing_key_path=own_keys.signing_key, public_key_path=own_keys.public_key
        )


def test_production_refuses_the_sample_key_whatever_its_name(tmp_path: Path, own_keys: StackSecrets) -> None:
    renamed = tmp_path / "company-signing.pem"
    shutil.copy(DEV_SIGNING_KEY, renamed)
    with pytest.raises(ValidationError, match=r"FLEET_SIGNING_KEY_PATH .* dev-only sample key"):
        _production(secret_key=GOOD_SECRET, signing_key_path=renamed, public_key_path=own_keys.public_key)
    public = tmp_path / "verify.pem"
    shutil.copy(DEV_PUBLIC_KEY, public)
    with pytest.raises(ValidationError, match=r"FLEET_PUBLIC_KEY_PATH .* dev-only sample key"):
        _production(secret_key=GOOD_SECRET, signing_key_path=own_keys.signing_key, public_key_path=public)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(ValidationError, match="not a readable ed25519"):
        _production(secret_key=GOOD_SECRET, signing_key_path=garbage, public_key_path=own_keys.public_key)


@pytest.mark.parametrize(
    "fields",
    [
        {"update_id": 2**64},
        {"update_id": 0},
        {"attempt": 2**70},
        {"seq": 2**64},
        {"seq": -1},
        {"running_version": "x" * (1024 * 1024)},
        {"running_version": "bad\nversion"},
        {"update_id": "5"},
        {"progress": 101},
        {"detail": "d" * 501},
        {"ts": float("nan")},
    ],
)
def test_reports_outside_the_stored_bounds_are_rejected(fields: dict[str, object]) -> None:
    doc = {"update_id": 1, "attempt": 1, "state": "VERIFIED", "seq": 1, "running_version": "1.0.0", **fields}
    with pytest.raises(ValidationError):
        Report.model_validate(doc)


def test_device_info_is_bounded() -> None:
    with pytest.raises(ValidationError):
        DeviceInfo(model="m" * 65, running_version="1.0")
    with pytest.raises(ValidationError):
        DeviceInfo(model="m", running_version="1.0", labels={f"k{i}": "v" for i in range(33)})


def test_guard_records_rejections_per_device_with_a_budget() -> None:
    guard = Guard(rate=1000, burst=1000)
    topic = "fleet/v1/devices/dev-1/report"
    parsed = guard.parse([(topic, b"{bad", False, 4) for _ in range(20)])
    assert not parsed.reports
    assert len(parsed.rejected) == 5  # a few events per device and minute, the rest only counted
    assert guard.stats["malformed_report"] == 20 and guard.stats["rejected_not_recorded"] == 15
    retained = guard.parse([(topic, b'{"x": 1}', True, 8)])
    assert guard.stats["retained_report_ignored"] == 1 and not retained.reports
    odd = guard.parse([("fleet/v1/devices/a+b/report", b"{}", False, 2)])
    huge = guard.parse([("fleet/v1/devices/dev-2/report", b"", False, 1_000_000)])
    assert guard.stats["oversized_report"] == 1 and len(huge.rejected) == 1
    assert guard.stats["unexpected_topic"] == 1 and not odd
    info = b'{"model": "m", "running_version": "1.0"}'
    reserved = guard.parse([("fleet/v1/devices/portal-web/info", info, True, len(info))])
    assert not reserved.infos and guard.stats["reserved_device_id"] == 1


def test_rate_limiter_throttles_one_device_not_the_others() -> None:
    limiter = RateLimiter(rate=10, burst=5)
    allowed = [limiter.allow("loud", now=100.0) for _ in range(50)]
    assert allowed.count(True) == 5
    assert limiter.allow("quiet", now=100.0)
    assert limiter.allow("loud", now=101.0)  # refilled at 10 per second


def test_log_limiter_caps_lines(caplog: pytest.LogCaptureFixture) -> None:
    limiter = LogLimiter(per_interval=3, interval=60)
    with caplog.at_level(logging.WARNING):
        for i in range(100):
            limiter.warning("malformed %d", i)
    assert len(caplog.records) == 3


def test_access_log_never_records_query_strings() -> None:
    from orchestrator.api.access_log import RedactQueryStrings, log_config

    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", "/v1/rollouts?token=fleet_SECRET&x=1", "1.1", 200), None,
    )  # fmt: skip
    assert RedactQueryStrings().filter(record)
    assert "fleet_SECRET" not in record.getMessage() and "/v1/rollouts?[redacted]" in record.getMessage()
    assert log_config()["handlers"]["access"]["filters"] == ["redact_query"]


def test_reserved_names_are_never_registered_as_devices(database_url: str) -> None:
    session: Session = session_factory(database_url)()
    info = DeviceInfo(model="sensor-v2", running_version="1.0.0")
    registered, _ = apply_inventory(session, {"portal": info, "fleet-ingest-x": info, "dev-9": info}, {})
    assert registered == 1
    assert list(session.scalars(select(Device.id))) == ["dev-9"]
    session.close()
