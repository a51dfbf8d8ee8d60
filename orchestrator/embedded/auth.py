"""MQTT users, roles and the broker credential / ACL files that enforce the topic rules.

Roles (design §5):

- ``device``: username is the device id; reads its own ``desired``, writes its own ``report``,
  ``info`` and ``online``. Its client id is its username: no device can take over another's.
- ``service``: the orchestrator's processes; read and write all of ``fleet/v1/#``; client ids
  start with ``fleet-``.
- ``portal``: browser portal users; read ``fleet/v1/portal/#`` only, publish nothing; client ids
  start with ``portal-``.

Mosquitto keeps the roles apart by listener (``per_listener_settings``): devices on the main MQTT
port with ``use_username_as_clientid``, services on a port of their own, portal users on the
WebSocket port, each with its own PBKDF2-SHA512 ``password_file`` and ``acl_file`` (``pattern``
lines with ``%u`` for devices, ``user`` blocks for the others), so no login of one kind works on
another's listener and the device patterns apply to devices only. amqtt gets an Argon2 password
file (the format of its FileAuthPlugin) and a JSON ACL file with per-user ``subscribe-acl``,
``publish-acl`` and ``client-ids`` rules, read by :mod:`orchestrator.embedded.amqtt_plugins`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pwdlib.hashers.argon2 import Argon2Hasher

from orchestrator.protocol import TOPIC_ROOT

BrokerKind = Literal["mosquitto", "amqtt"]

# Both password-file formats use ':' as separator, and device names are substituted into topics:
# no ':', whitespace, '/', '+', '#'.
USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
MOSQUITTO_PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default
_ID = "{id}"


class Role(StrEnum):
    """What an MQTT user may do (see module docstring)."""

    DEVICE = "device"
    SERVICE = "service"
    PORTAL = "portal"


@dataclass(frozen=True)
class Permissions:
    """Topic filters a user may subscribe to (``read``) and publish on (``write``)."""

    read: tuple[str, ...]
    write: tuple[str, ...]


# "{id}" stands for the device's own id (its username).
ROLE_PERMISSIONS: Mapping[Role, Permissions] = {
    Role.DEVICE: Permissions(
        # fleet's protocol, and the AWS IoT Jobs API of the thing named like the device
        read=(f"{TOPIC_ROOT}/devices/{_ID}/desired", f"$aws/things/{_ID}/jobs/#"),
        write=(
            f"{TOPIC_ROOT}/devices/{_ID}/report",
            f"{TOPIC_ROOT}/devices/{_ID}/info",
            f"{TOPIC_ROOT}/devices/{_ID}/online",
            f"$aws/things/{_ID}/jobs/get",
            f"$aws/things/{_ID}/jobs/start-next",
            f"$aws/things/{_ID}/jobs/+/get",
            f"$aws/things/{_ID}/jobs/+/update",
        ),
    ),
    Role.SERVICE: Permissions(
        read=(f"{TOPIC_ROOT}/#", "$aws/things/+/jobs/#"), write=(f"{TOPIC_ROOT}/#", "$aws/things/+/jobs/#")
    ),
    Role.PORTAL: Permissions(read=(f"{TOPIC_ROOT}/portal/#",), write=()),
}


# How a user's client id must look: {"equals": username} or {"prefix": ...}.
SERVICE_CLIENT_PREFIX = "fleet-"
PORTAL_CLIENT_PREFIX = "portal-"


def client_id_rule(role: Role, username: str) -> dict[str, str]:
    if role == Role.DEVICE:
        return {"equals": username}
    return {"prefix": SERVICE_CLIENT_PREFIX if role == Role.SERVICE else PORTAL_CLIENT_PREFIX}


def permissions_for(role: Role, username: str) -> Permissions:
    """The concrete topic filters of ``username`` acting as ``role``."""
    rules = ROLE_PERMISSIONS[role]
    return Permissions(
        read=tuple(t.replace(_ID, username) for t in rules.read),
        write=tuple(t.replace(_ID, username) for t in rules.write),
    )


def validate_username(username: str) -> None:
    """Raise ValueError unless ``username`` fits :data:`USERNAME_PATTERN`."""
    if not USERNAME_PATTERN.match(username):
        raise ValueError(f"invalid MQTT username {username!r}: must match {USERNAME_PATTERN.pattern}")


@dataclass(frozen=True)
class MqttUser:
    """A user to create on a broker. Precondition: ``username`` passes :func:`validate_username`."""

    username: str
    password: str = field(repr=False)
    role: Role

    def __post_init__(self) -> None:
        validate_username(self.username)
        object.__setattr__(self, "role", Role(self.role))
        if self.role == Role.DEVICE:
            from orchestrator.protocol import is_reserved_device_id

            if is_reserved_device_id(self.username):
                raise ValueError(f"{self.username!r} is reserved for the orchestrator's own logins")


@dataclass(frozen=True)
class HashedUser:
    """A user with its password already hashed for one broker kind."""

    username: str
    role: Role
    password_hash: str = field(repr=False)


# ------------------------------------------------------------------ password hashing
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def mosquitto_password_hash(
    password: str, *, iterations: int = MOSQUITTO_PBKDF2_ITERATIONS, salt: bytes | None = None
) -> str:
    """Hash ``password`` as mosquitto 2 does: ``$7$<iterations>$<b64 salt>$<b64 PBKDF2-SHA512>``.

    Precondition: ``iterations >= 1``; ``salt`` (default: 12 random bytes, like mosquitto_passwd)
    is only for reproducible tests.
    """
    salt = secrets.token_bytes(12) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


def mosquitto_password_matches(password: str, encoded: str) -> bool:
    """True if ``password`` matches a mosquitto password-file hash (``$7$`` or legacy ``$6$``)."""
    parts = encoded.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations, salt, expected = int(parts[2]), base64.b64decode(parts[3]), base64.b64decode(parts[4])
            actual = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
        elif len(parts) == 4 and parts[1] == "6":
            salt, expected = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            actual = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)


def _argon2_hasher() -> Argon2Hasher:
    # Cheaper than pwdlib's defaults (64 MiB, t=3): each CONNECT verifies one hash, and device
    # passwords are random tokens whose strength does not come from the hash cost. These are
    # OWASP's minimum recommended Argon2id parameters.
    return Argon2Hasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)


def amqtt_password_hash(password: str) -> str:
    """Hash ``password`` in the Argon2id PHC format that amqtt's password-file auth verifies."""
    return _argon2_hasher().hash(password)


def amqtt_password_matches(password: str, encoded: str) -> bool:
    """True if ``password`` matches an Argon2 hash from :func:`amqtt_password_hash`."""
    try:
        return _argon2_hasher().verify(password, encoded)
    except ValueError:
        return False


def hash_user(kind: BrokerKind, user: MqttUser) -> HashedUser:
    """Hash ``user``'s password for a ``kind`` broker."""
    if kind == "mosquitto":
        return HashedUser(user.username, user.role, mosquitto_password_hash(user.password))
    return HashedUser(user.username, user.role, amqtt_password_hash(user.password))


# ------------------------------------------------------------------ ACL rendering
def render_mosquitto_acl(users: Iterable[HashedUser | MqttUser], *, device_patterns: bool = False) -> str:
    """Mosquitto ``acl_file`` text for ``users``.

    Device rules are ``pattern`` lines, which mosquitto applies to every authenticated user of the
    listener with ``%u`` replaced by the username: in fleet's broker setup only devices log in on
    the device listener (see :func:`write_mosquitto_listener_files`). Anonymous clients get no
    topic at all.
    """
    lines = ["# Generated by fleet: do not edit by hand.", ""]
    by_role: dict[Role, list[str]] = {role: [] for role in Role}
    for user in users:
        by_role[user.role].append(user.username)
    if by_role[Role.DEVICE] or device_patterns:
        device = ROLE_PERMISSIONS[Role.DEVICE]
        lines.append("# devices: the username is the device id")
        lines += [f"pattern read {t.replace(_ID, '%u')}" for t in device.read]
        lines += [f"pattern write {t.replace(_ID, '%u')}" for t in device.write]
        lines.append("")
    for role in (Role.SERVICE, Role.PORTAL):
        for username in sorted(by_role[role]):
            perms = permissions_for(role, username)
            lines.append(f"# {role.value}")
            lines.append(f"user {username}")
            both = [t for t in perms.read if t in perms.write]
            lines += [f"topic readwrite {t}" for t in both]
            lines += [f"topic read {t}" for t in perms.read if t not in both]
            lines += [f"topic write {t}" for t in perms.write if t not in both]
            lines.append("")
    return "\n".join(lines)


def render_amqtt_acl(users: Iterable[HashedUser | MqttUser]) -> dict[str, dict[str, Any]]:
    """The JSON ACL document for amqtt: per-user ``subscribe-acl``, ``publish-acl`` and ``client-ids``."""
    subscribe: dict[str, list[str]] = {}
    publish: dict[str, list[str]] = {}
    client_ids: dict[str, dict[str, str]] = {}
    for user in users:
        perms = permissions_for(user.role, user.username)
        subscribe[user.username] = list(perms.read)
        publish[user.username] = list(perms.write)
        client_ids[user.username] = client_id_rule(user.role, user.username)
    return {"subscribe-acl": subscribe, "publish-acl": publish, "client-ids": client_ids}


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a broker may reload at any moment), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_mosquitto_listener_files(
    users: Iterable[HashedUser | MqttUser], directory: Path
) -> dict[Role, tuple[Path, Path]]:
    """Per role, a Mosquitto password file and ACL file in ``directory`` for its own listener."""
    hashed = [hash_user("mosquitto", u) if isinstance(u, MqttUser) else u for u in users]
    paths: dict[Role, tuple[Path, Path]] = {}
    for role in Role:
        members = [u for u in hashed if u.role == role]
        password_file, acl_file = directory / f"passwords-{role.value}", directory / f"acl-{role.value}"
        _write_private(password_file, "".join(f"{u.username}:{u.password_hash}\n" for u in members))
        # The device listener's patterns also serve devices known only by certificate (TLS).
        _write_private(acl_file, render_mosquitto_acl(members, device_patterns=role == Role.DEVICE))
        paths[role] = (password_file, acl_file)
    return paths


def write_auth_files(
    kind: BrokerKind, users: Iterable[HashedUser | MqttUser], password_file: Path, acl_file: Path
) -> list[HashedUser]:
    """Write the password and ACL files of a ``kind`` broker for ``users``; return them hashed.

    Plain :class:`MqttUser` entries are hashed here; pass :class:`HashedUser` entries (e.g. the
    return value of an earlier call) to skip re-hashing. Preconditions: usernames are unique, and
    hashes in :class:`HashedUser` entries were made for ``kind``.
    """
    hashed: list[HashedUser] = []
    seen: set[str] = set()
    for user in users:
        if user.username in seen:
            raise ValueError(f"duplicate MQTT username {user.username!r}")
        seen.add(user.username)
        hashed.append(hash_user(kind, user) if isinstance(user, MqttUser) else user)
    _write_private(password_file, "".join(f"{u.username}:{u.password_hash}\n" for u in hashed))
    if kind == "mosquitto":
        _write_private(acl_file, render_mosquitto_acl(hashed))
    else:
        _write_private(acl_file, json.dumps(render_amqtt_acl(hashed), indent=1, sort_keys=True))
    return hashed
