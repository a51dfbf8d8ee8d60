"""CLI tests: the CLI runs as a subprocess against a real API (and, for rollouts, the full stack)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.db import session_scope
from orchestrator.local_stack import LocalStack, StackSettings
from orchestrator.services import token_service
from orchestrator.services.token_service import Role
from tests.integration.conftest import harness  # noqa: F401 - the full-stack fixture

CLI_TIMEOUT = 60


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def make_token(database_url: str, role: Role, name: str = "cli-test") -> str:
    with session_scope(database_url) as session:
        _, secret = token_service.create_token(session, name=name, role=role)
    return secret


def run_cli(
    *args: str,
    api_url: str | None = None,
    token: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> CliResult:
    """``python -m orchestrator.cli ARGS`` with only the given FLEET_API_* settings in its environment."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("FLEET_")}
    child_env.update(COLUMNS="200", NO_COLOR="1", **(env or {}))
    if api_url is not None:
        child_env["FLEET_API_URL"] = api_url
    if token is not None:
        child_env["FLEET_API_TOKEN"] = token
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        env=child_env,
        cwd=cwd or Path.cwd(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@dataclass
class ApiOnly:
    url: str
    database_url: str


@pytest.fixture
def api_only(tmp_path: Path, database_url: str, redis_url: str, mqtt_broker: Any) -> Iterator[ApiOnly]:
    """Just the API process over a private database (its health check wants Redis and the broker)."""
    settings = StackSettings(
        data_dir=tmp_path / "stack", database_url=database_url, redis_url=redis_url, mqtt_url=mqtt_broker.url
    )
    stack = LocalStack(settings)
    try:
        stack.start_api()
        yield ApiOnly(stack.api_url, database_url)
    finally:
        stack.stop()
