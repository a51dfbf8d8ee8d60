"""Finding the stack that ``fleet up`` (or ``make demo``) runs on this machine, for the operator CLI.

``fleet up`` writes ``<data dir>/stack.json`` (mode 0600) with the API URL, an operator token and the
portal's broker login. A CLI command run from the same directory uses it when nothing more explicit
says where the API is: ``--api-url``/``--token`` win, then ``FLEET_API_URL``/``FLEET_API_TOKEN``
(environment or ``.env``), then this file, then the defaults. The file is trusted only when it belongs
to the current user, nobody else can read or write it, and the ``fleet up`` that wrote it still runs.
The stack's token is only ever sent to the stack's own API URL.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import Settings

STACK_FILE = "stack.json"
UP_SUBDIR = "up"


def default_up_dir(settings: Settings) -> Path:
    """Where ``fleet up`` keeps its data unless told otherwise: ``$FLEET_DATA_DIR/up`` (``var/up``)."""
    return Path(settings.data_dir) / UP_SUBDIR


@dataclass(frozen=True)
class RunningStack:
    """What the CLI needs from a live ``fleet up``."""

    path: Path
    api_url: str
    operator_token: str | None
    mqtt_url: str | None  # where the portal login works: the broker's WebSocket listener
    portal_mqtt_username: str | None
    portal_mqtt_password: str | None


def _trusted(path: Path) -> bool:
    try:
        info = path.stat()
    except OSError:
        return False
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        return False
    return info.st_mode & 0o077 == 0


def load_running_stack(directory: Path) -> RunningStack | None:
    """The stack described by ``directory/stack.json`` if the file is trustworthy and its owner alive."""
    from orchestrator.embedded.process import process_alive

    path = directory / STACK_FILE
    if not _trusted(path):
        return None
    try:
        info: Any = json.loads(path.read_text())
        pid, ticks = int(info["pid"]), info.get("pid_start_ticks")
        api_url = str(info["api_url"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not process_alive(pid, None if ticks is None else int(ticks)):
        return None

    def text(key: str) -> str | None:
        value = info.get(key)
        return value if isinstance(value, str) and value else None

    return RunningStack(
        path=path,
        api_url=api_url,
        operator_token=text("operator_token"),
        mqtt_url=text("mqtt_ws_url") or text("mqtt_url"),
        portal_mqtt_username=text("portal_mqtt_username"),
        portal_mqtt_password=text("portal_mqtt_password"),
    )


def _from_environment(settings: Settings, field: str) -> bool:
    # pydantic-settings passes values from the environment and .env as explicit init values.
    return field in settings.model_fields_set


def resolve_api(settings: Settings, api_url: str | None, token: str | None) -> tuple[str, str | None]:
    """(API URL, token) by the precedence in the module docstring."""
    url = api_url or (settings.api_url if _from_environment(settings, "api_url") else None)
    stack = load_running_stack(default_up_dir(settings))
    if url is None:
        url = stack.api_url if stack is not None else settings.api_url
    chosen = token or settings.api_token
    if chosen is None and stack is not None and url.rstrip("/") == stack.api_url.rstrip("/"):
        chosen = stack.operator_token
    return url, chosen


def resolve_broker(
    settings: Settings, broker: str | None, username: str | None, password: str | None
) -> tuple[str, str | None, str | None]:
    """(broker URL, user, password) for ``fleet rollout watch`` by the same precedence."""
    url = broker or (settings.mqtt_url if _from_environment(settings, "mqtt_url") else None)
    stack = load_running_stack(default_up_dir(settings))
    if url is None and stack is not None and stack.mqtt_url:
        url = stack.mqtt_url
        if username is None:
            return url, stack.portal_mqtt_username, password or stack.portal_mqtt_password
    url = url or settings.mqtt_url
    if username is None:
        if settings.portal_mqtt_username:
            return url, settings.portal_mqtt_username, password or settings.portal_mqtt_password
        if settings.mqtt_username:
            return url, settings.mqtt_username, password or settings.mqtt_password
    return url, username, password
