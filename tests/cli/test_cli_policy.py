"""The policy through the CLI against a real API: tags, groups, windows, rate, end time, the firmware
lifecycle; mistakes are refused with what to write instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from orchestrator.cli.main import app as cli_app
from orchestrator.config import Settings
from orchestrator.db import session_scope
from orchestrator.services.firmware_service import add_firmware
from orchestrator.services.token_service import Role
from tests.api.conftest import sample
from tests.cli.conftest import ApiOnly, make_token, run_cli
from tests.cli.test_cli_errors import assert_failed
from tests.factories import add_devices

pytestmark = [pytest.mark.integration]


@pytest.fixture
def api(api_only: ApiOnly, database_url: str, mqtt_broker: Any) -> ApiOnly:
    """The CLI speaks HTTP only: the API tests cover the backends, these run on the default pair."""
    if not database_url.startswith("sqlite") or mqtt_broker.kind == "external":
        pytest.skip("runs on [sqlite-embedded]; tests/api covers the other backends")
    return api_only


def test_operator_targets_a_tagged_group_with_a_window_and_a_rate(api: ApiOnly, tmp_path: Path) -> None:
    url, token = api.url, make_token(api.database_url, Role.OPERATOR)

    def cli(*args: str) -> str:
        result = run_cli(*args, api_url=url, token=token, cwd=tmp_path)
        assert result.returncode == 0, result.output
        return result.stdout

    # Given six devices, a firmware image, and three of the devices tagged by the operator
    fw = sample()
    with session_scope(api.database_url) as session:
        ids = add_devices(session, 6)
        settings = Settings(database_url=api.database_url, firmware_dir=tmp_path / "fw")
        with fw.path.open("rb") as stream:
            firmware_id = add_firmware(
                session, settings, stream, model=fw.model, version=fw.version, signature=fw.signature
            ).id
    assert "tags changed on 3 device(s)" in cli("devices", "tag", *ids[:3], "--add", "pilot")
    tagged = cli("devices", "list", "--tag", "pilot")
    assert ids[0] in tagged and ids[4] not in tagged
    # When a group selects them and a rollout targets it, with a window, a rate and an end time
    assert "selects 3 device(s)" in cli("group", "create", "pilots", "--model", "sensor-v2", "--tag", "pilot")
    created = cli(
        *("rollout", "create", "--firmware", str(firmware_id), "--group", "pilots"),
        *("--window", "0 2 * * mon-fri;2h;Europe/Berlin", "--rate", "5", "--rate-every-succeeded", "10"),
        *("--end-at", "2031-01-01T00:00:00Z", "--versions", ">=1.0", "--soak", "10m"),
    )
    assert "3 devices" in created
    # Then the rollout's status says what paces it
    rollout_id = created.split()[1]
    status = cli("rollout", "status", rollout_id)
    assert "rate: 5 offers/min now" in status and "window:" in status and "ends 2031-01-01" in status
    detail = httpx.get(f"{url}/v1/rollouts/{rollout_id}", headers={"Authorization": f"Bearer {token}"}).json()
    assert detail["policy"]["windows"][0] == {
        "cron": "0 2 * * mon-fri",
        "duration_s": 7200.0,
        "timezone": "Europe/Berlin",
        "start": None,
        "end": None,
    }
    assert detail["policy"]["soak"]["duration_s"] == 600 and detail["policy"]["soak"]["heartbeat_s"] == 30
    # One device not offered yet (no worker runs here) can be canceled, but not stopped
    assert "CANCELED" in cli("rollout", "device", "cancel", rollout_id, ids[0], "--yes")
    assert_failed(
        run_cli(
            "rollout", "device", "stop", rollout_id, ids[1], "--yes", api_url=url, token=token, cwd=tmp_path
        ),
        "cancel it instead",
    )
    # The operator's own actions are in the audit log
    log = cli("audit", "--target", "group", "--limit", "5")
    assert "group.create" in log and "api:cli-test" in log
    # And the image in use can be deprecated but not deleted
    assert "deprecated" in cli("firmware", "deprecate", str(firmware_id))
    assert_failed(
        run_cli("firmware", "delete", str(firmware_id), api_url=url, token=token, cwd=tmp_path),
        "deprecate it",
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--window", "0 2 * * *"), "CRON;DURATION"),
        (("--window", "0 2 * * *;soon"), "15m"),
        (("--end-at", "2031-01-01T00:00:00"), "time zone"),
        (("--rate-max", "100"), "--rate N"),
        (("--soak", "forever"), "--soak"),
        (("--group", "g"), "one of --model, --group or --device"),
    ],
)
def test_policy_option_mistakes_are_refused_before_any_request(args: tuple[str, ...], needle: str) -> None:
    # No API is running: each mistake is caught by the CLI itself, with how to write it instead
    base = ("rollout", "create", "--firmware", "1", "--name", "x", "--model", "sensor-v2")
    env = {"FLEET_API_URL": "http://127.0.0.1:9", "FLEET_API_TOKEN": "unused", "COLUMNS": "200"}
    result = CliRunner().invoke(cli_app, [*base, *args], env=env)
    assert result.exit_code != 0
    assert needle in result.output, result.output
    assert "cannot connect" not in result.output


def test_tagging_without_a_tag_is_refused() -> None:
    result = CliRunner().invoke(
        cli_app, ["devices", "tag", "dev-1"], env={"FLEET_API_URL": "http://127.0.0.1:9"}
    )
    assert result.exit_code != 0 and "--add TAG" in result.output
