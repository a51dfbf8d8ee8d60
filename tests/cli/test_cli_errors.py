"""Failures print what to do next and exit non-zero (no traceback)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.embedded.ports import free_port
from orchestrator.services.token_service import Role
from tests.cli.conftest import ApiOnly, CliResult, make_token, run_cli

pytestmark = [pytest.mark.integration]


def assert_failed(result: CliResult, *needles: str) -> None:
    assert result.returncode != 0, result.output
    assert "Traceback" not in result.output, result.output
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_api_down_points_at_fleet_api(tmp_path: Path) -> None:
    # Given nothing listening at FLEET_API_URL
    url = f"http://127.0.0.1:{free_port()}"
    # When the operator lists rollouts
    result = run_cli("rollout", "list", api_url=url, token="whatever", cwd=tmp_path)
    # Then the CLI says how to start the API and which setting points at it
    assert_failed(result, "fleet api", "FLEET_API_URL", url)


def test_auth_and_input_errors_name_the_fix(api_only: ApiOnly, tmp_path: Path) -> None:
    url = api_only.url
    # No token at all, or an unknown one: set FLEET_API_TOKEN, and how to get one
    assert_failed(
        run_cli("devices", "list", api_url=url, cwd=tmp_path), "FLEET_API_TOKEN", "fleet token create"
    )
    assert_failed(
        run_cli("rollout", "list", api_url=url, token="no-such-token", cwd=tmp_path), "FLEET_API_TOKEN"
    )

    # A viewer token reads but may not write
    viewer = make_token(api_only.database_url, Role.VIEWER, name="viewer")
    listed = run_cli("rollout", "list", api_url=url, token=viewer, cwd=tmp_path)
    assert listed.returncode == 0, listed.output
    assert_failed(run_cli("rollout", "pause", "1", api_url=url, token=viewer, cwd=tmp_path), "operator token")

    # 4xx: the server's message, and the field it is about
    operator = make_token(api_only.database_url, Role.OPERATOR)
    assert_failed(run_cli("rollout", "status", "424242", api_url=url, token=operator, cwd=tmp_path), "424242")
    bad_waves = run_cli(
        *("rollout", "create", "--firmware", "1", "--name", "x", "--device", "d-1", "--waves", "150%"),
        api_url=url,
        token=operator,
        cwd=tmp_path,
    )
    assert_failed(bad_waves, "policy.waves")

    # A target that is neither a model nor devices is refused before any request
    neither = run_cli("rollout", "create", "--firmware", "1", api_url=url, token=operator, cwd=tmp_path)
    assert_failed(neither, "--model", "--device")
