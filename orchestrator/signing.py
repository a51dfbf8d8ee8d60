"""Firmware signing (server side) and firmware download tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from orchestrator.errors import ConfigurationError, Forbidden
from orchestrator.protocol import canonical_manifest


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot load signing key {path}: {exc}; set FLEET_SIGNING_KEY_PATH"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigurationError(f"{path} is not an ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigurationError(f"cannot load public key {path}: {exc}; set FLEET_PUBLIC_KEY_PATH") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigurationError(f"{path} is not an ed25519 public key")
    return key


def sign_manifest(key: Ed25519PrivateKey, model: str, version: str, size: int, sha256: str) -> str:
    """Base64 ed25519 signature over the canonical manifest."""
    return base64.b64encode(key.sign(canonical_manifest(model, version, size, sha256))).decode()


def make_download_token(secret: str, firmware_id: int, device_id: str, ttl_s: float = 7 * 86400) -> str:
    """A bearer token that lets ``device_id`` fetch firmware ``firmware_id`` until it expires."""
    expires = int(time.time() + ttl_s)
    body = f"{firmware_id}.{device_id}.{expires}"
    mac = hmac.new(secret.encode(), body.encode(), hashlib.sha256).hexdigest()[:32]
    return f"{body}.{mac}"


def check_download_token(secret: str, firmware_id: int, token: str) -> str:
    """The device id a valid token was issued to; raises Forbidden otherwise."""
    body, _, mac = token.rpartition(".")
    rest, _, expires = body.rpartition(".")
    fw, _, device_id = rest.partition(".")
    try:
        fw_id = int(fw)
        expiry = int(expires)
    except ValueError:
        raise Forbidden("malformed download token") from None
    expected = hmac.new(secret.encode(), body.encode(), hashlib.sha256).hexdigest()[:32]
    if not hmac.compare_digest(mac, expected) or fw_id != firmware_id:
        raise Forbidden("download token is not valid for this firmware")
    if expiry < time.time():
        raise Forbidden("download token expired")
    return device_id
