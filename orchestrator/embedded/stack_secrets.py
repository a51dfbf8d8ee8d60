"""The secrets of one embedded stack (``fleet up``), made once per data directory and kept there.

Nothing public signs or authenticates anything in a running stack: the HMAC key for download
tokens, the firmware signing key pair, the Redis password and the broker passwords are random,
stored with mode 0600 in ``<data dir>/secrets.json`` and ``<data dir>/keys/``, and reused when the
same data directory is used again (so firmware signed earlier still verifies).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SECRETS_FILE = "secrets.json"
KEY_DIR = "keys"


@dataclass(frozen=True)
class StackSecrets:
    secret_key: str
    redis_password: str
    service_password: str
    portal_password: str
    device_secret: str
    signing_key: Path
    public_key: Path

    @classmethod
    def load_or_create(cls, data_dir: Path) -> StackSecrets:
        """The stack's secrets in ``data_dir``, created on first use. Precondition: ``data_dir`` exists."""
        path = data_dir / SECRETS_FILE
        keys = data_dir / KEY_DIR
        signing, public = keys / "signing.pem", keys / "signing.pub.pem"
        try:
            stored = json.loads(path.read_text())
            made = cls(**{**stored, "signing_key": signing, "public_key": public})
            if signing.is_file() and public.is_file() and all(stored.values()):
                return made
        except (OSError, ValueError, TypeError):
            pass
        made = cls(
            secret_key=secrets.token_urlsafe(48),
            redis_password=secrets.token_urlsafe(24),
            service_password=secrets.token_urlsafe(24),
            portal_password=secrets.token_urlsafe(24),
            device_secret=secrets.token_hex(32),
            signing_key=signing,
            public_key=public,
        )
        keys.mkdir(mode=0o700, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        private_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        write_private(signing, private_pem)
        write_private(public, public_pem)
        values = {k: v for k, v in asdict(made).items() if k not in ("signing_key", "public_key")}
        write_private(path, json.dumps(values, indent=2).encode())
        return made


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` atomically with mode 0600."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    os.replace(tmp, path)
