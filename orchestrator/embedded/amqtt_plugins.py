"""amqtt broker plugins: password-file authentication and per-user topic ACLs, both reloadable.

They replace amqtt's own ``AnonymousAuthPlugin`` / ``FileAuthPlugin`` /
``TopicAccessControlListPlugin`` for three reasons: they re-read their files on SIGHUP (see
:mod:`orchestrator.embedded.amqtt_runner`) so users can be added without losing retained messages;
they never flag sessions as anonymous (amqtt silently drops queued QoS 1/2 messages of persistent
sessions it considers anonymous); and they check delivery too, not only subscribe and publish.
The file formats are those of :mod:`orchestrator.embedded.auth`: ``username:<argon2 hash>`` lines,
and a JSON document with ``subscribe-acl`` / ``publish-acl`` maps of username to topic filters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin

from .auth import amqtt_password_matches

log = logging.getLogger(__name__)


class _Reloadable(Protocol):
    def reload(self) -> None: ...


_RELOADABLE: weakref.WeakSet[_Reloadable] = weakref.WeakSet()


def reload_all() -> None:
    """Re-read the files of every plugin instance of this module in this process."""
    for plugin in list(_RELOADABLE):
        try:
            plugin.reload()
        except (OSError, ValueError) as exc:
            # Keep serving with the previous rules rather than dying on a half-written edit.
            log.error("reload of %s failed: %s", type(plugin).__name__, exc)


def filter_covers(allowed: str, requested: str) -> bool:
    """True if every topic matched by ``requested`` is matched by the filter ``allowed``.

    ``requested`` may be a plain topic (publish, delivery) or a filter (subscribe). A wildcard
    in ``requested`` is covered only by an equal or broader wildcard in ``allowed``.
    """
    a_levels = allowed.split("/")
    r_levels = requested.split("/")
    for i, a in enumerate(a_levels):
        if a == "#":
            return True
        if i >= len(r_levels):
            return False
        r = r_levels[i]
        if r == "#" or (a != "+" and a != r):
            return False
    return len(r_levels) == len(a_levels)


class PasswordFileAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Accepts a client whose username is in the password file, whose password matches, and whose
    client id follows its rule in the ACL file's ``client-ids`` map (a device's must equal its
    username, so no device can take over another's session).

    Clients without a username are accepted only with ``allow_anonymous``. Without a
    ``password_file`` every client is accepted if ``allow_anonymous`` is set.
    """

    @dataclass
    class Config:
        password_file: str | None = None
        allow_anonymous: bool = False
        acl_file: str | None = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._users: dict[str, str] = {}
        self._client_ids: dict[str, dict[str, str]] = {}
        self.reload()
        _RELOADABLE.add(self)

    def reload(self) -> None:
        """Re-read the password file (and the client-id rules)."""
        acl = self.config.acl_file
        if acl:
            rules = json.loads(Path(acl).read_text()).get("client-ids", {})
            if not isinstance(rules, dict):
                raise ValueError("client-ids must be a JSON object")
            self._client_ids = {str(u): dict(r) for u, r in rules.items()}
        path = self.config.password_file
        if not path:
            self._users = {}
            return
        users: dict[str, str] = {}
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            username, sep, encoded = line.partition(":")
            if not sep:
                raise ValueError(f"malformed line in {path}")
            users[username] = encoded
        self._users = users
        log.info("%d MQTT user(s) loaded from %s", len(users), path)

    async def authenticate(self, *, session: Any) -> bool | None:
        allow_anonymous = bool(self.config.allow_anonymous)
        username = getattr(session, "username", None)
        if not self.config.password_file or not username:
            return allow_anonymous
        encoded = self._users.get(username)
        if encoded is None:
            return False
        if not self._client_id_allowed(username, str(getattr(session, "client_id", "") or "")):
            log.warning("client id %r refused for user %r", getattr(session, "client_id", ""), username)
            return False
        password = getattr(session, "password", None) or ""
        if isinstance(password, bytes):
            password = password.decode(errors="replace")
        # Argon2 takes ~20 ms: keep it off the event loop that serves every other client.
        return await asyncio.to_thread(amqtt_password_matches, password, encoded)

    def _client_id_allowed(self, username: str, client_id: str) -> bool:
        rule = self._client_ids.get(username)
        if rule is None:
            return not self._client_ids  # no rules configured at all: any client id
        if "equals" in rule:
            return client_id == rule["equals"]
        return client_id.startswith(rule.get("prefix", ""))


class TopicAclFilePlugin(BaseTopicPlugin):  # type: ignore[misc]
    """Per-user topic ACLs from a JSON file; clients without a username get no topic at all."""

    @dataclass
    class Config:
        acl_file: str | None = None

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self._subscribe: dict[str, tuple[str, ...]] = {}
        self._publish: dict[str, tuple[str, ...]] = {}
        self.reload()
        _RELOADABLE.add(self)

    def reload(self) -> None:
        """Re-read the ACL file."""
        path = self.config.acl_file
        if not path:
            self._subscribe, self._publish = {}, {}
            return
        doc = json.loads(Path(path).read_text())
        self._subscribe = _acl_map(doc.get("subscribe-acl", {}))
        self._publish = _acl_map(doc.get("publish-acl", {}))

    async def topic_filtering(
        self, *, session: Any = None, topic: str | None = None, action: Action | None = None
    ) -> bool:
        username = getattr(session, "username", None)
        if not topic or not username:
            return False
        # Delivery is checked against the read rules as well, so a reload that takes a right
        # away also stops messages on subscriptions made before it.
        rules = self._publish if action == Action.PUBLISH else self._subscribe
        return any(filter_covers(allowed, topic) for allowed in rules.get(username, ()))


def _acl_map(raw: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, dict):
        raise ValueError("ACL maps must be JSON objects")
    result: dict[str, tuple[str, ...]] = {}
    for user, filters in raw.items():
        if not isinstance(filters, Iterable) or isinstance(filters, str | bytes):
            raise ValueError(f"ACL entry of {user!r} must be a list of topic filters")
        result[str(user)] = tuple(str(f) for f in filters)
    return result
