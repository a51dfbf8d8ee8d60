"""What the agents of a fleet share (broker, key, profile, installer, HTTP client, counters)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from device_sim.installer import Installer, SimulatedInstaller
from device_sim.mqtt_link import BrokerAddress
from device_sim.profiles import INSTANT, Profile

AGENT_VERSION = "0.1.0"


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load the provisioned firmware-signing public key (PEM)."""
    key = load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an ed25519 public key")
    return key


@dataclass(slots=True)
class AgentStats:
    """Counters shared by the agents of a fleet (cheap: a few integers per state)."""

    reports: Counter[str] = field(default_factory=Counter)
    finished: Counter[str] = field(default_factory=Counter)
    connected: int = 0
    reconnects: int = 0
    # seqs of every report sent, per device; only kept when asked for (``--stats-file``)
    sent: dict[str, list[int]] | None = None

    def on_connect(self, count: int) -> None:
        if count == 1:
            self.connected += 1
        else:
            self.reconnects += 1


@dataclass(slots=True)
class AgentContext:
    """Everything agents can share: one per fleet, so each agent stays small."""

    broker: BrokerAddress
    public_key: Ed25519PublicKey
    profile: Profile = INSTANT
    installer: Installer = field(default_factory=SimulatedInstaller)
    seed: int = 0
    keepalive: int = 60
    store_images: bool = True  # keep image bytes under the state dir (needed by a command installer)
    connect_gate: asyncio.Semaphore | None = None
    on_connect: Callable[[int], None] | None = None
    stats: AgentStats = field(default_factory=AgentStats)
    http_connections: int = 256
    http_verify: bool | str = True
    _http: httpx.AsyncClient | None = field(default=None, init=False, repr=False)

    def http_client(self) -> httpx.AsyncClient:
        """The shared HTTP client, created on first use."""
        if self._http is None:
            self._http = httpx.AsyncClient(
                # No pool timeout: with thousands of devices some wait for a free connection.
                timeout=httpx.Timeout(30.0, pool=None),
                limits=httpx.Limits(
                    max_connections=self.http_connections,
                    max_keepalive_connections=min(64, self.http_connections),
                ),
                follow_redirects=True,
                verify=self.http_verify,
            )
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None
