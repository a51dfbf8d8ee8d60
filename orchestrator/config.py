"""All settings in one place: environment variables with prefix ``FLEET_`` or a ``.env`` file."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent
DEV_SIGNING_KEY = REPO_ROOT / "firmware_samples" / "dev-signing-key.DEV-ONLY.pem"
DEV_PUBLIC_KEY = REPO_ROOT / "firmware_samples" / "dev-signing-key.DEV-ONLY.pub.pem"
# Marker for values that are only acceptable outside production.
DEV_ONLY_SECRET = "dev-only-insecure-secret"
MIN_SECRET_LENGTH = 32


def public_key_fingerprint(path: Path) -> bytes | None:
    """The raw ed25519 public key of a PEM private or public key file; None if it is not one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

    try:
        data = path.read_bytes()
    except OSError:
        return None
    key: object
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError:
            return None
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    if not isinstance(key, Ed25519PublicKey):
        return None
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_", env_file=".env", extra="ignore")

    env: Literal["development", "test", "production"] = "development"
    data_dir: Path = Field(default=Path("var"), description="working files of the embedded stack")
    database_url: str = Field(default="sqlite:///var/fleet.db")
    redis_url: str = "redis://127.0.0.1:6379/0"
    celery_broker_url: str | None = Field(
        default=None, description="Celery transport if not Redis, e.g. amqp://user:pass@host:5672//"
    )
    mqtt_url: str = Field(default="mqtt://127.0.0.1:1883", description="broker for devices + services")
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    portal_mqtt_ws_url: str = Field(default="ws://127.0.0.1:9001", description="broker URL for browsers")
    portal_mqtt_username: str | None = Field(
        default=None, description="read-only broker user the portal's browsers connect as"
    )
    portal_mqtt_password: str | None = Field(default=None, description="password of portal_mqtt_username")
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_tls_cert: Path | None = Field(default=None, description="serve HTTPS with this certificate (PEM)")
    api_tls_key: Path | None = Field(default=None, description="the private key of api_tls_cert")
    public_base_url: str = Field(default="http://127.0.0.1:8000", description="devices download from here")
    api_url: str = Field(default="http://127.0.0.1:8000", description="where the CLI reaches the HTTP API")
    api_token: str | None = Field(default=None, description="bearer token the CLI sends to the HTTP API")
    firmware_dir: Path = Path("var/firmware")
    signing_key_path: Path = DEV_SIGNING_KEY
    public_key_path: Path = DEV_PUBLIC_KEY
    secret_key: str = Field(default=DEV_ONLY_SECRET, description="HMAC key for download tokens")
    max_firmware_bytes: int = 256 * 1024 * 1024
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, description="any other request body")
    ingest_batch_size: int = 500
    ingest_max_backlog: int = Field(
        default=2000, ge=10, description="messages waiting in ingest at which it stops reading the broker"
    )
    ingest_client_id: str | None = Field(
        default=None, description="fixed MQTT client id (persistent session)"
    )
    mqtt_v5: bool = Field(
        default=True, description="services speak MQTT 5 to the broker (Mosquitto, EMQX; false for amqtt)"
    )
    aws_jobs: bool = Field(
        default=True,
        description="serve the AWS IoT Jobs device API on $aws/things/T/jobs/; needs a broker that lets "
        "clients publish to $-topics (Mosquitto, EMQX; not amqtt 0.12)",
    )
    mqtt_shared_subscriptions: bool = Field(
        default=False,
        description="several ingest processes share the reports through $share/ (needs MQTT 5)",
    )
    ingest_share_group: str = Field(
        default="fleet-ingest", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="one per deployment on a broker"
    )
    ingest_session_expiry_s: int = Field(
        default=600, ge=0, description="how long the broker keeps an absent ingest's session and its share"
    )
    ingest_device_rate: float = Field(default=50.0, gt=0, description="messages/s a device may send")
    ingest_device_burst: float = Field(default=200.0, ge=1, description="messages a device may send at once")
    portal_summary_interval_ms: int = 250
    reconcile_interval_s: float = 5.0
    stall_s: float = Field(
        default=10.0,
        gt=0,
        description="the reconciler re-sends a step once its update has not moved this long",
    )
    webhook_allow_loopback: bool = Field(
        default=False, description="accept webhook URLs on this machine (plain http too): test receivers only"
    )
    retention_days: int = Field(
        default=90, ge=0, description="events and audit entries older than this are deleted (0: keep all)"
    )
    retention_interval_s: float = Field(default=3600.0, gt=0, description="how often retention runs")
    continuous_scan_s: float = Field(
        default=10.0, gt=0, description="how often a continuous rollout looks for devices that newly match"
    )
    celery_concurrency: int = 2
    celery_visibility_timeout_s: int = Field(
        default=300, description="an unacknowledged task of a dead worker is redelivered after this"
    )
    celery_events: bool = Field(
        default=False, description="task events for Flower / `celery events` (cost CPU per task)"
    )

    @model_validator(mode="after")
    def _refuse_dev_secrets_in_production(self) -> Settings:
        if self.env != "production":
            return self
        problems = []
        if self.secret_key == DEV_ONLY_SECRET or len(self.secret_key) < MIN_SECRET_LENGTH:
            problems.append(
                f"FLEET_SECRET_KEY must be a random string of at least {MIN_SECRET_LENGTH} characters "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
            )
        # By content, not name: a renamed or copied sample key is still the public sample key.
        for name, path in (
            ("FLEET_SIGNING_KEY_PATH", self.signing_key_path),
            ("FLEET_PUBLIC_KEY_PATH", self.public_key_path),
        ):
            fingerprint = public_key_fingerprint(path)
            if fingerprint is None:
                problems.append(f"{name} ({path}) is not a readable ed25519 PEM key")
            elif fingerprint == public_key_fingerprint(DEV_PUBLIC_KEY):
                problems.append(f"{name} ({path}) holds the dev-only sample key shipped with fleet")
        if problems:
            raise ValueError("refusing to start in production: " + "; ".join(problems))
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
